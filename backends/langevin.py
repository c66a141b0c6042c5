"""`langevin`: overdamped (unadjusted) Langevin dynamics on the relaxed RBM density π_τ.

Each chain holds u ∈ ℝ^nv and follows Euler–Maruyama on π_τ(u) ∝ exp(−F(σ(u/τ))) Π logistic(u_i)
(`qvae.relax`): u ← u + Δt ∇log π_τ(u) + √(2Δt) ξ. Samples are returned rounded,
visible = 1[u > 0], with h ~ p(h | v) drawn exactly; `continuous` holds σ(u/τ) (the relaxed
visible state in [0, 1]) and `info["u"]` the chain positions themselves.

Two biases, both measured in tests/test_continuous.py and stated in the README section:
the relaxation's (O(τ) in the TV of the rounded law) and the discretisation's (finite Δt; the
kink of π_τ at u_i = 0 has width ~τ, so Δt must be ≪ τ² for the dynamics to feel it). The
`mala` backend removes the second one with a Metropolis–Hastings test.

Chains persist across calls like `gibbs` (PCD): they are re-initialised from the base law
(u_i ~ Logistic(0, 1), the relaxation of Bernoulli(½)) and burned in when the RBM shape, chain
count, device or dtype changes; otherwise a call costs `num_steps` steps per round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from backends._langevin_kernels import LangevinState, init_state, ula_steps
from backends.base import SampleSet, Timer, energies
from backends.chains import (
    Adaptation,
    Advance,
    ChainOptions,
    ChainSampler,
    Plan,
    burn_in,
    run_rounds,
)
from backends.numerics import check_precision, mixing_check
from backends.options import Capabilities, Field
from qvae.rbm import RBM
from qvae.relax import (
    LogDensityFn,
    RelaxParams,
    log_density_and_grad,
    round_visible,
    sample_hidden,
    sample_logistic,
    to_visible,
)
from qvae.threads import torch_threads


class LangevinOptions(ChainOptions):
    """Options of `langevin` (and, with other defaults and more options, of `mala`)."""

    tau: float = Field(0.02, gt=0, description="relaxation temperature τ; the rounded law's "
                       "TV bias is ≈ 0.4-0.5 τ on the reference RBMs")
    step_size: float = Field(4e-4, gt=0, description="Euler-Maruyama step Δt; keep Δt ≲ τ² "
                             "(steps of size √(2Δt) ≫ τ jump over the width-τ band where π_τ "
                             "sees the RBM); a mixed sample costs ≈ 16/Δt steps")
    num_steps: int = Field(2500, ge=1, description="steps per call, and between successive "
                           "rounds when num_samples > num_chains (2500: one time unit at the "
                           "default Δt, so successive calls' samples are correlated, like PCD)")
    burn_in: int = Field(45000, ge=0, description="steps run once when chains are "
                         "(re)initialised (45000: 18 time units, mixes the reference RBMs from "
                         "the base law)")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads while "
                                    "sampling (restored afterwards); None leaves torch's "
                                    "setting; 1 avoids OpenMP stalls on a busy machine")


class Dynamics(NamedTuple):
    """One call's chain algorithm on π_τ, as plain functions over its `dim` coordinates per
    chain: `init(generator)` draws fresh positions from the base law, `advance(generator,
    state, step_size, k)` runs k kernel steps, `adaptation` (or None) tunes the step size
    during burn-in, `to_u` maps a position to u, `report(step_size, round infos)` gives the
    backend facts for `info`."""

    dim: int
    logdensity_fn: LogDensityFn
    init: Callable[[torch.Generator], torch.Tensor]
    advance: Advance[LangevinState, float]
    adaptation: Adaptation[float] | None
    to_u: Callable[[torch.Tensor], torch.Tensor]
    report: Callable[[float, list[Any]], dict[str, Any]]


def relaxed_sample_set(
    rbm: RBM, params: RelaxParams, u: torch.Tensor, generator: torch.Generator, tau: float,
    backend: str, info: dict[str, Any],
) -> SampleSet:
    """The samples of relaxed chains at positions `u`: visible = 1[u > 0], h ~ p(h | v) drawn
    exactly, `continuous` = σ(u/τ), `info["u"]` = u, and the chains' own mixing check."""
    visible = round_visible(u)
    hidden = sample_hidden(params, visible, generator)
    out_device, out_dtype = rbm.weight.device, rbm.weight.dtype
    visible, hidden = visible.to(out_device, out_dtype), hidden.to(out_device, out_dtype)
    energy = energies(rbm, visible, hidden)
    continuous = to_visible(u, tau).to(out_device, out_dtype)
    # samples the RBM makes implausible mean "not mixed"
    mixing = mixing_check(rbm, visible, backend=backend)
    info = {"tau": tau, **info, "u": u.to(out_device, out_dtype), **mixing}
    return SampleSet(visible, hidden, energy, info, continuous=continuous)


