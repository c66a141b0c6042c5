"""Log partition function of a `BoltzmannMachine`: exact when enumerable, AIS otherwise.

The same interface as `qvae.logz` for RBMs (`AISResult`, `LogZEstimate`, the schedules).

AIS anneals from the independent-units base p_0(z) ∝ exp(b·z) (biases kept, couplings off:
log Z_0 = Σ softplus(b), exact samples) to the model, scaling only the couplings:

    p*_β(z) = exp(b·z + β Σ_edges J_ij z_i z_j),    0 = β_0 < β_1 < ... < β_K = 1.

As in the RBM's AIS, one colour class C (the largest; `BoltzmannMachine.summed_class`) is
summed out analytically, since given the rest r its units are independent:

    log p*_β(r) = b_r·r + β E_rr(r) + Σ_{u∈C} softplus(b_u + β (J r)_u),

where E_rr sums the couplings among the other units. Each step adds log p*_k(r) − log p*_{k−1}(r)
and then makes one block-Gibbs sweep at β_k: C drawn from its exact conditional first, then the
other colour classes in turn, which leaves p_k(r) invariant. Z ≈ Z_0 · mean(w).

>>> from qvae.boltzmann_graphs import multipartite
>>> bm = multipartite([4, 4, 4], scale=0.5, seed=0)
>>> res = ais_log_partition(bm, num_betas=500, num_runs=100, seed=0)
>>> abs(res.log_z - exact_log_partition(bm)) < 4 * res.log_z_std + 0.01
True
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qvae import cancel
from qvae.boltzmann import BoltzmannMachine, coupled_field
from qvae.logz import SINGLE_THREAD_MAX_WORK, AISResult, LogZEstimate, ais_result, make_betas
from qvae.threads import torch_threads


def exact_log_partition(bm: BoltzmannMachine) -> float:
    """Exact log Z (float64): the largest colour class summed out, the rest enumerated."""
    return float(bm.log_partition())


@torch.no_grad()
def ais_log_partition(
    bm: BoltzmannMachine,
    *,
    num_betas: int = 10000,
    num_runs: int = 100,
    seed: int = 0,
    schedule: str | Sequence[float] | torch.Tensor = "linear",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AISResult:
    """Estimate log Z by AIS from the independent-units base; the arguments and the result are
    those of `qvae.logz.ais_log_partition` (log_z, log_z_std its standard error, ...)."""
    bm.validate()
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive int, got {num_runs!r}")
    betas = make_betas(num_betas, schedule).tolist()
    start_time = time.perf_counter()
    model = bm.float64_copy()
    dev = torch.device(device) if device is not None else model.bias.device
    model.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    b, j, edges = model.bias.detach(), model.coupling.detach(), model.edges
    summed_colour = model.summed_class()
    classes = model.colour_classes
    summed = classes[summed_colour]
    others = [c for k, c in enumerate(classes) if k != summed_colour]
    rows = {k: model.coupling_rows(c) for k, c in enumerate(classes)}
    rest_edge = (model.colour[edges] != summed_colour).all(1)  # both ends outside C
    ri, rj, rJ = edges[rest_edge, 0], edges[rest_edge, 1], j[rest_edge]

    log_z_base = float(F.softplus(b).sum())
    z = (torch.rand(num_runs, model.n_units, generator=gen, device=dev, dtype=torch.float64)
         < torch.sigmoid(b)).to(torch.float64)
    log_w = torch.full((num_runs,), log_z_base, dtype=torch.float64, device=dev)
    work = num_runs * max(1, 2 * model.n_edges)
    single = dev.type == "cpu" and work <= SINGLE_THREAD_MAX_WORK
    n_steps = len(betas) - 1
    bar = tqdm(total=n_steps, desc="AIS", disable=not progress, leave=False)
    with torch_threads(1 if single else None):
        for k in range(1, n_steps + 1):
            e_rr = (z[:, ri] * z[:, rj]) @ rJ
            a = coupled_field(rows[summed_colour], z)
            log_w += (betas[k] - betas[k - 1]) * e_rr + (
                F.softplus(torch.add(b[summed], a, alpha=betas[k]))
                - F.softplus(torch.add(b[summed], a, alpha=betas[k - 1]))
            ).sum(1)
            if k == n_steps:
                break  # the final transition does not change the weights
            p = torch.sigmoid(torch.add(b[summed], a, alpha=betas[k]))
            z[:, summed] = _draw(p, gen)
            for c in others:
                k_c = int(model.colour[c[0]])
                field = coupled_field(rows[k_c], z)
                z[:, c] = _draw(torch.sigmoid(torch.add(b[c], field, alpha=betas[k])), gen)
            bar.update(1)
            if k % 256 == 0:
                cancel.check()  # a service's wall-time limit or shutdown stops it here
    bar.close()
    return ais_result(log_w.cpu(), log_z_base, len(betas), num_runs, start_time)


def _draw(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype) < p).to(p.dtype)


def log_partition(
    bm: BoltzmannMachine, *, exact_limit_units: int = 20, **ais_kwargs
) -> LogZEstimate:
    """log Z: exact when at most `exact_limit_units` units lie outside the largest colour class
    (those are the enumerated ones), else AIS (keyword arguments go to `ais_log_partition`).

    >>> from qvae.boltzmann_graphs import multipartite
    >>> log_partition(multipartite([30, 8, 8], seed=0)).method
    'exact'
    """
    bm.validate()
    enumerated = bm.n_units - int(torch.bincount(bm.colour).max())
    if enumerated <= exact_limit_units:
        value = exact_log_partition(bm)
        return LogZEstimate(value, 0.0, "exact", value, value)
    res = ais_log_partition(bm, **ais_kwargs)
    return LogZEstimate(res.log_z, res.log_z_std, "ais", res.log_z_low, res.log_z_high, res)
