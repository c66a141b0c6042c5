"""log Z from replica exchange: a certified lower bound, and a stepping-stone estimate.

Why: AIS (`qvae.logz`) starts its chains at the bias-only base and switches the couplings on
slowly. When the prior has a deep mode that appears abruptly along that path (a first-order
transition: a block of units that pays its biases and wins on its couplings), the chains stay in
the basin they were in, every run misses the mode the same way, and AIS reports a log Z far too
low with a small spread, so every NLL computed from it is too good by the same margin. PCD
training can grow exactly such modes when its persistent chains never visit them. Two tools:

- `log_z_lower_bound`: log Z = log Σ_x exp(−E(x)) ≥ −E(x) for every state x, and for an RBM,
  summing out a layer, log Z ≥ −F(h) and ≥ −F(v). Replica-exchange Gibbs chains started from
  random states find the low free-energy states, and the largest −F among them is a bound that
  no sampling error can break (it is one number computed exactly from one state). An AIS
  estimate below it is wrong, whatever its spread says.
- `pt_log_partition`: replica exchange over a ladder 1 = β_0 > … > β_{K−1} = 0 of p_β ∝
  exp(−β E), whose β = 0 end is uniform (log Z = (n_v + n_h) log 2), and the stepping-stone
  identity Z(β_k)/Z(β_{k+1}) = E_{β_{k+1}}[exp(−(β_k − β_{k+1}) E)], Rao-Blackwellised over v
  given h (for a Boltzmann machine on any graph, over its largest colour class given the
  rest). The swaps carry configurations found at one temperature to the others, so the deep
  mode is represented at every β where it matters; the estimate is consistent (sweeps → ∞)
  even where AIS's path is trapped. Its spread is over independent groups of chains.

>>> from qvae import RBM
>>> from qvae.logz import exact_log_partition
>>> rbm = RBM(8, 6, init_std=0.5, seed=0)
>>> est = pt_log_partition(rbm, num_replicas=40, num_chains=40, burn_in=100, num_sweeps=300)
>>> abs(est.log_z - exact_log_partition(rbm)) < 0.1
True
>>> log_z_lower_bound(rbm).value <= exact_log_partition(rbm)
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from backends.gibbs import gibbs_sweeps
from backends.tempering import ReplicaExchange
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM
from qvae.threads import torch_threads

#: Independent groups of chains the stepping-stone spread is measured over.
PT_GROUPS = 10
#: Sweeps between the stepping-stone measurements (successive sweeps are strongly correlated:
#: measuring every one costs a matmul per sweep and adds little).
MEASURE_EVERY = 2


@dataclass
class LogZBound:
    """A certified lower bound on log Z: −F (or −E) of the best state the chains found."""

    value: float
    method: str
    states_checked: int
    seconds: float


@dataclass
class PTResult:
    """A replica-exchange stepping-stone estimate of log Z.

    log_z_std: standard error from the spread of PT_GROUPS independent groups of chains.
    swap_acceptance: each adjacent pair's mean swap acceptance after burn-in (a pair near 0 is
    a gap in the ladder: more replicas).
    """

    log_z: float
    log_z_std: float
    num_replicas: int
    num_chains: int
    num_sweeps: int
    swap_acceptance: list[float]
    seconds: float


class LogZBelowBound(ValueError):
    """A log Z estimate below a certified lower bound: the estimate missed the prior's mass."""


@torch.no_grad()
def log_z_lower_bound(prior: RBM | BoltzmannMachine, *, num_chains: int = 100,
                      num_replicas: int = 16, min_beta: float = 0.2, burn_in: int = 500,
                      seed: int = 0) -> LogZBound:
    """max over the states replica-exchange Gibbs chains reach of −F(h), −F(v) (RBM) or −E(z)
    (Boltzmann machine): each is ≤ log Z exactly, so their maximum is too.

    `num_chains` chains × `num_replicas` replicas (geometric ladder 1 … `min_beta`) run
    `burn_in` sweeps from uniform random states; the target replica's final states and every
    replica's are checked (a state is a state: any of them bounds log Z).
    """
    from backends.registry import get_sampler  # the backends import qvae: import late

    start = time.perf_counter()
    sampler = get_sampler("gibbs", num_chains=num_chains, burn_in=burn_in, num_sweeps=1,
                          num_replicas=num_replicas, min_beta=min_beta, persistent=False,
                          dtype="float64")
    with torch_threads(1):
        res = sampler.sample(prior, num_chains, seed=seed)
    if isinstance(prior, RBM):
        model = prior.float64_copy()
        v, h = res.visible.double(), res.hidden.double()
        bound = torch.cat([-model.free_energy(v), -model.hidden_free_energy(h)]).max()
        method, checked = "max of -F(v), -F(h) over replica-exchange states", 2 * len(v)
    else:
        bound = (-res.energy.double()).max()
        method, checked = "max of -E(z) over replica-exchange states", len(res.energy)
    return LogZBound(float(bound), method, checked, time.perf_counter() - start)