class LangevinSampler(ChainSampler):
    """Unadjusted Langevin (Euler–Maruyama) on π_τ with persistent chains (options:
    `LangevinOptions`). The chain state is u (kept as "position" in checkpoints)."""

    name = "langevin"
    Options = LangevinOptions
    capabilities = Capabilities(resource="cpu", output="continuous")
    #: The defaults are the conformance settings. τ = 0.02: relaxation bias TV 0.0096 (6x4) /
    #: 0.0078 (8x8) against tolerances 0.033 / 0.051 at N = 20000, moment bias ≤ 1.8 sd (limit
    #: 5.5). Δt = τ²: the discretisation bias is within the noise at Δt ≤ τ² but adds ≈ 4 sd to
    #: the worst moment at Δt = 2τ² (τ = 0.03, Δt = τ² passes with z = 5.53 of 5.54: too close).
    #: Mixing from the base law takes ≈ 16 time units (TV to π_τ falls by e every ≈ 4), so
    #: burn-in is 45000 steps = 18 time units.
    conformance_options: dict[str, Any] = {"num_threads": 1}
    round_option, step_word, chain_key = "num_steps", "steps", "position"
    #: Work model: a step costs each chain ~STEP_COST × (units + couplings) update-equivalents
    #: (a gradient of F: two matmuls; MALA adds the log density and the reverse proposal), plus
    #: a fixed dispatch cost of many small torch ops (~50 µs for ULA) however small the problem.
    STEP_COST, STEP_OVERHEAD = 1.3, 5e5
    #: Buffers of one chain's state per unit (position, gradient, proposal, noise, …).
    STATE_BUFFERS = 8

    @classmethod
    def state_bytes(cls, plan: Plan, num_samples: int, n_units: int, elem: int) -> float:
        return float(elem * n_units * (2 * cls.STATE_BUFFERS * plan.n_chains + 4 * num_samples))

    def dynamics(self, params: RelaxParams, plan: Plan, n_visible: int) -> Dynamics:
        """This call's chain algorithm: unadjusted Langevin on u with the fixed Δt."""
        o, chains = self.options, self.chains

        def fn(u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            return log_density_and_grad(params, u, o.tau, with_log_density=False)

        def advance(gen: torch.Generator, state: LangevinState, step: float, k: int
                    ) -> tuple[LangevinState, None]:
            return ula_steps(gen, state, fn, step, k)

        def init(gen: torch.Generator) -> torch.Tensor:
            return sample_logistic((plan.n_chains, n_visible), gen, device=chains.device,
                                   dtype=chains.dtype)

        return Dynamics(n_visible, fn, init, advance, None, lambda position: position,
                        lambda step, runs: {"step_size": step})

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        o, chains = self.options, self.chains
        with torch_threads(o.num_threads):
            with timer("preprocess"):
                check_precision(rbm, chains.dtype, backend=self.name)
                gen = chains.generator(seed)
                params = RelaxParams.from_rbm(rbm, chains.device, chains.dtype)
                plan = self.plan(num_samples, rbm.n_units)
                dyn = self.dynamics(params, plan, rbm.n_visible)
                kept = chains.resume((plan.n_chains, dyn.dim))
            with timer("sample"):
                if kept is None:  # fresh chains from the base law, burned in
                    state, step, tuned = burn_in(dyn.advance, gen,
                                                 init_state(dyn.init(gen), dyn.logdensity_fn),
                                                 o.step_size, o.burn_in, dyn.adaptation)
                else:  # the RBM may have changed since the last call: re-evaluate log π
                    state = init_state(kept["position"], dyn.logdensity_fn)
                    step, tuned = kept.get("step_size", o.step_size), {}
                state, runs = run_rounds(dyn.advance, gen, state, step, plan.rounds,
                                         o.num_steps)
                # an adapted step size belongs to the chains it was adapted on
                chains.keep(state.position, **({"step_size": step} if dyn.adaptation else {}))
            with timer("postprocess"):
                u = torch.cat([dyn.to_u(s.position) for s, _ in runs])[:num_samples]
                info = {**self.chain_info(plan, kept is None),
                        **dyn.report(step, [info for _, info in runs]), **tuned}
                return relaxed_sample_set(rbm, params, u, gen, o.tau, self.name, info)
