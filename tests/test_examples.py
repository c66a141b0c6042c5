"""The Python API (issue 11, "PyTorch"): qvae's models, trainer and samplers from Python, models
with the user's own encoder and decoder, and the runnable scripts of examples/ at a tiny size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qvae
from qvae import checkpoint
from qvae.cli import main as cli_main
from qvae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NV = NH = 4
N_LATENT = NV + NH
IMAGE = (1, 28, 28)
TINY = [
    f"model.n_visible={NV}", f"model.n_hidden={NH}", "data.batch_size=20",
    "backend.num_samples=20", "backend.options={num_sweeps: 2, burn_in: 5}", "train.log_every=1",
    "train.checkpoint_every=2", "train.sample_grid=4", "eval.num_iw=5", "eval.max_examples=20",
]


def conv_encoder(n_latent=N_LATENT):
    return nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 14 * 14, n_latent))


def conv_decoder(n_latent=N_LATENT):
    return nn.Sequential(nn.Linear(n_latent, 4 * 14 * 14), nn.ReLU(), nn.Unflatten(1, (4, 14, 14)),
                         nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1))


def conv_dvae(**kw):
    torch.manual_seed(0)
    return qvae.DVAE(784, NV, NH, encoder=conv_encoder(), decoder=conv_decoder(),
                     input_shape=IMAGE, seed=0, **kw)


def tiny(*extra):
    return load_config("smoke", [*TINY, *extra])


def data(n=6):
    return torch.bernoulli(torch.full((n, 784), 0.3), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------- exports
def test_the_api_is_exported_and_import_qvae_stays_cheap():
    code = ("import sys, qvae; heavy = [m for m in ('fastapi', 'uvicorn', 'pydantic', "
            "'matplotlib', 'qvae.service', 'qvae.train') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import backends
    from qvae import DVAE, RBM, SDEVAE, SampleSet, evaluate, get_sampler, load_config, train
    from qvae.dvae import DVAE as dvae_cls
    from qvae.evaluate import evaluate_model

    assert DVAE is dvae_cls and RBM is qvae.RBM and SDEVAE.__name__ == "SDEVAE"
    assert get_sampler is backends.get_sampler and SampleSet is backends.SampleSet
    assert load_config is qvae.config.load_config and qvae.load_model is checkpoint.load_model
    assert set(qvae.__all__) <= set(dir(qvae))
    # The entry points are their modules, callable: module attributes keep working.
    assert callable(train) and train.build_model and train is sys.modules["qvae.train"]
    assert callable(evaluate) and evaluate.evaluate_model is evaluate_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qvae.nope  # noqa: B018


# ------------------------------------------------------------------ own networks
def test_a_dvae_takes_any_encoder_and_decoder_module():
    m, x = conv_dvae(), data()
    loss, metrics = m.loss(x, torch.zeros(5, N_LATENT), tau=0.5, num_samples=2)
    loss.backward()
    assert m.encoder[0].weight.grad is not None and m.decoder[-1].weight.grad is not None
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    log_z = float(m.prior.log_partition())
    gen = torch.Generator().manual_seed(0)
    assert m.discrete_elbo(x, log_z, generator=gen).shape == (6,)
    iw = m.iw_bound(x, log_z, num_samples=200, batch_chunk=70, generator=gen)
    exact = m.exact_log_px(x, log_z)  # decodes all 2^8 states in one (256, 8) batch
    assert abs(float(iw.mean() - exact.mean())) < 1.0  # K = 200 of an untrained model: close
    z3 = torch.rand(3, 2, N_LATENT, generator=gen)
    assert torch.allclose(m.decode(z3), m.decoder(z3.reshape(6, -1)).reshape(3, 2, 784))
    assert m.generate(torch.zeros(3, N_LATENT)).shape == (3, 784)
    assert m.encode(x).shape == (6, N_LATENT)
    _, z = m.posterior(x, 4, generator=gen)
    assert m.log_posterior(x, z).shape == (4, 6)
    assert m.custom_modules == {"encoder": "torch.nn.modules.container.Sequential",
                                "decoder": "torch.nn.modules.container.Sequential"}
    assert m.config_dict()["input_shape"] == list(IMAGE)


def test_a_custom_encoder_alone_keeps_the_mlp_decoder():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, N_LATENT))
    m = qvae.DVAE(784, NV, NH, encoder=flat, decoder_hidden=[16], seed=0)
    assert set(m.custom_modules) == {"encoder"} and isinstance(m.decoder, nn.Sequential)
    m.loss(data(), torch.zeros(3, N_LATENT), tau=0.5)[0].backward()


@pytest.mark.parametrize("kwargs, message", [
    (dict(encoder=conv_encoder(N_LATENT + 2), input_shape=IMAGE),
     r"encoder must map x of shape \(2, 1, 28, 28\) to logits of shape \(2, 8\) .*returned "
     r"\(2, 10\)"),
    (dict(encoder=conv_encoder()),
     r"encoder failed on an input of shape \(2, 784\): RuntimeError.*pass input_shape"),
    (dict(decoder=nn.Linear(N_LATENT, 100)),
     r"decoder must map z of shape \(2, 8\) to data logits of shape \(2, 784\).*returned "
     r"\(2, 100\)"),
    (dict(decoder=lambda z: z), r"decoder must be a torch.nn.Module, got function"),
    (dict(encoder=conv_encoder(), input_shape=(1, 28, 27)),
     r"input_shape .* product is n_pixels=784"),
    (dict(encoder=conv_encoder(), input_shape=IMAGE, groups=2), r"use groups=1"),
    (dict(decoder=conv_decoder(), pixel_mean=torch.full((784,), 0.5)),
     r"initialise it yourself and leave pixel_mean out"),
])
def test_wrong_networks_fail_at_construction_naming_the_shape(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qvae.DVAE(784, NV, NH, **kwargs)


def test_the_dry_run_leaves_the_networks_in_training_mode():
    m = conv_dvae()
    assert m.training and all(mod.training for mod in m.modules())


# ----------------------------------------------------------- the CLI's trainer
def test_the_cli_trainer_trains_a_custom_model_and_explains_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny("train.steps=4")
    result = qvae.train(cfg, run, model=conv_dvae(), progress=False)
    assert result.step == 4 and result.evaluation["num_examples"] == 20
    assert (run / "samples.png").exists() and (run / "eval.json").exists()
    state = checkpoint.load(run)
    assert set(state["custom_modules"]) == {"encoder", "decoder"}

    # The documented way back: rebuild the networks, load the weights.
    again = conv_dvae()
    again.load_state_dict(state["model"])
    x = data()
    assert torch.equal(again.generate(torch.ones(2, N_LATENT)),
                       torch.sigmoid(again.decode(torch.ones(2, N_LATENT))))
    assert again.encode(x).shape == (6, N_LATENT)

    # `qvae evaluate RUN` cannot rebuild it: one line saying what to do, no traceback.
    capsys.readouterr()
    assert cli_main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "trained with your own network(s)" in err and "load_state_dict" in err

    # Resuming takes the same architecture again and continues from the checkpoint.
    resumed = qvae.train(tiny("train.steps=6", "eval.at_end=false"), run, resume=True,
                         model=conv_dvae(), progress=False)
    assert resumed.step == 6 and checkpoint.load(run)["step"] == 6


def test_a_model_that_does_not_fit_the_config_is_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"model.n_visible=5, model.n_hidden=4; set them"):
        qvae.train(tiny("model.n_visible=5"), run, model=conv_dvae(), progress=False)
    with pytest.raises(ValueError, match="must be a qvae DVAE for model.kind=dvae"):
        qvae.train(tiny(), run, model=nn.Linear(3, 3), progress=False)
    assert not run.exists()  # a failed start leaves nothing behind


# ------------------------------------------------------------------------ examples
def run_example(name, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), "--tiny", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_example_conv_dvae_runs_at_a_tiny_size(tmp_path):
    out = run_example("conv_dvae.py", "--out", str(tmp_path / "conv"))
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("last.pt", "eval.json", "samples.png", "reloaded.json"):
        assert (tmp_path / "conv" / name).exists(), name
    assert "test NLL" in out.stdout and "reloaded from" in out.stdout
    assert json.loads((tmp_path / "conv" / "eval.json").read_text())["num_examples"] == 20


def test_example_own_loop_runs_at_a_tiny_size(tmp_path):
    out = run_example("own_loop.py", "--out", str(tmp_path / "own.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "own.json").read_text())
    assert result["backend"] == "gibbs" and len(result["losses"]) == result["steps"] == 5
    assert result["test_elbo"] < 0 and "test ELBO" in out.stdout


# ------------------------------------------------------------------------- SDE-VAE networks
def test_an_sde_vae_takes_any_encoder_and_decoder_module():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(784, 24), nn.Tanh())  # features of any width feed its heads
    dec = nn.Sequential(nn.Linear(NV, 32), nn.Tanh(), nn.Linear(32, 784))
    m = qvae.SDEVAE(784, NV, NH, encoder=enc, decoder=dec, num_steps=4, seed=0)
    assert m.encoder is enc and m.decoder is dec
    assert m.initial_head.in_features == 24 and m.control_feature.in_features == 24
    assert set(m.custom_modules) == {"encoder", "decoder"}
    loss, _ = m.loss(data(), tau=0.5)
    loss.backward()
    assert enc[0].weight.grad is not None and dec[-1].weight.grad is not None
    assert m.elbo(data()).shape == (6,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(encoder=nn.Linear(10, 3)), r"encoder failed on an input of shape \(2, 784\)"),
    (dict(encoder=nn.Flatten(0)), r"encoder must map x of shape \(2, 784\) to features"),
    (dict(decoder=nn.Linear(NV, 100)),
     r"decoder must map v of shape \(2, 4\) to pixel logits of shape \(2, 784\).*\(2, 100\)"),
    (dict(decoder=lambda v: v), r"decoder must be a torch.nn.Module, got function"),
    (dict(decoder=nn.Linear(NV, 784), pixel_mean=torch.full((784,), 0.5)), r"pixel_mean"),
])
def test_wrong_sde_networks_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qvae.SDEVAE(784, NV, NH, num_steps=4, **kwargs)
