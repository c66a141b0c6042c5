"""Compare backends on one RBM prior: speed, energies, moments, TV and fitted temperature.

The reference is exact enumeration when the visible layer is small enough (≤ 16 units, which
also makes the total variation computable), otherwise a long `gibbs` run. For continuous
backends both the rounded statistics and those of the continuous state are reported, which is how
a user sees "binary from hardware vs continuous from the SDE path".

>>> from backends.testing import random_rbm
>>> res = compare_backends(random_rbm(6, 4), ["exact", "gibbs"], num_samples=2000)
>>> sorted(res["backends"])
['exact', 'gibbs']
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

import backends
from backends.base import Sampler, SampleSet
from qvae.boltzmann import BoltzmannMachine
from qvae.exact_distribution import exact_moments, exact_visible_marginal, total_variation
from qvae.rbm import RBM

#: Visible layers up to this size get an exact reference and a total-variation distance.
EXACT_REFERENCE_UNITS = 16
#: Multinomial draws of exact samples behind the TV noise floor (its mean and 99th percentile).
NOISE_FLOOR_DRAWS = 200
#: |z| of the mean-energy test above which a backend is flagged: 5 standard errors, so that
#: flagging a sampler that does draw from the model is a ~1e-6 event even across many backends.
ENERGY_Z_WARN = 5.0
#: Seconds between "still sampling" lines while one backend runs (progress=True).
HEARTBEAT_S = 15.0


def moments(v: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means of z = [v, h] and the visible–hidden second moments ⟨v hᵀ⟩."""
    v, h = v.double().cpu(), h.double().cpu()
    return {"mean": torch.cat([v.mean(0), h.mean(0)]), "vh": v.T @ h / len(v)}


def reference(rbm: RBM, *, num_samples: int, seed: int) -> dict[str, Any]:
    """Exact moments when enumerable, else moments of a long persistent-Gibbs run."""
    if rbm.n_visible <= EXACT_REFERENCE_UNITS:
        m = exact_moments(rbm)
        model = rbm.float64_copy()
        # E is linear in v, h and v hᵀ, so the exact mean energy follows from the moments.
        energy = -(model.visible_bias @ m["v"] + model.hidden_bias @ m["h"]
                   + (model.effective_weight() * m["vh"]).sum())
        return {"kind": "exact", "mean": torch.cat([m["v"], m["h"]]), "vh": m["vh"],
                "p_visible": exact_visible_marginal(rbm), "mean_energy": float(energy.detach()),
                "mean_energy_se": 0.0}
    chains = min(num_samples, 2000)
    sampler = backends.get_sampler("gibbs", num_chains=chains, burn_in=2000, num_sweeps=20)
    out = sampler.sample(rbm, num_samples, seed=seed)
    energies = out.energy.double().cpu()
    # Standard error over chains, not samples: draws of one chain are correlated.
    return {"kind": f"gibbs ({num_samples} samples, burn-in 2000, 20 sweeps apart)",
            **moments(out.visible, out.hidden), "mean_energy": float(energies.mean()),
            "mean_energy_se": float(energies.std() / math.sqrt(chains))}


@torch.no_grad()
def fit_beta(rbm: RBM, v: torch.Tensor, h: torch.Tensor) -> float:
    """Inverse temperature β maximising the conditional pseudo-likelihood of the samples under
    exp(−β E): Σ log p_β(v | h) + log p_β(h | v). β ≈ 1 means the samples are at temperature 1."""
    model = rbm.float64_copy()
    v, h = v.double().cpu(), h.double().cpu()
    a_v = h @ model.weight.T + model.visible_bias
    a_h = v @ model.weight + model.hidden_bias

    def neg_pl(beta: float) -> float:
        ll = (v * beta * a_v - F.softplus(beta * a_v)).sum()
        ll += (h * beta * a_h - F.softplus(beta * a_h)).sum()
        return -float(ll) / len(v)

    return float(minimize_scalar(neg_pl, bounds=(1e-3, 50.0), method="bounded").x)