def trap_rbm(n: int = 16, a: float = 5.0) -> RBM:
    """A known-answer RBM that AIS gets badly wrong: n + n units, every coupling 1, every bias
    −a. The all-on state (energy 2na − n², −96 for the defaults) carries almost all the mass,
    but from AIS's bias-only base, where each unit is on with probability σ(−a), more than a
    units must switch on together to reach it, so AIS's chains never do and its estimate sits
    near the 'all off' basin's log Z (about 0). Exact log Z by enumeration: n ≤ 24 is cheap.

    >>> from qvae.logz import exact_log_partition
    >>> round(exact_log_partition(trap_rbm()), 2)
    96.0
    """
    rbm = RBM(n, n, init_std=0.0, seed=0)
    with torch.no_grad():
        rbm.weight.fill_(1.0)
        rbm.visible_bias.fill_(-a)
        rbm.hidden_bias.fill_(-a)
    return rbm


def refuted(log_z: float, log_z_std: float, bound: float) -> bool:
    """Whether an estimate lies below a certified bound by more than 3 of its standard errors
    (log Z ≥ bound holds exactly, so only the estimate's own noise may excuse it)."""
    slack = 3 * log_z_std if math.isfinite(log_z_std) else 0.0
    return log_z + slack < bound


def check_above_bound(log_z: float, log_z_std: float, bound: LogZBound, method: str) -> None:
    """Raise `LogZBelowBound` when the bound `refuted` the estimate."""
    if refuted(log_z, log_z_std, bound.value):
        raise LogZBelowBound(
            f"the {method} estimate of log Z ({log_z:.2f} ± {log_z_std:.2f}) is below "
            f"{bound.value:.2f}, a certified lower bound ({bound.method}): the estimate missed "
            f"the prior's dominant mode, so an NLL from it would be at least "
            f"{bound.value - log_z:.1f} nats too low; estimate log Z with --logz pt "
            "(eval.logz: pt, replica exchange) instead")


def default_ladder(num_replicas: int) -> list[float]:
    """1 = β_0 > … > β_{K−1} = 0, uniform in √β: denser near β = 0, where the near-uniform
    distribution has the widest energy spread and the stepping stones need the smallest steps."""
    if num_replicas < 3:
        raise ValueError(f"num_replicas must be >= 3, got {num_replicas}")
    return [(1 - k / (num_replicas - 1)) ** 2 for k in range(num_replicas)]


def _log_step_weights(h: torch.Tensor, model: RBM, betas: torch.Tensor, n: int) -> torch.Tensor:
    """(K−1, chains) log E_{v|h}[exp(−(β_k − β_{k+1}) E(v, h))] for h at β_{k+1}, k = 0..K−2:
    (β_k − β_{k+1}) c·h + Σ_i softplus(β_k a_i) − softplus(β_{k+1} a_i), a = b + W h."""
    k = betas.numel()
    h = h.view(k, n, -1)[1:]  # the states at β_1 … β_{K−1}
    a = torch.matmul(h, model.weight.T).add_(model.visible_bias)  # (K−1, n, nv)
    hi, lo = betas[:-1].view(-1, 1, 1), betas[1:].view(-1, 1, 1)
    spread = (F.softplus(hi * a) - F.softplus(lo * a)).sum(-1)
    return spread + (hi - lo).squeeze(-1) * (h @ model.hidden_bias)


def _bm_log_step_weights(z: torch.Tensor, model: BoltzmannMachine, summed: torch.Tensor,
                         rows: torch.Tensor, betas: torch.Tensor, n: int) -> torch.Tensor:
    """The same for a Boltzmann machine, Rao-Blackwellised over its colour class `summed`
    (independent given the rest r, as AIS and exact enumeration sum it out): with z_C = 0,
    (β_k − β_{k+1})(−E(r)) + Σ_{u∈C} softplus(β_k a_u) − softplus(β_{k+1} a_u), a = b_C + J_C r.
    `z`: (K·n, units) in the model's own unit order; `rows`: J[C, :] dense."""
    k = betas.numel()
    r = z.view(k, n, -1)[1:].clone()
    r[..., summed] = 0
    neg_e = -model.sample_energy(r.flatten(0, 1)).view(k - 1, n)
    a = torch.matmul(r, rows.T).add_(model.bias[summed])  # (K−1, n, |C|)
    hi, lo = betas[:-1].view(-1, 1, 1), betas[1:].view(-1, 1, 1)
    spread = (F.softplus(hi * a) - F.softplus(lo * a)).sum(-1)
    return spread + (hi - lo).squeeze(-1) * neg_e


def _rbm_chains(rbm: RBM, exchange: ReplicaExchange, gen: torch.Generator, n: int) -> tuple[
        int, Callable[[int], None], Callable[[torch.Tensor], torch.Tensor]]:
    """(units, advance(sweeps), log step weights(betas)) of an RBM's replica-exchange chains:
    the state is h, v is summed out."""
    model = rbm.float64_copy()
    w, b, c = (p.float() for p in (model.weight, model.visible_bias, model.hidden_bias))
    state = [torch.bernoulli(torch.full((exchange.rows, model.n_hidden), 0.5, device=w.device),
                             generator=gen)]

    def advance(sweeps: int) -> None:
        state[0] = gibbs_sweeps(state[0], w, b, c, sweeps, gen, exchange=exchange)[1]

    def weights(betas: torch.Tensor) -> torch.Tensor:
        return _log_step_weights(state[0].double(), model, betas, n)

    return model.n_units, advance, weights


