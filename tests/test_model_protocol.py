"""One model protocol: the DVAE, the SDE-VAE and a model of the caller's own train and evaluate
through the same trainer and evaluator (qvae.model.LatentVariableModel), with no capability flag;
inputs are checked once at the trainer's entry; metrics stay tensors until a row is logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvae.dvae
import qvae.sde
from qvae import checkpoint
from qvae import train as train_module
from qvae.config import load_config
from qvae.datasets import load_dataset
from qvae.dvae import DVAE
from qvae.evaluate import evaluate_model
from qvae.model import (
    MEMBERS,
    REQUIRED_METRICS,
    LatentVariableModel,
    check_model,
    metrics_to_floats,
)
from qvae.networks import check_pixels
from qvae.rbm import RBM
from qvae.sde import SDEVAE
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "data.batch_size=50", "backend.num_samples=50",
    "backend.options={num_sweeps: 2, burn_in: 20}", "train.log_every=3",
    "train.checkpoint_every=100", "train.sample_grid=4", "eval.num_iw=5",
    "eval.max_examples=20",
]
SDE = ["model.kind=sde", "model.sde_steps=3", "model.control_hidden=[16]"]


def tiny(*extra: str):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class TinyVAE(nn.Module):
    """A model written against the protocol alone: linear encoder and decoder, a factorial
    Bernoulli posterior over the units of an RBM prior, the relaxed bound (minus log Z) with
    the prior's negative phase. It counts what the trainer hands it."""

    def __init__(self, n_pixels: int = 784, n_visible: int = 8, n_hidden: int = 8) -> None:
        super().__init__()
        self.n_pixels = n_pixels
        self.prior = RBM(n_visible, n_hidden, seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.encoder = nn.Linear(n_pixels, self.prior.n_units)
            self.decoder = nn.Linear(self.prior.n_units, n_pixels)
        self.negative_shapes: list[tuple[int, ...]] = []
        self.checked_rows: list[int] = []

    def config_dict(self) -> dict:
        return {"n_pixels": self.n_pixels, "n_visible": self.prior.n_visible,
                "n_hidden": self.prior.n_hidden}

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        self.checked_rows.append(len(x))
        return check_pixels(x, self.n_pixels, self.prior.weight.dtype)

    def log_z_prior(self) -> RBM:
        return self.prior

    def _energy(self, z: torch.Tensor) -> torch.Tensor:
        flat, nv = z.reshape(-1, self.prior.n_units), self.prior.n_visible
        return self.prior.energy(flat[:, :nv], flat[:, nv:]).reshape(z.shape[:-1])

    def _weights(self, x, num_samples, generator, tau=None):
        logits = self.encoder(x)
        u = torch.rand((num_samples, *logits.shape), generator=generator).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        z = ((logits + noise > 0).to(x.dtype) if tau is None
             else torch.sigmoid((logits + noise) / tau))
        recon = -F.binary_cross_entropy_with_logits(
            self.decoder(z), x.expand(num_samples, *x.shape), reduction="none").sum(-1)
        log_q = (z * F.logsigmoid(logits) + (1 - z) * F.logsigmoid(-logits)).sum(-1)
        energy = self._energy(z)
        return recon, energy, energy + log_q

    def loss(self, x, negative, *, tau, kl_weight=1.0, num_samples=1, generator=None):
        if self.training:  # (the validation curve calls it too, in eval mode)
            self.negative_shapes.append(tuple(negative.shape))
        recon, energy, kl = self._weights(x, num_samples, generator, tau)
        bound = torch.logsumexp(recon - kl_weight * kl, 0) - math.log(num_samples)
        neg_energy = self._energy(negative).mean()
        loss = -bound.mean() - kl_weight * neg_energy
        return loss, {"loss": loss.detach(), "bound_minus_logz": bound.detach().mean(),
                      "positive_energy": energy.detach().mean(),
                      "negative_energy": neg_energy.detach()}

    @torch.no_grad()
    def evaluation_elbo(self, x, log_z, *, num_samples=1, generator=None):
        recon, _, kl = self._weights(x, num_samples, generator)
        return (recon - kl).mean(0) - log_z

    @torch.no_grad()
    def evaluation_iw_bound(self, x, log_z, *, num_samples, generator=None):
        recon, _, kl = self._weights(x, num_samples, generator)
        return torch.logsumexp(recon - kl, 0) - math.log(num_samples) - log_z

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))