@torch.no_grad()
def fit_beta_interval(
    rbm: RBM, v: torch.Tensor, h: torch.Tensor, level: float = 0.95
) -> tuple[float, float, float]:
    """(β, low, high): `fit_beta` and its `level` confidence interval.

    The pseudo-likelihood is not a likelihood, so the interval uses the sandwich (robust)
    variance of an M-estimator, var β̂ = Var(sᵢ) / (n J²), with sᵢ the per-sample score and J the
    mean curvature at β̂; it assumes the samples are independent (one per chain).
    """
    beta = fit_beta(rbm, v, h)
    model = rbm.float64_copy()
    v, h = v.double().cpu(), h.double().cpu()
    a_v = h @ model.weight.T + model.visible_bias
    a_h = v @ model.weight + model.hidden_bias
    p_v, p_h = torch.sigmoid(beta * a_v), torch.sigmoid(beta * a_h)
    score = (a_v * (v - p_v)).sum(1) + (a_h * (h - p_h)).sum(1)
    curvature = float(((a_v**2 * p_v * (1 - p_v)).sum(1) + (a_h**2 * p_h * (1 - p_h)).sum(1))
                      .mean())
    n = len(v)
    if n < 2 or curvature <= 0:
        return beta, -math.inf, math.inf
    se = math.sqrt(float(score.var()) / n) / curvature
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)))
    return beta, beta - z * se, beta + z * se


