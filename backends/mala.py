"""`mala`: Metropolis-adjusted Langevin on the relaxed RBM density π_τ — exact for π_τ.

The `langevin` proposal u' = u + Δt ∇log π_τ(u) + √(2Δt) ξ followed by a Metropolis–Hastings
test, so the only bias left in the rounded samples is the relaxation's (O(τ); `qvae.relax`).
During burn-in (and only then) Δt is adapted by Robbins–Monro on log Δt toward a mean
acceptance of 0.574; the adapted Δt is kept with the chains (`state_dict`) and later calls
sample with it unchanged, so the chain is a fixed π_τ-reversible kernel after burn-in.

Units within a few τ of the kink u_i = 0 see a gradient ~|μ|/(4τ) and curvature ~|μ|/τ², so
one Δt cannot suit both them and the bulk: with a Δt good for the bulk (~0.1) a chain with one
unit in the kink (≈ 2 nv τ of the mass) rejects every proposal and sticks for hundreds of steps
(measured: with Δt = 0.3, τ = 0.02 on the 8x8 reference RBM the TV stalls at 0.045 > 0.026
from noise). The proposal therefore uses a per-unit, position-dependent step (a diagonal
preconditioner, "simplified manifold MALA")

    D_i(u) = 1 / (1/Δt + c σ'(u_i/τ) / τ²),

which is Δt in the bulk and ≈ 4τ²/c at the kink; the MH ratio evaluates the reverse proposal
with D(u'), so the kernel stays exact. `precondition=0` gives plain MALA (D = Δt).

`extended=True` runs the chains on the extended state Φ = (ℓ, g) (docs/relaxation.md),
v = σ((ℓ+g)/τ), with a Gumbel density on g and the mirrored Gumbel density on ℓ: a proper
joint whose ℓ + g marginal is π_τ itself (`qvae.relax.extended_log_density`).
"""

from __future__ import annotations

from typing import Any

import torch

from backends._langevin_kernels import (
    TARGET_ACCEPTANCE,
    LangevinState,
    MALARunInfo,
    StepSize,
    mala_steps,
)
from backends.adaptation import StepSizeAdaptation
from backends.chains import Plan
from backends.langevin import Dynamics, LangevinOptions, LangevinSampler
from backends.options import Capabilities, Field
from qvae.relax import (
    RelaxParams,
    extended_log_density_and_grad,
    extended_to_u,
    log_density_and_grad,
    sample_gumbel,
    sample_logistic,
)


def kink_step(
    step_size: float, tau: float, strength: float, extended: bool = False
) -> StepSize:
    """The proposal's per-unit step D_i(u) = 1/(1/Δt + c σ'(u_i/τ)/τ²) (Δt if c = 0).

    For the extended state Φ = [ℓ ‖ g] both ℓ_i and g_i get the step of u_i = ℓ_i + g_i.
    """
    if strength == 0:
        return step_size
    inv_step, scale = 1.0 / step_size, strength / tau**2

    def step(position: torch.Tensor) -> torch.Tensor:
        u = extended_to_u(position) if extended else position
        x = u / tau
        d = 1.0 / (inv_step + scale * torch.sigmoid(x) * torch.sigmoid(-x))
        return d.repeat(1, 2) if extended else d

    return step


class MALAOptions(LangevinOptions):
    tau: float = Field(0.01, gt=0, description="relaxation temperature τ; the rounded law's "
                       "TV bias is ≈ 0.4-0.5 τ on the reference RBMs (MH removes the Δt bias)")
    step_size: float = Field(0.1, gt=0, description="initial step Δt; adapted during burn-in "
                             "when adapt is true, fixed otherwise")
    num_steps: int = Field(50, ge=1, description="MALA steps per call, and between successive "
                           "rounds when num_samples > num_chains")
    burn_in: int = Field(2000, ge=0, description="steps run (and adapted over) once when "
                         "chains are (re)initialised (2000 suits a 12x30 RBM with couplings "
                         "N(0, 0.7²); the reference RBMs mix in ≈ 300)")
    extended: bool = Field(False, description="sample the extended state (ℓ, g) instead of u")
    precondition: float = Field(1.0, ge=0, description="strength c of the kink preconditioner "
                                "D_i(u) = 1/(1/Δt + c σ'(u_i/τ)/τ²); 0 gives plain MALA")
    adapt: bool = Field(True, description="adapt Δt during burn-in toward target_acceptance")
    target_acceptance: float = Field(TARGET_ACCEPTANCE, gt=0, lt=1, description="the mean "
                                     "acceptance probability the adaptation aims for")


class MALASampler(LangevinSampler):
    """MALA on π_τ (or on the extended state) with persistent chains and burn-in adaptation
    (options: `MALAOptions`). The adapted Δt is kept with the chains ("step_size")."""

    name = "mala"
    Options = MALAOptions
    capabilities = Capabilities(resource="cpu", output="continuous")
    #: τ = 0.01 (default): relaxation bias TV 0.0048 (6x4) / 0.0039 (8x8), moments ≤ 0.9 sd,
    #: against tolerances 0.033 / 0.051 at N = 20000; MH makes the kernel exact for π_τ, so no
    #: Δt bias. The reference RBMs mix in ≈ 300 steps (TV to π_τ at the noise floor), so the
    #: suite runs with a 500-step burn-in; the default 2000 is for harder models (a 12x30 RBM
    #: with couplings N(0, 0.7²) needs ≈ 2000).
    #: One torch thread: see `langevin` (num_threads).
    conformance_options: dict[str, Any] = {"burn_in": 500, "num_threads": 1}
    chain_numbers = ("step_size",)
    #: Work model (see `langevin`): a MALA step costs ~4× a ULA step per chain (measured).
    STEP_COST, STEP_OVERHEAD = 4.0, 1e6

    def dynamics(self, params: RelaxParams, plan: Plan, n_visible: int) -> Dynamics:
        """This call's chain algorithm: MALA on u (or Φ = [ℓ ‖ g]) with the kink
        preconditioner, Δt adapted during burn-in."""
        o, chains = self.options, self.chains
        kw = {"device": chains.device, "dtype": chains.dtype}
        shape = (plan.n_chains, n_visible)

        def fn(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            if o.extended:
                return extended_log_density_and_grad(params, x, o.tau)
            return log_density_and_grad(params, x, o.tau)

        def advance(gen: torch.Generator, state: LangevinState, step: float, k: int
                    ) -> tuple[LangevinState, MALARunInfo]:
            return mala_steps(gen, state, fn, kink_step(step, o.tau, o.precondition,
                                                        o.extended), k)

        def init(gen: torch.Generator) -> torch.Tensor:
            if not o.extended:
                return sample_logistic(shape, gen, **kw)
            # ℓ = −Gumbel and g = Gumbel, so ℓ + g ~ Logistic(0, 1): the same base law as u.
            return torch.cat([-sample_gumbel(shape, gen, **kw), sample_gumbel(shape, gen, **kw)],
                             1)

        def to_u(position: torch.Tensor) -> torch.Tensor:
            return extended_to_u(position) if o.extended else position

        def report(step: float, runs: list[MALARunInfo]) -> dict[str, Any]:
            accepted = float(torch.stack([r.num_accepted for r in runs]).sum())
            total = len(runs) * o.num_steps * plan.n_chains
            return {"step_size": step, "acceptance": accepted / total,
                    "extended": o.extended, "precondition": o.precondition}

        adaptation = StepSizeAdaptation(target=o.target_acceptance, enabled=o.adapt)
        dim = 2 * n_visible if o.extended else n_visible
        return Dynamics(dim, fn, init, advance, adaptation, to_u, report)
