"""The one shape of a latent-variable model, as the trainer, the evaluator and the report use it.

`DVAE` (qvae/dvae.py) and `SDEVAE` (qvae/sde.py) implement `LatentVariableModel`; so may a model
of your own (a `torch.nn.Module`), which `qvae.train(cfg, out_dir, model=...)` then trains, checks
and evaluates exactly like the built-in ones. Nothing in the trainer or the evaluator asks which
kind of model it holds: what differs between models is what each one declares here.

- **Its prior's partition function.** `log_z_prior()` names the prior (an `RBM` or a
  `BoltzmannMachine`) whose log Z the model's bound contains, or None. The trainer draws the
  loss's `negative` samples from it at every step (the gradient of log Z is −E_p[∇E]) and the
  evaluator subtracts its estimated log Z from the bounds; with None, neither happens (the
  SDE-VAE's path-measure bound has no log Z).
- **Its inputs.** `check_input` validates data (type, shape, values) once, where the data enter:
  the trainer calls it on the whole training set before the first step. `loss` itself checks
  only what costs no device sync.
- **Its metrics.** `loss` returns the scalar to minimise and a dict of 0-dim tensors (detached),
  holding at least `REQUIRED_METRICS`; the trainer turns them into Python floats only for the
  rows it logs and, on a terminal, the progress bar (`metrics_to_floats`: one transfer, not one
  sync per metric). An optional
  `elbo` metric is logged as `elbo_relaxed` (a model whose bound has no log Z can report it).

>>> from qvae import DVAE, SDEVAE
>>> all(isinstance(m, LatentVariableModel)
...     for m in (DVAE(8, 3, 2, encoder_hidden=[4], decoder_hidden=[4]),
...               SDEVAE(8, 3, 2, encoder_hidden=[4], decoder_hidden=[4], control_hidden=[4])))
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM

Prior = RBM | BoltzmannMachine

#: Metrics every `loss` returns: the progress bar and metrics.jsonl show the first two, the
#: training report plots all four.
REQUIRED_METRICS = ("loss", "bound_minus_logz", "positive_energy", "negative_energy")


@runtime_checkable
class LatentVariableModel(Protocol):
    """A generative model p(x, z) with a Boltzmann `prior` (an RBM or a BoltzmannMachine),
    trained on a bound of log p(x).

    Implemented by a `torch.nn.Module` (the trainer also uses its parameters, state dict and
    train/eval modes). `isinstance(model, LatentVariableModel)` checks that the members exist.
    """

    #: The prior over the latent units; backends sample it (negative phase, decoded samples).
    prior: Prior
    #: Values per example (the data's width).
    n_pixels: int

    def config_dict(self) -> dict[str, Any]:
        """Plain-Python constructor arguments that rebuild the model (the checkpoint keeps
        them beside the weights)."""
        ...

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (batch, n_pixels) validated (type, shape, values), in the model's dtype; a
        ValueError or TypeError naming the problem otherwise."""
        ...

    def log_z_prior(self) -> Prior | None:
        """The prior whose log partition function the bound contains (its negative phase is
        sampled in training, its log Z estimated for evaluation), or None for a bound without
        one."""
        ...

    def loss(
        self, x: torch.Tensor, negative: torch.Tensor | None, *, tau: float,
        kl_weight: float = 1.0, num_samples: int = 1, generator: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, metrics) of a minibatch. `negative`: states (M, prior.n_units) drawn
        from `log_z_prior()`, or None when that is None. `tau`: the relaxation temperature,
        `kl_weight`: the KL warm-up weight, `num_samples`: K of an importance-weighted bound."""
        ...

    def evaluation_elbo(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int = 1,
        generator: Any = None,
    ) -> torch.Tensor:
        """The ELBO per example, shape (B,), in evaluation mode; `log_z` is the estimate for
        `log_z_prior()` (None when that is None)."""
        ...

    def evaluation_iw_bound(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int,
        generator: Any = None,
    ) -> torch.Tensor:
        """The importance-weighted bound on log p(x) with K = num_samples, shape (B,)."""
        ...

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Data probabilities (..., n_pixels) for prior states z (..., prior.n_units)."""
        ...


#: The members `check_model` names when a model lacks them (those of the protocol above).
MEMBERS = ("prior", "n_pixels", "config_dict", "check_input", "log_z_prior", "loss",
           "evaluation_elbo", "evaluation_iw_bound", "generate")


def mismatch(model: Any) -> str | None:
    """Why `model` is not a LatentVariableModel that qvae can train ("it lacks loss, ..."),
    or None when it is one."""
    if isinstance(model, torch.nn.Module) and isinstance(model, LatentVariableModel):
        return None
    missing = [name for name in MEMBERS if not hasattr(model, name)]
    return f"it lacks {', '.join(missing)}" if missing else "it is not a torch.nn.Module"


def check_model(model: Any) -> None:
    """A TypeError naming what `model` lacks to be trained and evaluated by qvae."""
    reason = mismatch(model)
    if reason is not None:
        raise TypeError(f"the model ({type(model).__name__}) must be a torch.nn.Module "
                        f"implementing qvae.model.LatentVariableModel; {reason}")


def check_metrics(metrics: Mapping[str, Any], model: Any) -> None:
    """A ValueError naming the `REQUIRED_METRICS` that a loss's metrics lack."""
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ValueError(
            f"{type(model).__name__}.loss returned metrics without {', '.join(missing)}; "
            f"a LatentVariableModel's loss reports {', '.join(REQUIRED_METRICS)}"
        )


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as Python floats, in their order. The tensors reach the host in one transfer
    (one device sync, not one per metric), through float64, so each value is exactly float(t).

    >>> metrics_to_floats({"loss": torch.tensor(1.5), "n": 2})
    {'loss': 1.5, 'n': 2.0}
    """
    tensors = {k: v.detach().reshape(()) for k, v in metrics.items()
               if isinstance(v, torch.Tensor)}
    values: dict[str, float] = {}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([t.to(device, torch.float64) for t in tensors.values()])
        values = dict(zip(tensors, stacked.tolist(), strict=True))
    return {k: values[k] if k in values else float(v) for k, v in metrics.items()}