def tv_noise_floor(
    p: torch.Tensor, num_samples: int, *, draws: int = NOISE_FLOOR_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """(mean, 99th percentile) of the TV that `num_samples` exact samples score against `p`,
    from `draws` multinomial draws. A TV near the mean says nothing against the backend; one
    above the percentile is a real difference. (Σ √(p(1−p)/n), the old floor, bounds E|p̂ − p|
    per state but is loose when n is below the number of states: it exceeded 1, which no TV can.)
    """
    gen = torch.Generator().manual_seed(seed)
    p = p.double().cpu()
    tvs = []
    for _ in range(draws):
        idx = torch.multinomial(p, num_samples, replacement=True, generator=gen)
        counts = torch.bincount(idx, minlength=p.numel()).double()
        tvs.append(0.5 * float((counts / num_samples - p).abs().sum()))
    t = torch.tensor(tvs)
    return float(t.mean()), float(torch.quantile(t, 0.99))


def mixing_warnings(row: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Plain-language flags for samples that are visibly not from the model at β = 1."""
    warn = []
    se = math.hypot(row["mean_energy_se"], ref["mean_energy_se"])
    gap = row["mean_energy"] - ref["mean_energy"]
    if se > 0 and abs(gap) / se > ENERGY_Z_WARN:
        warn.append(f"mean energy {row['mean_energy']:.2f} vs reference "
                    f"{ref['mean_energy']:.2f} (z = {gap / se:.0f}): these samples are not "
                    "from the model; an MCMC backend has not mixed (raise its burn-in/steps)")
    lo, hi = row["beta_fit_ci"]
    if not lo <= 1.0 <= hi:
        warn.append(f"fitted β {row['beta_fit']:.3f}, 95% CI [{lo:.3f}, {hi:.3f}], excludes 1: "
                    "the samples are at another temperature (a QPU's β_eff, or not mixed)")
    if "tv_visible" in row and row["tv_visible"] > row["tv_noise_floor_q99"]:
        warn.append(f"TV {row['tv_visible']:.3f} above what exact samples of this size score "
                    f"(≤ {row['tv_noise_floor_q99']:.3f} in 99% of draws)")
    return warn


@contextmanager
def heartbeat(what: str, every_s: float = HEARTBEAT_S, stream: Any = None) -> Iterator[None]:
    """Print "what ..." now, "what: still running, N s" every `every_s` seconds while the block
    runs, and "what: done in N s" after it: a long sampling call shows it is alive."""
    stream = stream or sys.stdout
    start, stop = time.perf_counter(), threading.Event()
    print(f"  {what} ...", file=stream, flush=True)

    def beat() -> None:
        while not stop.wait(every_s):
            print(f"  {what}: still running, {time.perf_counter() - start:.0f} s", file=stream,
                  flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    print(f"  {what}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def _errors(stats: dict[str, torch.Tensor], ref: dict[str, Any]) -> dict[str, float]:
    d_mean = stats["mean"] - ref["mean"]
    d_vh = stats["vh"] - ref["vh"]
    return {"mean_abs_error_max": float(d_mean.abs().max()),
            "mean_rms_error": float(d_mean.pow(2).mean().sqrt()),
            "pairwise_rms_error": float(d_vh.pow(2).mean().sqrt())}


def summarise(rbm: RBM | BoltzmannMachine, out: SampleSet, ref: dict[str, Any], seconds: float
              ) -> dict[str, Any]:
    if isinstance(rbm, BoltzmannMachine):
        return summarise_bm(rbm, out, ref, seconds)
    stats = moments(out.visible, out.hidden)
    row: dict[str, Any] = {
        "num_samples": len(out),
        "wall_s": seconds,
        "samples_per_s": len(out) / seconds if seconds > 0 else math.inf,
        "mean_energy": float(out.energy.double().mean()),
        "mean_energy_se": float(out.energy.double().std() / math.sqrt(len(out)))
        if len(out) > 1 else 0.0,
        **_errors(stats, ref),
        "means": stats["mean"].tolist(),
        "energies": out.energy.double().cpu().tolist(),
        "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, dict))},
    }
    if "p_visible" in ref:
        p = ref["p_visible"]
        row["tv_visible"] = total_variation(out.visible, p)
        # What exact samples of this size score: near the mean, TV says nothing.
        row["tv_noise_floor"], row["tv_noise_floor_q99"] = tv_noise_floor(p, len(out))
    if out.continuous is not None:  # continuous backends: statistics before rounding too
        cont = out.continuous.double().cpu()
        cont_stats = moments(cont, out.hidden)
        row["continuous"] = {
            **_errors(cont_stats, ref),
            "mean_energy": float(rbm.float64_copy().energy(cont, out.hidden.double().cpu())
                                 .mean().detach()),
            "mean_distance_to_rounded": float((cont - out.visible.double().cpu()).abs().mean()),
        }
    row["beta_fit"], *ci = fit_beta_interval(rbm, out.visible, out.hidden)
    row["beta_fit_ci"] = ci
    row["warnings"] = mixing_warnings(row, ref)
    return row


#: What `qvae compare` compares when --backends is not given (those that can run on the model).
DEFAULT_BACKENDS = ("exact", "gibbs", "neal")


def cannot_run(name: str, sampler: Any, rbm: RBM | BoltzmannMachine) -> str | None:
    """Why backend `name` cannot sample `rbm` here (None when it can), known before sampling."""
    ok, reason = type(sampler).availability()
    if not ok:
        return reason
    if isinstance(rbm, BoltzmannMachine):
        return _cannot_run_bm(name, sampler, rbm)
    max_states = getattr(sampler, "max_states", None)
    n_small = min(rbm.n_visible, rbm.n_hidden)
    if name == "exact" and max_states is not None and 2**n_small > max_states:
        return (f"it would enumerate 2^{n_small} states (the smaller layer has {n_small} units),"
                f" over max_states={max_states}")
    return None


def default_backends(rbm: RBM | BoltzmannMachine) -> tuple[list[str], list[str]]:
    """(names, notes): DEFAULT_BACKENDS less those that cannot run on `rbm`, each with a note."""
    names, notes = [], []
    for name in DEFAULT_BACKENDS:
        why = cannot_run(name, backends.get_sampler(name), rbm)
        if why is None:
            names.append(name)
        else:
            notes.append(f"left out {name}: {why}")
    return names, notes


def compare_backends(
    rbm: RBM | BoltzmannMachine,
    names: list[str],
    *,
    num_samples: int = 1000,
    options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    reference_samples: int = 20000,
    progress: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict[str, Any]:
    """Draw `num_samples` from each backend and score them against the reference (an RBM
    prior, or a BoltzmannMachine's: see `reference_bm`, `summarise_bm`)."""
    rbm.validate()
    options = options or {}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"options given for backends not compared: {unknown}")
    samplers = {name: backends.get_sampler(name, **options.get(name, {})) for name in names}
    refused = {name: why for name, sampler in samplers.items()
               if (why := cannot_run(name, sampler, rbm)) is not None}
    if refused:  # before the reference run, which alone can take a minute
        raise ValueError("cannot compare " + "; ".join(f"{n}: {w}" for n, w in refused.items())
                         + "; leave it out of --backends")
    def watched(what: str):  # progress lines around a call that may take minutes
        return heartbeat(what, heartbeat_s) if progress else _quiet()

    with watched("reference"):
        ref = (reference_bm if isinstance(rbm, BoltzmannMachine) else reference)(
            rbm, num_samples=reference_samples, seed=seed)
    results: dict[str, Any] = {}
    samples: dict[str, SampleSet] = {}
    for name, sampler in samplers.items():
        start = time.perf_counter()
        with watched(f"sampling {name} ({num_samples} samples)"):
            out = sampler.sample(rbm, num_samples, seed=seed)
        results[name] = summarise(rbm, out, ref, time.perf_counter() - start)
        samples[name] = out
    shape = ({"n_units": rbm.n_units, "n_edges": rbm.n_edges,
              "colour_classes": len(rbm.colour_classes)} if isinstance(rbm, BoltzmannMachine)
             else {"n_visible": rbm.n_visible, "n_hidden": rbm.n_hidden})
    return {"reference": ref["kind"], "reference_means": ref["mean"].tolist(),
            "reference_mean_energy": ref["mean_energy"],
            "reference_mean_energy_se": ref["mean_energy_se"], **shape,
            "threads": torch.get_num_threads(), "backends": results, "_samples": samples}


@contextmanager
def _quiet() -> Iterator[None]:
    yield


# ------------------------------------------------- a Boltzmann-machine prior (any graph)
#: What `compare` says instead of an RBM-only statistic for a BoltzmannMachine prior.
NOT_DEFINED = "not defined for this prior"


def moments_bm(bm: BoltzmannMachine, states: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unit means and the pairwise moments ⟨z_i z_j⟩ over the model's couplers (its edges;
    for an RBM these would be all visible–hidden pairs), under key "vh" as for the RBM."""
    z = states.double().cpu()
    i, j = bm.edges[:, 0].cpu(), bm.edges[:, 1].cpu()
    return {"mean": z.mean(0), "vh": (z[:, i] * z[:, j]).mean(0)}


def reference_bm(bm: BoltzmannMachine, *, num_samples: int, seed: int) -> dict[str, Any]:
    """Exact moments and the full-state distribution when the model has at most
    EXACT_REFERENCE_UNITS units, else moments of a long persistent-Gibbs run."""
    if bm.n_units <= EXACT_REFERENCE_UNITS:
        from qvae.rbm import enumerate_states

        p = bm.exact_log_probs().exp()
        states = enumerate_states(bm.n_units, 0, 2**bm.n_units, torch.float64)
        i, j = bm.edges[:, 0].cpu(), bm.edges[:, 1].cpu()
        energy = bm.float64_copy().energy(states).detach()
        return {"kind": "exact", "mean": p @ states, "vh": p @ (states[:, i] * states[:, j]),
                "p_states": p, "mean_energy": float(p @ energy), "mean_energy_se": 0.0}
    chains = min(num_samples, 2000)
    sampler = backends.get_sampler("gibbs", num_chains=chains, burn_in=2000, num_sweeps=20)
    out = sampler.sample(bm, num_samples, seed=seed)
    energies = out.energy.double().cpu()
    return {"kind": f"gibbs ({num_samples} samples, burn-in 2000, 20 sweeps apart)",
            **moments_bm(bm, out.states), "mean_energy": float(energies.mean()),
            "mean_energy_se": float(energies.std() / math.sqrt(chains))}


@torch.no_grad()
def fit_beta_interval_bm(
    bm: BoltzmannMachine, states: torch.Tensor, level: float = 0.95
) -> tuple[float, float, float]:
    """`fit_beta_interval` for any graph: β maximising Σ_u log p_β(z_u | the rest) (each
    unit's full conditional under exp(−β E)), with its sandwich-variance interval."""
    model = bm.float64_copy()
    z = states.double().cpu().to(model.bias.device)
    a = model.local_field(z)

    def neg_pl(beta: float) -> float:
        return -float((z * beta * a - F.softplus(beta * a)).sum()) / len(z)

    beta = float(minimize_scalar(neg_pl, bounds=(1e-3, 50.0), method="bounded").x)
    p = torch.sigmoid(beta * a)
    score = (a * (z - p)).sum(1)
    curvature = float((a**2 * p * (1 - p)).sum(1).mean())
    if len(z) < 2 or curvature <= 0:
        return beta, -math.inf, math.inf
    se = math.sqrt(float(score.var()) / len(z)) / curvature
    q = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)))
    return beta, beta - q * se, beta + q * se