def _bm_chains(bm: BoltzmannMachine, exchange: ReplicaExchange, gen: torch.Generator,
               n: int) -> tuple[int, Callable[[int], None],
                                Callable[[torch.Tensor], torch.Tensor]]:
    """The same for a Boltzmann machine on any graph: colour-class block Gibbs (the gibbs
    backend's kernel), the largest class summed out in the measurements."""
    from backends.gibbs import colour_blocks, colour_gibbs_sweeps

    model = bm.float64_copy()
    device = model.bias.device
    order, blocks = colour_blocks(model, 1.0, device, torch.float32)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    summed = model.colour_classes[model.summed_class()]
    rows = model.coupling_rows(summed, layout="dense")
    state = [torch.bernoulli(torch.full((model.n_units, exchange.rows), 0.5, device=device),
                             generator=gen)]

    def advance(sweeps: int) -> None:
        state[0] = colour_gibbs_sweeps(state[0], blocks, sweeps, gen, exchange=exchange)

    def weights(betas: torch.Tensor) -> torch.Tensor:
        z = state[0].T[:, position].double()  # the model's unit order
        return _bm_log_step_weights(z, model, summed, rows, betas, n)

    return model.n_units, advance, weights


@torch.no_grad()
def pt_log_partition(prior: RBM | BoltzmannMachine, *, num_replicas: int = 200,
                     num_chains: int = 100, burn_in: int = 1000, num_sweeps: int = 2000,
                     seed: int = 0, progress: bool = False) -> PTResult:
    """log Z of an RBM or a Boltzmann machine on any graph by replica exchange and stepping
    stones (module docstring): the chains run in float32 (their states are 0/1, exactly), the
    measurements in float64. An RBM's chains are the gibbs backend's block sweeps with v
    summed out; a Boltzmann machine's are its colour-class sweeps with the largest class
    summed out.

    `num_chains` chains (a multiple of 10: their groups give the spread) each run
    `num_replicas` replicas on `default_ladder`; `burn_in` sweeps, then `num_sweeps` sweeps
    measured every `MEASURE_EVERY`. Work: (burn_in + num_sweeps) sweeps of num_replicas ×
    num_chains states.
    """
    if not isinstance(prior, RBM | BoltzmannMachine):
        raise TypeError(f"pt_log_partition takes an RBM or a BoltzmannMachine, got "
                        f"{type(prior).__name__}")
    prior.validate()
    for name, value, low in (("num_replicas", num_replicas, 3), ("num_chains", num_chains,
                             PT_GROUPS), ("burn_in", burn_in, 0),
                             ("num_sweeps", num_sweeps, MEASURE_EVERY)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_chains % PT_GROUPS:
        raise ValueError(f"num_chains must be a multiple of {PT_GROUPS}, got {num_chains}")
    start = time.perf_counter()
    device = (prior.weight if isinstance(prior, RBM) else prior.bias).device
    gen = torch.Generator(device=device).manual_seed(seed)
    exchange = ReplicaExchange(default_ladder(num_replicas), num_chains, device=device,
                               dtype=torch.float32)
    chains = _rbm_chains if isinstance(prior, RBM) else _bm_chains
    n_units, advance, step_weights = chains(prior, exchange, gen, num_chains)
    beta_t = exchange.betas.double()
    measures = num_sweeps // MEASURE_EVERY
    # running log-sum-exp per (step, group): log Σ over measured sweeps and the group's chains
    log_sums = torch.full((num_replicas - 1, PT_GROUPS), -math.inf, dtype=torch.float64)
    bar = tqdm(total=burn_in + measures * MEASURE_EVERY, desc="log Z (replica exchange)",
               unit="sweep", disable=not progress, leave=False)
    with torch_threads(1 if exchange.rows * n_units < 2**16 else None):
        if burn_in:
            advance(burn_in)
            bar.update(burn_in)
        exchange.clear()  # the acceptance reported is the measured sweeps'
        for _ in range(measures):
            advance(MEASURE_EVERY)
            lw = step_weights(beta_t).view(num_replicas - 1, PT_GROUPS, -1)
            log_sums = torch.logaddexp(log_sums, torch.logsumexp(lw, -1).cpu())
            bar.update(MEASURE_EVERY)
    bar.close()
    per_group = num_chains // PT_GROUPS * measures
    log_z0 = n_units * math.log(2)
    groups = log_z0 + (log_sums - math.log(per_group)).sum(0)  # one estimate per group
    log_z = log_z0 + float((torch.logsumexp(log_sums, 1) - math.log(per_group * PT_GROUPS))
                           .sum())
    std = float(groups.std(unbiased=True)) / math.sqrt(PT_GROUPS)
    return PTResult(log_z, std, num_replicas, num_chains, num_sweeps, exchange.acceptance(),
                    time.perf_counter() - start)
