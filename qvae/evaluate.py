"""Test-set evaluation: the ELBO and the importance-weighted NLL, with log Z where there is one.

NLL(x) ≈ −log (1/K) Σ_k p(x|z_k) exp(−E(z_k)) / (Z q(z_k|x)), z_k ~ q(z|x), with log Z exact when
the smaller RBM layer has at most `eval.exact_limit_units` units and AIS otherwise — the protocol
of the published binarized-MNIST tables. The uncertainty of log Z shifts every example's NLL by
the same amount, so it is reported separately from the sampling error over examples.
Any `qvae.model.LatentVariableModel` is evaluated the same way: the model names the prior whose
log Z its bounds contain (`log_z_prior()`, None for a bound without one, as the SDE-VAE's).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qvae.atomic import write_bytes_atomic
from qvae.boltzmann import BoltzmannMachine
from qvae.callable_module import make_callable
from qvae.config import Config
from qvae.datasets import LABELLED_MNIST, load_dataset
from qvae.logz import ais_log_partition, exact_log_partition, log_partition
from qvae.model import LatentVariableModel, check_model
from qvae.rbm import RBM

#: The log-Z method reported for a bound without a partition function.
NO_LOG_Z = "none (path measure, no log Z)"


def log_z_functions(prior: RBM | BoltzmannMachine) -> tuple[Any, Any, Any]:
    """(exact_log_partition, ais_log_partition, log_partition) for the prior's kind: the RBM's
    (qvae.logz) or a Boltzmann machine's (qvae.boltzmann_logz); the same arguments either way
    (auto: exact when at most exact_limit_units units are enumerated, the smaller RBM layer or
    a BM's units outside its largest colour class)."""
    if isinstance(prior, BoltzmannMachine):
        from qvae import boltzmann_logz

        return (boltzmann_logz.exact_log_partition, boltzmann_logz.ais_log_partition,
                boltzmann_logz.log_partition)
    return exact_log_partition, ais_log_partition, log_partition


def estimate_log_z(
    prior: RBM | BoltzmannMachine, cfg: Config, *, progress: bool = False
) -> dict[str, Any]:
    """log Z of `prior` by cfg.eval.logz (exact, ais, pt, or auto by cfg.eval.exact_limit_units).

    Every estimate is checked against a certified lower bound (`qvae.logz_pt`): an explicit
    `ais` below it raises `LogZBelowBound` (its NLL would be too low, and nothing is written);
    `auto` then estimates log Z by replica exchange (`pt`) instead, and says so.
    """
    from qvae.logz_pt import check_above_bound, log_z_lower_bound, refuted

    e = cfg.eval
    ais = {"num_betas": e.ais_betas, "num_runs": e.ais_runs, "seed": cfg.seed,
           "progress": progress}
    exact, ais_estimate, auto = log_z_functions(prior)
    if e.logz == "exact":
        value = exact(prior)
        return {"log_z": value, "log_z_std": 0.0, "method": "exact"}
    bound = log_z_lower_bound(prior, seed=cfg.seed)
    checked = {"log_z_lower_bound": bound.value, "log_z_lower_bound_method": bound.method}
    if e.logz == "pt":
        return {**pt_estimate(prior, cfg, progress=progress, bound=bound), **checked}
    if e.logz == "ais":
        res = ais_estimate(prior, **ais)
        check_above_bound(res.log_z, res.log_z_std, bound, "AIS")
        return {"log_z": res.log_z, "log_z_std": res.log_z_std, "method": "ais",
                "ais_num_betas": res.num_betas, "ais_num_runs": res.num_runs,
                "ais_effective_sample_size": res.effective_sample_size, **checked}
    est = auto(prior, exact_limit_units=e.exact_limit_units, **ais)
    if est.method != "exact" and refuted(est.log_z, est.log_z_std, bound.value):
        return {**pt_estimate(prior, cfg, progress=progress, bound=bound), **checked,
                "method": f"pt (AIS gave {est.log_z:.2f}, below the certified lower bound)"
                }
    return {"log_z": est.log_z, "log_z_std": est.log_z_std, "method": est.method,
            **(checked if est.method != "exact" else {})}


def pt_estimate(prior: RBM | BoltzmannMachine, cfg: Config, *, progress: bool,
                bound: Any) -> dict[str, Any]:
    """log Z by replica exchange (`qvae.logz_pt.pt_log_partition`) with cfg.eval's pt_*
    settings, checked against `bound` like any estimate."""
    from qvae.logz_pt import check_above_bound, pt_log_partition

    e = cfg.eval
    res = pt_log_partition(prior, num_replicas=e.pt_replicas, num_chains=e.pt_chains,
                           burn_in=e.pt_burn_in, num_sweeps=e.pt_sweeps, seed=cfg.seed,
                           progress=progress)
    check_above_bound(res.log_z, res.log_z_std, bound, "replica-exchange (pt)")
    return {"log_z": res.log_z, "log_z_std": res.log_z_std, "method": "pt",
            "pt_replicas": res.num_replicas, "pt_chains": res.num_chains,
            "pt_sweeps": res.num_sweeps, "pt_min_swap_acceptance": min(res.swap_acceptance)}


@torch.no_grad()
def validation_nll(
    model: LatentVariableModel, cfg: Config, data: torch.Tensor, seed: int
) -> dict[str, Any]:
    """The cheap NLL estimate used to select checkpoints during training.

    −IW_K bound with K = train.validate_num_iw on `data`, log Z exact for a small layer and AIS
    with train.validate_ais_betas × train.validate_ais_runs otherwise. Every draw is seeded from
    `seed` (the trainer passes one derived from the step), so a resumed run repeats it exactly.
    The model's train/eval mode is restored afterwards.
    """
    t, was_training = cfg.train, model.training
    model.eval()
    start = time.perf_counter()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    log_z, log_z_std, method, extra = None, 0.0, NO_LOG_Z, {}
    prior = model.log_z_prior()
    if prior is not None:
        est = log_z_functions(prior)[2](prior, exact_limit_units=cfg.eval.exact_limit_units,
                            num_betas=t.validate_ais_betas, num_runs=t.validate_ais_runs,
                            seed=seed)
        log_z, log_z_std, method = est.log_z, est.log_z_std, est.method
        if method != "exact":
            from qvae.logz_pt import log_z_lower_bound, refuted

            # AIS below a certified bound missed the prior's mode: the bound is then the best
            # log Z known, and the NLL from it the least the model's NLL can be (flagged)
            bound = log_z_lower_bound(prior, seed=seed).value
            extra["log_z_lower_bound"] = bound
            if refuted(log_z, log_z_std, bound):
                extra["log_z_ais_below_bound"] = log_z
                log_z, log_z_std = bound, 0.0
                method = f"lower bound ({method} gave {extra['log_z_ais_below_bound']:.2f})"
    iws = []
    try:
        for i in range(0, len(data), cfg.data.eval_batch_size):
            x = data[i : i + cfg.data.eval_batch_size].to(device)
            iws.append(model.evaluation_iw_bound(x, log_z, num_samples=t.validate_num_iw,
                                                 generator=gen).double().cpu())
    finally:
        model.train(was_training)
    iw = torch.cat(iws)
    return {"nll": float(-iw.mean()),
            "nll_stderr_examples": float(iw.std() / math.sqrt(len(iw))) if len(iw) > 1 else 0.0,
            "log_z": 0.0 if log_z is None else log_z, "log_z_std": log_z_std,
            "log_z_method": method, **extra,
            "num_examples": len(iw), "num_iw": t.validate_num_iw,
            "seconds": time.perf_counter() - start}


#: The subset `eval.max_examples` takes is drawn with this seed, the same for every run (so
#: subsets compare across runs) and independent of the training seed.
SUBSET_SEED = 0


def evaluation_subset(data: torch.Tensor, n: int) -> torch.Tensor:
    """`n` examples drawn at random without replacement, in their original order. Not the
    first n: the binarized MNIST test split is sorted by label, so its first 1,000 images are
    nearly all zeros, whose NLL is far from the whole split's."""
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    idx = torch.randperm(len(data), generator=gen)[:n].sort().values
    return data[idx]


@torch.no_grad()
def evaluate_model(
    model: LatentVariableModel, cfg: Config, out_path: str | Path | None = None, *,
    progress: bool = True, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate on `cfg.eval.split`; write JSON to `out_path` when given; return the dict."""
    from tqdm.auto import tqdm

    check_model(model)
    model.eval()
    check_finite_parameters(model)
    start = time.perf_counter()
    data = load_dataset(cfg.data.dataset, cfg.eval.split)
    subset = None
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < len(data):
        data, subset = evaluation_subset(data, cfg.eval.max_examples), cfg.eval.max_examples
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    prior = model.log_z_prior()
    logz = ({"log_z": None, "log_z_std": 0.0, "method": NO_LOG_Z} if prior is None
            else estimate_log_z(prior, cfg, progress=progress))
    log_z = logz["log_z"]
    elbos, iws = [], []
    bs = cfg.data.eval_batch_size
    for i in tqdm(range(0, len(data), bs), disable=not progress, desc="evaluate", unit="batch"):
        x = data[i : i + bs].to(device)
        elbo_b = model.evaluation_elbo(x, log_z, num_samples=1, generator=gen)
        iw_b = model.evaluation_iw_bound(x, log_z, num_samples=cfg.eval.num_iw, generator=gen)
        elbos.append(elbo_b.cpu())
        iws.append(iw_b.cpu())
    elbo, iw = torch.cat(elbos).double(), torch.cat(iws).double()
    n = len(iw)
    result = {
        "split": cfg.eval.split,
        "num_examples": n,
        "examples": (f"random subset of {subset} (seed {SUBSET_SEED})" if subset
                     else "all"),
        "num_iw": cfg.eval.num_iw,
        "elbo": float(elbo.mean()),
        "nll": float(-iw.mean()),
        "nll_stderr_examples": float(iw.std() / math.sqrt(n)) if n > 1 else 0.0,
        "nll_spread_from_log_z": logz["log_z_std"],
        **logz,
        "seconds": time.perf_counter() - start,
        **_conditional_note(model, cfg),
        **(extra or {}),
    }
    check_finite_result(result)
    if out_path is not None:
        write_bytes_atomic(out_path, json.dumps(result, indent=2, allow_nan=False).encode())
    return result


#: What the NLL of a class-conditional model is, in its eval.json and the run's output.
CONDITIONAL_NOTE = (
    "class-conditional model: the NLL is -log p(image, label), trained and evaluated on the "
    "labelled MNIST test images (data.dataset mnist-labelled); not comparable with the "
    "unconditional MNIST NLL table"
)


def conditional_note(cfg: Config) -> str | None:
    """What the NLL of a class-conditional run is (None for an unconditional one)."""
    if not cfg.model.conditional.label_units:
        return None
    if cfg.data.dataset.lower() == LABELLED_MNIST:
        return CONDITIONAL_NOTE
    return "class-conditional model: the NLL is -log p(x, label), not -log p(x)"


def _conditional_note(model: Any, cfg: Config) -> dict[str, Any]:
    units = getattr(model, "label_units", 0)
    note = conditional_note(cfg)
    return {"label_units": units, "note": note} if units and note else {}


class NonFiniteResult(ValueError):
    """An evaluation that came out NaN/inf: refused (JSON has no NaN), with the likely cause."""


def check_finite_parameters(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteResult(
                f"cannot evaluate: model parameter {name} holds NaN/inf (a diverged run); use "
                "an earlier checkpoint or retrain with a lower train.lr / larger train.tau_end"
            )


def check_finite_result(result: dict[str, Any]) -> None:
    """NonFiniteResult naming each non-finite number and its likely cause; nothing is written."""
    bad = {k: v for k, v in result.items()
           if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return
    if "log_z" in bad or "log_z_std" in bad:
        cause = ("log Z is not finite: the RBM's couplings are too large for the "
                 f"{result.get('method')} estimate")
    else:
        cause = ("the model's bound is not finite on some examples (saturated decoder or "
                 "posterior probabilities)")
    shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
    raise NonFiniteResult(f"evaluation gave {shown}: {cause}; no result was written")


# `qvae.evaluate(model, cfg)` calls evaluate_model() (qvae.callable_module says why).
make_callable(__name__, evaluate_model)