def summarise_bm(bm: BoltzmannMachine, out: SampleSet, ref: dict[str, Any], seconds: float
                 ) -> dict[str, Any]:
    """`summarise` for a BoltzmannMachine prior: moments over units and couplers, TV over the
    full state (exact reference only), fitted β from the full conditionals. The RBM-only
    parts (the relaxation's continuous states) are marked NOT_DEFINED."""
    stats = moments_bm(bm, out.states)
    energies = out.energy.double().cpu()
    row: dict[str, Any] = {
        "num_samples": len(out),
        "wall_s": seconds,
        "samples_per_s": len(out) / seconds if seconds > 0 else math.inf,
        "mean_energy": float(energies.mean()),
        "mean_energy_se": float(energies.std() / math.sqrt(len(out))) if len(out) > 1 else 0.0,
        **_errors(stats, ref),
        "means": stats["mean"].tolist(),
        "energies": energies.tolist(),
        "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, dict))},
    }
    if "p_states" in ref:
        p = ref["p_states"]
        row["tv_visible"] = total_variation(out.states, p)  # over the full state here
        row["tv_noise_floor"], row["tv_noise_floor_q99"] = tv_noise_floor(p, len(out))
    if out.continuous is not None:
        row["continuous"] = NOT_DEFINED + " (the relaxation's continuous states are the RBM's)"
    row["beta_fit"], *ci = fit_beta_interval_bm(bm, out.states)
    row["beta_fit_ci"] = ci
    row["warnings"] = mixing_warnings(row, ref)
    return row


