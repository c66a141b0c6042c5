"""Issue 10, "Numerics": config values that can only give NaN are refused; training stops at the
first non-finite loss, gradient or parameter and keeps the last good checkpoint (dvae and sde);
samplers refuse parameters their dtype cannot represent, and continuous samplers warn when their
samples show unmixed chains."""

import warnings
from pathlib import Path

import pytest
import torch

import backends
from backends.numerics import MixingWarning
from backends.testing import random_rbm, reference_rbms
from qvae import checkpoint
from qvae import train as train_module
from qvae.cli import main as cli_main
from qvae.config import ConfigError, load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "data.batch_size=50", "backend.num_samples=50",
    "backend.options={num_sweeps: 2, burn_in: 20}", "train.log_every=5",
    "train.checkpoint_every=10", "train.sample_grid=4", "eval.at_end=false",
]
SDE = ["model.kind=sde", "model.sde_steps=4", "model.control_hidden=[16]"]


def tiny(*extra):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra])


# ------------------------------------------------------------------------ the step's checks
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_names_the_first_bad_tensor(bad):
    good = torch.ones(3, 4)
    broken = torch.zeros(5)
    broken[2] = bad
    named = [("a", good), ("b", None), ("c", broken), ("d", broken.clone())]
    assert train_module.first_nonfinite(named) == "c"
    assert train_module.first_nonfinite([("a", good)]) is None


def test_first_nonfinite_is_not_fooled_by_a_sum_that_overflows():
    # finite entries whose float32 sum is inf: the fast path's alarm must not stop training
    huge = torch.full((4,), 3e38)
    assert not torch.isfinite(huge.sum())
    assert train_module.first_nonfinite([("w", huge), ("b", torch.zeros(2))]) is None
    huge[1] = float("nan")
    assert train_module.first_nonfinite([("w", torch.zeros(2)), ("v", huge)]) == "v"


def test_the_epoch_permutation_is_drawn_once_and_equals_a_fresh_draw():
    cfg = tiny()
    data = torch.arange(1000.0).unsqueeze(1)
    ctx = train_module.Dist()
    per_epoch = 1000 // cfg.data.batch_size
    rows = torch.cat([train_module.batch_at(data, cfg, s, ctx) for s in range(per_epoch)])
    fresh = torch.randperm(1000, generator=torch.Generator().manual_seed(cfg.seed))
    assert torch.equal(rows.squeeze(1), fresh.float())  # every example once, in the seeded order
    nxt = train_module.batch_at(data, cfg, per_epoch, ctx).squeeze(1)
    fresh1 = torch.randperm(1000, generator=torch.Generator().manual_seed(cfg.seed + 1))
    assert torch.equal(nxt, fresh1[: cfg.data.batch_size].float())


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("train.lr_final=.inf", "train.lr_final", "0 <= lr_final <= 1"),
        ("train.lr_final=2.0", "train.lr_final", "0 <= lr_final <= 1"),
        ("train.tau_end=1e-300", "train.tau_end", "0.001 <= tau_end <= 10"),
        ("train.tau_start=1.0e-300", "train.tau_start", "0.001 <= tau_start <= 10"),
        ("train.lr=.nan", "train.lr", "0 < lr <= 1"),
        ("train.grad_clip=.inf", "train.grad_clip", "0 < grad_clip"),
        ("model.rbm_init_std=.inf", "model.rbm_init_std", "0 <= rbm_init_std <= 10"),
        ("model.sde_horizon=1.0e-300", "model.sde_horizon", "0.001 <= sde_horizon <= 1000"),
    ],
)
def test_config_refuses_values_that_can_only_give_nan(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        tiny(override)
    assert field in str(err.value) and allowed in str(err.value)


def test_cli_refuses_an_infinite_learning_rate(tmp_path, capsys):
    assert cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out",
                     str(tmp_path / "r"), "--set", "train.lr_final=.inf", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.lr_final" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ training
def _nan_lr_from(bad_step):
    """An lr schedule that turns NaN at `bad_step` (a stand-in for a diverging run)."""
    original = train_module.lr_factor
    return lambda cfg, s: float("nan") if s >= bad_step else original(cfg, s)


@pytest.mark.parametrize("kind", ["dvae", "sde"])
def test_nan_parameters_stop_training_and_keep_the_last_good_checkpoint(
    tmp_path, monkeypatch, kind
):
    cfg = tiny("train.steps=30", *(SDE if kind == "sde" else []))
    # the update of step 20 (a checkpoint step) is the first with a NaN learning rate
    monkeypatch.setattr(train_module, "lr_factor", _nan_lr_from(19))
    with pytest.raises(train_module.TrainingDiverged) as err:
        train(cfg, tmp_path, progress=False)
    message = str(err.value)
    assert "step 20" in message and "after the update" in message
    assert "step 10" in message and "learning rate" in message
    state = checkpoint.load(tmp_path)
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("kind", ["dvae", "sde"])
def test_a_vanishing_temperature_stops_at_the_first_bad_gradient(tmp_path, monkeypatch, kind):
    cfg = tiny("train.steps=30", *(SDE if kind == "sde" else []))
    original = train_module.tau_at
    monkeypatch.setattr(train_module, "tau_at",
                        lambda c, s: 1e-300 if s >= 12 else original(c, s))
    with pytest.raises(train_module.TrainingDiverged, match="step 13: the (loss|gradient)"):
        train(cfg, tmp_path, progress=False)
    state = checkpoint.load(tmp_path)
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_divergence_is_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "lr_factor", _nan_lr_from(3))
    sets = [a for s in [*TINY, "train.steps=8"] for a in ("--set", s)]
    code = cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out",
                     str(tmp_path / "r"), "--no-progress", *sets])
    assert code == 1
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("qvae train:")]
    assert "Traceback" not in text
    assert len(err) == 1 and "diverged at step 4" in err[0], text
    assert "no checkpoint was written" in err[0]
    assert not (tmp_path / "r" / "last.pt").exists()