def small_models() -> list[nn.Module]:
    return [DVAE(12, 4, 3, encoder_hidden=[8], decoder_hidden=[8], seed=0),
            SDEVAE(12, 4, 3, encoder_hidden=[8], decoder_hidden=[8], control_hidden=[8],
                   num_steps=3, seed=0),
            TinyVAE(12, 4, 3)]


# ------------------------------------------------------------------------- the protocol
def test_every_model_implements_the_protocol_and_declares_its_log_z():
    dvae, sde, own = small_models()
    for model in (dvae, sde, own):
        assert isinstance(model, LatentVariableModel), type(model).__name__
        check_model(model)
    # What the trainer and the evaluator ask, instead of a flag: whose log Z is in the bound.
    assert dvae.log_z_prior() is dvae.prior and own.log_z_prior() is own.prior
    assert sde.log_z_prior() is None
    assert not hasattr(DVAE, "needs_negative_phase") and not hasattr(SDEVAE, "needs_negative_phase")
    assert set(MEMBERS) <= set(dir(dvae)) & set(dir(sde))


def test_a_module_lacking_members_is_named_and_refused_before_training(tmp_path):
    assert not isinstance(nn.Linear(3, 3), LatentVariableModel)
    with pytest.raises(TypeError, match="lacks .*config_dict.*log_z_prior.*loss"):
        check_model(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        check_model(_NotAModule())
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="LatentVariableModel, got Linear .it lacks"):
        train(tiny("train.steps=2"), run, model=nn.Linear(3, 3), progress=False)
    assert not run.exists()


class _NotAModule:
    """Every member of the protocol, but not an nn.Module (no parameters to train)."""

    prior, n_pixels = RBM(2, 2), 4

    def config_dict(self): ...
    def check_input(self, x): ...
    def log_z_prior(self): ...
    def loss(self, x, negative, **kw): ...
    def evaluation_elbo(self, x, log_z, **kw): ...
    def evaluation_iw_bound(self, x, log_z, **kw): ...
    def generate(self, z): ...


# -------------------------------------------------------- one trainer, one evaluator
@pytest.mark.parametrize("extra", [[], SDE], ids=["dvae", "sde"])
def test_both_models_train_and_evaluate_through_the_same_path(tmp_path, extra):
    cfg = tiny("train.steps=6", *extra)
    result = train(cfg, tmp_path / "run", progress=False)
    ev = result.evaluation
    assert ev is not None and math.isfinite(ev["nll"]) and math.isfinite(ev["elbo"])
    model, _, _ = checkpoint.load_model(tmp_path / "run")
    assert isinstance(model, LatentVariableModel)
    if model.log_z_prior() is None:  # the SDE-VAE: no negative phase, no log Z
        assert result.sampling["calls"] == 0 and ev["log_z"] is None
    else:  # the DVAE: one negative phase per step, log Z subtracted in evaluation
        assert result.sampling["calls"] == 6 and math.isfinite(ev["log_z"])
    again = evaluate_model(model, cfg, progress=False)
    assert again["nll"] == ev["nll"]  # the evaluator, called directly, gives the same numbers


