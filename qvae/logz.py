"""Log partition function of an RBM: exact enumeration or annealed importance sampling.

AIS follows Salakhutdinov & Murray (2008). The base distribution is the same RBM with zero
couplings, p_0(v, h) ∝ exp(b·v + c·h), whose log Z_0 = Σ softplus(b) + Σ softplus(c) and
samples are exact. Intermediate distributions scale only the couplings,

    p_k(v) ∝ exp(b·v) Π_j (1 + exp(β_k (vW)_j + c_j)),    0 = β_0 < β_1 < ... < β_K = 1,

so β = 0 is exactly the base. Each step adds log p*_k(v) − log p*_{k−1}(v) (visible free
energies: h is summed out, i.e. Rao-Blackwellised) and then makes one block-Gibbs sweep at β_k.
Then Z ≈ Z_0 · mean(w), unbiased for Z; its log is biased low in expectation (Jensen), the more
so the wider the weights spread (too few betas or runs), which is why the spread is reported.

>>> from qvae import RBM
>>> from qvae.logz import ais_log_partition, exact_log_partition
>>> rbm = RBM(8, 6, init_std=0.3, seed=0)
>>> res = ais_log_partition(rbm, num_betas=1000, num_runs=100, seed=0)
>>> abs(res.log_z - exact_log_partition(rbm)) < 0.05
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qvae.rbm import RBM
from qvae.threads import torch_threads

SCHEDULES = ("linear", "sigmoid")
#: Below this many multiply-adds per matmul, the AIS loop runs single-threaded: tiny
#: multithreaded matmuls gain nothing and slow down many-fold when the cores are shared.
SINGLE_THREAD_MAX_WORK = 2**20


@dataclass
class AISResult:
    """An AIS estimate of log Z.

    log_z: log of the mean importance weight (includes log Z_0).
    log_z_std: standard error of log_z (delta method: std(w) / (√R · mean(w))).
    log_z_low, log_z_high: log(Ẑ − 3σ̂) and log(Ẑ + 3σ̂), σ̂ the standard error of the mean
        weight (Salakhutdinov & Murray's convention; low is −inf when Ẑ − 3σ̂ ≤ 0).
    log_weights: per-run log importance weights (float64, (num_runs,)); log_z is their
        log-mean-exp. log_z_base: the exact log Z_0 of the base RBM.
    effective_sample_size: (Σw)² / Σw², between 1 and num_runs.
    """

    log_z: float
    log_z_std: float
    log_z_low: float
    log_z_high: float
    log_weights: torch.Tensor
    log_z_base: float
    effective_sample_size: float
    num_betas: int
    num_runs: int
    seconds: float


@dataclass
class LogZEstimate:
    """log Z with its spread and the method used ("exact" or "ais"; ais holds the details)."""

    log_z: float
    log_z_std: float
    method: str
    log_z_low: float
    log_z_high: float
    ais: AISResult | None = None

    def __float__(self) -> float:
        return self.log_z


def exact_log_partition(rbm: RBM) -> float:
    """Exact log Z by enumerating the smaller layer (float64).

    >>> from qvae import RBM
    >>> round(exact_log_partition(RBM(3, 2, init_std=0.0)), 6) == round(5 * math.log(2), 6)
    True
    """
    return float(rbm.log_partition())


def make_betas(num_betas: int, schedule: str | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse temperatures from 0 to 1 inclusive, float64 (num_betas,) (or a checked custom one).

    "linear" is evenly spaced; "sigmoid" (Grosse et al. 2016) spends more steps near both ends.

    >>> make_betas(3, "linear").tolist()
    [0.0, 0.5, 1.0]
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if isinstance(num_betas, bool) or not isinstance(num_betas, int) or num_betas < 2:
            raise ValueError(f"num_betas must be an int >= 2, got {num_betas!r}")
        t = torch.linspace(0.0, 1.0, num_betas, dtype=torch.float64)
        if schedule == "sigmoid":
            s = torch.sigmoid(4.0 * (2.0 * t - 1.0))
            t = (s - s[0]) / (s[-1] - s[0])
        t[0], t[-1] = 0.0, 1.0
        return t
    betas = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    if (
        betas.numel() < 2
        or not torch.isfinite(betas).all()
        or betas[0] != 0.0
        or betas[-1] != 1.0
        or (betas.diff() < 0).any()
    ):
        raise ValueError("a custom schedule must be non-decreasing, finite, from 0.0 to 1.0")
    return betas


def _anneal(
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    betas: list[float],
    gen: torch.Generator,
    progress: bool,
) -> torch.Tensor:
    """Run the AIS chains from base samples `v`; return Σ_k log p*_k(v_{k-1}) - log p*_{k-1}."""
    (num_runs, nv), nh = v.shape, w.shape[1]
    wt = w.T.contiguous()
    log_w = torch.zeros(num_runs, dtype=torch.float64, device=v.device)
    n_steps = len(betas) - 1
    # Uniforms (float32 is ample for Bernoulli draws) come in chunks of steps to keep the
    # per-step overhead low.
    chunk = max(1, min(512, 2**22 // (num_runs * (nv + nh))))
    bar = tqdm(total=n_steps, desc="AIS", disable=not progress, leave=False)
    for k0 in range(1, n_steps + 1, chunk):
        k1 = min(k0 + chunk, n_steps + 1)
        u = torch.rand(k1 - k0, num_runs, nv + nh, generator=gen, device=v.device)
        for i, k in enumerate(range(k0, k1)):
            a = v @ w
            x = torch.add(c, a, alpha=betas[k])
            # log p*_k(v) - log p*_{k-1}(v); the b·v terms cancel.
            log_w += (F.softplus(x) - F.softplus(torch.add(c, a, alpha=betas[k - 1]))).sum(1)
            if k == n_steps:
                break  # the final transition does not change the weights
            h = (u[i, :, nv:] < torch.sigmoid(x)).to(torch.float64)
            v = (u[i, :, :nv] < torch.sigmoid(torch.add(b, h @ wt, alpha=betas[k]))).to(
                torch.float64
            )
        bar.update(k1 - k0)
    bar.close()
    return log_w


def _log_mean_exp(x: torch.Tensor) -> float:
    return float(torch.logsumexp(x, 0) - math.log(x.numel()))


@torch.no_grad()
def ais_log_partition(
    rbm: RBM,
    *,
    num_betas: int = 10000,
    num_runs: int = 100,
    seed: int = 0,
    schedule: str | Sequence[float] | torch.Tensor = "linear",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AISResult:
    """Estimate log Z by annealed importance sampling from the zero-coupling RBM.

    Args:
        num_betas: number of inverse temperatures including 0 and 1 (ignored for a custom
            schedule, which gives them all).
        num_runs: independent AIS runs (importance weights), vectorised.
        seed: seed of the run's own torch.Generator.
        schedule: "linear", "sigmoid", or a custom non-decreasing sequence from 0 to 1.
        device: where to run (default: the RBM's device). Everything is float64.
        progress: show a tqdm progress bar.

    >>> from qvae import RBM
    >>> r = ais_log_partition(RBM(5, 4, init_std=0.5, seed=1), num_betas=500, num_runs=50)
    >>> r.log_weights.shape
    torch.Size([50])
    """
    rbm.validate()
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive int, got {num_runs!r}")
    betas = make_betas(num_betas, schedule)
    start_time = time.perf_counter()
    model = rbm.float64_copy()
    dev = torch.device(device) if device is not None else model.weight.device
    w, b, c = (p.detach().to(dev) for p in (model.weight, model.visible_bias, model.hidden_bias))
    nv, nh = w.shape
    betas_list = betas.tolist()
    gen = torch.Generator(device=dev).manual_seed(seed)

    log_z_base = float(F.softplus(b).sum() + F.softplus(c).sum())
    v = (
        torch.rand(num_runs, nv, generator=gen, device=dev, dtype=torch.float64) < torch.sigmoid(b)
    ).to(torch.float64)
    log_w = torch.full((num_runs,), log_z_base, dtype=torch.float64, device=dev)
    single = dev.type == "cpu" and num_runs * nv * nh <= SINGLE_THREAD_MAX_WORK
    with torch_threads(1 if single else None):
        log_w += _anneal(v, w, b, c, betas_list, gen, progress)

    return ais_result(log_w.cpu(), log_z_base, len(betas_list), num_runs, start_time)


def ais_result(
    log_w: torch.Tensor, log_z_base: float, num_betas: int, num_runs: int, start_time: float
) -> AISResult:
    """The AIS summary from the per-run log weights (shared by the RBM and BM estimators)."""
    log_z = _log_mean_exp(log_w)
    rel = torch.exp(log_w - log_w.max())  # weights / max weight
    mean_rel = float(rel.mean())
    # Standard error of the mean weight, relative to the mean (delta method for log).
    rel_se = (
        float(rel.std(unbiased=True)) / math.sqrt(num_runs) / mean_rel
        if num_runs > 1
        else float("inf")
    )
    return AISResult(
        log_z=log_z,
        log_z_std=rel_se,
        log_z_low=log_z + math.log(1 - 3 * rel_se) if 3 * rel_se < 1 else float("-inf"),
        log_z_high=log_z + math.log1p(3 * rel_se),
        log_weights=log_w,
        log_z_base=log_z_base,
        effective_sample_size=float(rel.sum() ** 2 / (rel**2).sum()),
        num_betas=num_betas,
        num_runs=num_runs,
        seconds=time.perf_counter() - start_time,
    )


def log_partition(rbm: RBM, *, exact_limit_units: int = 20, **ais_kwargs) -> LogZEstimate:
    """log Z: exact when min(n_visible, n_hidden) <= exact_limit_units, else AIS.

    Keyword arguments beyond `exact_limit_units` go to `ais_log_partition`.

    >>> from qvae import RBM
    >>> log_partition(RBM(30, 10, seed=0)).method
    'exact'
    """
    rbm.validate()
    if min(rbm.n_visible, rbm.n_hidden) <= exact_limit_units:
        value = exact_log_partition(rbm)
        return LogZEstimate(value, 0.0, "exact", value, value)
    res = ais_log_partition(rbm, **ais_kwargs)
    return LogZEstimate(res.log_z, res.log_z_std, "ais", res.log_z_low, res.log_z_high, res)