# ------------------------------------------------------------------------------ samplers
def _huge_rbm(scale):
    """The 8x8 reference RBM with its couplings times `scale`, in float64 (float32 cannot hold
    1e200)."""
    rbm = random_rbm(8, 8, seed=2).float64_copy()
    with torch.no_grad():
        rbm.weight.mul_(scale)
    return rbm


@pytest.mark.parametrize("name", ["gibbs", "langevin", "mala"])
def test_samplers_refuse_couplings_their_dtype_cannot_hold(name):
    with pytest.raises(ValueError, match=r"weight .*too large for dtype='float32'.*rescale"):
        backends.get_sampler(name).sample(_huge_rbm(1e200), 10, seed=0)


def test_gibbs_suggests_float64_when_it_suffices():
    rbm = _huge_rbm(1e7)  # inputs ~1e8: float32 rounding errors of several nats
    with pytest.raises(ValueError, match="use dtype='float64'"):
        backends.get_sampler("gibbs").sample(rbm, 10, seed=0)
    out = backends.get_sampler("gibbs", dtype="float64", burn_in=5).sample(rbm, 10, seed=0)
    assert torch.isfinite(out.energy).all()
    with pytest.raises(ValueError, match="times beta 1e"):
        backends.get_sampler("gibbs", beta=1e7).sample(random_rbm(8, 8, seed=2), 10, seed=0)


@pytest.mark.parametrize("name, options", [("mala", {"burn_in": 500}),
                                           ("langevin", {"burn_in": 2000})])
def test_continuous_samplers_warn_when_their_chains_have_not_mixed(name, options):
    rbm = random_rbm(8, 8, scale=1e3, seed=2)  # couplings x10^3
    sampler = backends.get_sampler(name, num_threads=1, **options)
    with pytest.warns(MixingWarning, match="not mixed"):
        out = sampler.sample(rbm, 300, seed=0)
    assert out.info["unmixed"] is True and out.info["max_flip_gain"] > 1000
    if name == "mala":  # the acceptance alone looks healthy
        assert 0.3 < out.info["acceptance"] < 0.8


@pytest.mark.parametrize("name, options", [("mala", {"burn_in": 500}),
                                           ("langevin", {"burn_in": 2000})])
def test_no_mixing_alarm_on_the_reference_rbms(name, options):
    for rbm in reference_rbms():
        sampler = backends.get_sampler(name, num_threads=1, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MixingWarning)
            out = sampler.sample(rbm, 2000, seed=1)
        assert out.info["unmixed"] is False and out.info["max_flip_gain"] < 10