def test_a_model_of_your_own_trains_and_evaluates_through_qvae_train(tmp_path):
    model = TinyVAE()
    steps = 7
    result = train(tiny(f"train.steps={steps}"), tmp_path / "run", model=model, progress=False)
    # The trainer drew its negative phase from the prior the model named, every step.
    assert result.sampling["calls"] == steps
    assert model.negative_shapes == [(50, 16)] * steps
    # Its data were checked once, whole, at the trainer's entry (not per step).
    assert model.checked_rows == [len(load_dataset("mnist", "train"))]
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged] == [3, 6, 7]
    assert all(isinstance(r[k], float) for r in logged for k in REQUIRED_METRICS)
    assert "elbo_relaxed" in logged[0] and "log_z" in logged[0]  # 8 + 8 units: exact log Z
    ev = result.evaluation
    assert ev is not None and math.isfinite(ev["nll"]) and ev["method"] == "exact"
    assert (tmp_path / "run" / "samples.png").exists()  # the report decoded prior samples
    # A checkpoint holds weights, never code: it names the class it cannot rebuild.
    assert checkpoint.load(tmp_path / "run")["custom_modules"] == {
        "model": f"{__name__}.TinyVAE"}
    with pytest.raises(checkpoint.CheckpointError, match="TinyVAE"):
        checkpoint.load_model(tmp_path / "run")


def test_a_loss_without_the_required_metrics_is_named_at_the_first_step(tmp_path):
    class NoEnergies(TinyVAE):
        def loss(self, x, negative, **kw):
            loss, metrics = super().loss(x, negative, **kw)
            return loss, {"loss": metrics["loss"]}

    with pytest.raises(ValueError, match="without bound_minus_logz, positive_energy"):
        train(tiny("train.steps=3"), tmp_path / "run", model=NoEnergies(), progress=False)


def test_the_models_input_check_runs_at_the_start_and_names_the_data(tmp_path):
    model = TinyVAE()
    model.check_input = lambda x: (_ for _ in ()).throw(ValueError("x must be even"))
    with pytest.raises(ValueError, match="data.dataset mnist, 'train' split: x must be even"):
        train(tiny("train.steps=2"), tmp_path / "run", model=model, progress=False)
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------- metrics stay tensors
def test_loss_metrics_are_tensors_and_the_loss_reads_nothing_back(monkeypatch):
    """With the value checks left to the trainer's entry (as on an accelerator), a loss call
    reads no tensor back to Python: no bool(), float(), int(), .item() or .tolist()."""
    reads: list[str] = []
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            reads.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for module in (qvae.dvae, qvae.sde):
        monkeypatch.setattr(module, "costs_no_sync", lambda t: False)
    x = torch.bernoulli(torch.full((5, 12), 0.5), generator=torch.Generator().manual_seed(0))
    for model in small_models()[:2]:
        prior = model.log_z_prior()
        negative = None if prior is None else torch.zeros(4, prior.n_units)
        reads.clear()
        loss, metrics = model.loss(x, negative, tau=0.5, kl_weight=0.5, num_samples=2,
                                   generator=torch.Generator().manual_seed(1))
        assert reads == [], type(model).__name__
        assert set(REQUIRED_METRICS) <= set(metrics)
        for key, value in metrics.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0, key
            assert not value.requires_grad, key
        loss.backward()
    monkeypatch.undo()
    floats = metrics_to_floats(metrics)
    assert list(floats) == list(metrics)
    assert all(type(v) is float and (v == float(metrics[k]) or math.isnan(v))
               for k, v in floats.items())


def test_the_trainer_reads_metrics_only_for_the_rows_it_logs(tmp_path, monkeypatch):
    conversions: list[int] = []
    convert = train_module.metrics_to_floats

    def counting(metrics):
        conversions.append(len(metrics))
        return convert(metrics)

    monkeypatch.setattr(train_module, "metrics_to_floats", counting)
    seen: dict[int, dict] = {}
    cfg = tiny("train.steps=7", "eval.at_end=false")
    train(cfg, tmp_path / "run", progress=False,
          callback=lambda step, row: seen.update({step: row}))
    logged = {r["step"]: r for r in rows(tmp_path / "run")}
    assert sorted(logged) == [3, 6, 7]
    for step, row in seen.items():
        if step in logged:  # the logged row, Python floats, as metrics.jsonl holds it
            assert type(row["loss"]) is float and row["loss"] == logged[step]["loss"]
        else:  # not logged: the step's metrics were never read back
            assert isinstance(row["loss"], torch.Tensor) and row["loss"].dim() == 0
    # One conversion per logged row and one per validation-curve point: none for other steps.
    assert len(conversions) == 2 * len(logged)