def _cannot_run_bm(name: str, sampler: Any, bm: BoltzmannMachine) -> str | None:
    """Why a backend cannot sample this Boltzmann machine, known before sampling."""
    if name == "exact":
        max_states = getattr(sampler, "max_states", None)
        enumerated = bm.n_units - int(torch.bincount(bm.colour).max())
        if max_states is not None and 2**enumerated > max_states:
            return (f"it would enumerate 2^{enumerated} states (the units outside the largest "
                    f"colour class), over max_states={max_states}")
    general = (type(sampler)._sample_bm is not Sampler._sample_bm
               or sampler.capabilities.general_bqm)
    if len(bm.colour_classes) > 2 and not general:
        return (f"it samples RBMs and bipartite models, not this prior's "
                f"{len(bm.colour_classes)} colour classes")
    return None


def table(result: dict[str, Any]) -> str:
    cols = ["wall_s", "samples_per_s", "mean_energy", "beta_fit", "beta_95ci",
            "mean_rms_error", "pairwise_rms_error", "tv_visible", "tv_noise_floor"]
    ref_energy = result.get("reference_mean_energy")
    lines = [f"reference: {result['reference']}"
             + (f", mean energy {ref_energy:.4g}" if ref_energy is not None else ""),
             f"{'backend':10s} " + " ".join(f"{c:>18s}" for c in cols)]
    warned = []
    for name, row in result["backends"].items():
        shown = dict(row)
        if "beta_fit_ci" in row:
            shown["beta_95ci"] = "[{:.3g}, {:.3g}]".format(*row["beta_fit_ci"])
        cells = [(f"{shown[c]:>18s}" if isinstance(shown[c], str) else f"{shown[c]:18.4g}")
                 if c in shown else f"{'-':>18s}" for c in cols]
        lines.append(f"{name:10s} " + " ".join(cells))
        warned += [f"warning: {name}: {w}" for w in row.get("warnings", [])]
        if isinstance(row.get("continuous"), str):  # a statistic this prior does not define
            lines.append(f"{'  (cont.)':10s} {row['continuous']}")
        elif "continuous" in row:
            c = row["continuous"]
            lines.append(f"{'  (cont.)':10s} {'':>18s} {'':>18s} {c['mean_energy']:18.4g} "
                         f"{'':>18s} {'':>18s} {c['mean_rms_error']:18.4g} "
                         f"{c['pairwise_rms_error']:18.4g}")
    if any("tv_noise_floor" in row for row in result["backends"].values()):
        lines.append("tv_noise_floor: the mean TV of exact samples of the same size (TV near it "
                     "says nothing)")
    return "\n".join(lines + warned)
