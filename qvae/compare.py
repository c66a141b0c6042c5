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
import time
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

import backends
from backends.base import SampleSet
from backends.testing import exact_moments, exact_visible_marginal, total_variation
from qvae.rbm import RBM

#: Visible layers up to this size get an exact reference and a total-variation distance.
EXACT_REFERENCE_UNITS = 16


def moments(v: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means of z = [v, h] and the visible–hidden second moments ⟨v hᵀ⟩."""
    v, h = v.double().cpu(), h.double().cpu()
    return {"mean": torch.cat([v.mean(0), h.mean(0)]), "vh": v.T @ h / len(v)}


def reference(rbm: RBM, *, num_samples: int, seed: int) -> dict[str, Any]:
    """Exact moments when enumerable, else moments of a long persistent-Gibbs run."""
    if rbm.n_visible <= EXACT_REFERENCE_UNITS:
        m = exact_moments(rbm)
        return {"kind": "exact", "mean": torch.cat([m["v"], m["h"]]), "vh": m["vh"],
                "p_visible": exact_visible_marginal(rbm)}
    sampler = backends.get_sampler("gibbs", num_chains=min(num_samples, 2000), burn_in=2000,
                                   num_sweeps=20)
    out = sampler.sample(rbm, num_samples, seed=seed)
    return {"kind": f"gibbs ({num_samples} samples, burn-in 2000, 20 sweeps apart)",
            **moments(out.visible, out.hidden)}


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


def _errors(stats: dict[str, torch.Tensor], ref: dict[str, Any]) -> dict[str, float]:
    d_mean = stats["mean"] - ref["mean"]
    d_vh = stats["vh"] - ref["vh"]
    return {"mean_abs_error_max": float(d_mean.abs().max()),
            "mean_rms_error": float(d_mean.pow(2).mean().sqrt()),
            "pairwise_rms_error": float(d_vh.pow(2).mean().sqrt())}


def summarise(rbm: RBM, out: SampleSet, ref: dict[str, Any], seconds: float) -> dict[str, Any]:
    stats = moments(out.visible, out.hidden)
    row: dict[str, Any] = {
        "num_samples": len(out),
        "wall_s": seconds,
        "samples_per_s": len(out) / seconds if seconds > 0 else math.inf,
        "mean_energy": float(out.energy.double().mean()),
        "beta_fit": fit_beta(rbm, out.visible, out.hidden),
        **_errors(stats, ref),
        "means": stats["mean"].tolist(),
        "energies": out.energy.double().cpu().tolist(),
        "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str, dict))},
    }
    if "p_visible" in ref:
        p = ref["p_visible"]
        row["tv_visible"] = total_variation(out.visible, p)
        # What exact samples of this size would score: below it, TV says nothing.
        row["tv_noise_floor"] = 0.5 * float(torch.sqrt(p * (1 - p) / len(out)).sum())
    if out.continuous is not None:  # continuous backends: statistics before rounding too
        cont = out.continuous.double().cpu()
        cont_stats = moments(cont, out.hidden)
        row["continuous"] = {
            **_errors(cont_stats, ref),
            "mean_energy": float(rbm.float64_copy().energy(cont, out.hidden.double().cpu())
                                 .mean()),
            "mean_distance_to_rounded": float((cont - out.visible.double().cpu()).abs().mean()),
        }
    return row


def compare_backends(
    rbm: RBM,
    names: list[str],
    *,
    num_samples: int = 1000,
    options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    reference_samples: int = 20000,
    progress: bool = False,
) -> dict[str, Any]:
    """Draw `num_samples` from each backend and score them against the reference."""
    rbm.validate()
    options = options or {}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"options given for backends not compared: {unknown}")
    samplers = {name: backends.get_sampler(name, **options.get(name, {})) for name in names}
    ref = reference(rbm, num_samples=reference_samples, seed=seed)
    results: dict[str, Any] = {}
    samples: dict[str, SampleSet] = {}
    for name, sampler in samplers.items():
        if progress:
            print(f"  sampling {name} ...", flush=True)
        start = time.perf_counter()
        out = sampler.sample(rbm, num_samples, seed=seed)
        results[name] = summarise(rbm, out, ref, time.perf_counter() - start)
        samples[name] = out
    return {"reference": ref["kind"], "reference_means": ref["mean"].tolist(),
            "n_visible": rbm.n_visible, "n_hidden": rbm.n_hidden, "backends": results,
            "_samples": samples}


def table(result: dict[str, Any]) -> str:
    cols = ["wall_s", "samples_per_s", "mean_energy", "beta_fit", "mean_rms_error",
            "pairwise_rms_error", "tv_visible", "tv_noise_floor"]
    lines = [f"reference: {result['reference']}",
             f"{'backend':10s} " + " ".join(f"{c:>18s}" for c in cols)]
    # tv_noise_floor bounds the TV that exact samples of the same size would show.
    for name, row in result["backends"].items():
        cells = [f"{row[c]:18.4g}" if c in row else f"{'-':>18s}" for c in cols]
        lines.append(f"{name:10s} " + " ".join(cells))
        if "continuous" in row:
            c = row["continuous"]
            lines.append(f"{'  (cont.)':10s} {'':>18s} {'':>18s} {c['mean_energy']:18.4g} "
                         f"{'':>18s} {c['mean_rms_error']:18.4g} {c['pairwise_rms_error']:18.4g}")
    return "\n".join(lines)
