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

import math
from typing import Any

import torch

from backends._langevin_kernels import (
    TARGET_ACCEPTANCE,
    LangevinState,
    StepSize,
    adapt_log_step,
    mala_step,
)
from backends.langevin import LangevinSampler, check_positive
from qvae import cancel
from qvae.relax import (
    LogDensityFn,
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


class MALASampler(LangevinSampler):
    """MALA on π_τ (or on the extended state) with persistent chains and burn-in adaptation.

    Args:
        tau: relaxation temperature τ (rounded-law TV bias ≈ 0.4–0.5 τ on reference RBMs).
        step_size: initial Δt; adapted during burn-in when `adapt` is true, fixed otherwise.
        num_steps: MALA steps per call (and between rounds when num_samples > chains).
        burn_in: steps run (and adapted over) once when chains are (re)initialised.
        num_chains: parallel chains; None means one chain per requested sample.
        persistent: keep chains and the adapted Δt across calls (PCD).
        num_threads: torch intra-op threads while sampling (see `langevin`); None = unchanged.
        extended: sample the extended state (ℓ, g) instead of u.
        precondition: strength c of the kink preconditioner (module docstring); 0 = plain MALA.
        adapt: adapt Δt during burn-in toward `target_acceptance`.
        target_acceptance: the mean acceptance probability adaptation aims for, in (0, 1).
        device, dtype: where and in what precision the chains run.
    """

    name = "mala"
    binary = False
    #: τ = 0.01 (default): relaxation bias TV 0.0048 (6x4) / 0.0039 (8x8), moments ≤ 0.9 sd,
    #: against tolerances 0.033 / 0.051 at N = 20000; MH makes the kernel exact for π_τ, so no
    #: Δt bias. The reference RBMs mix in ≈ 300 steps (TV to π_τ at the noise floor), so the
    #: suite runs with a 500-step burn-in; the default 2000 is for harder models (a 12x30 RBM
    #: with couplings N(0, 0.7²) needs ≈ 2000).
    #: One torch thread: see `langevin` (num_threads).
    conformance_options: dict[str, Any] = {"burn_in": 500, "num_threads": 1}
    #: Work model (see `langevin`): a MALA step costs ~4× a ULA step per chain (measured).
    STEP_COST, STEP_OVERHEAD = 4.0, 1e6

    def __init__(
        self,
        *,
        tau: float = 0.01,
        step_size: float = 0.1,
        num_steps: int = 50,
        burn_in: int = 2000,
        num_chains: int | None = None,
        persistent: bool = True,
        num_threads: int | None = None,
        extended: bool = False,
        precondition: float = 1.0,
        adapt: bool = True,
        target_acceptance: float = TARGET_ACCEPTANCE,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self._init_chains(tau=tau, step_size=step_size, num_steps=num_steps, burn_in=burn_in,
                          num_chains=num_chains, persistent=persistent,
                          num_threads=num_threads, device=device, dtype=dtype)
        for key, val in (("extended", extended), ("adapt", adapt)):
            if not isinstance(val, bool):
                raise ValueError(f"{key} must be a bool, got {val!r}")
        if isinstance(precondition, bool) or not isinstance(precondition, (int, float)) or not (
            0 <= precondition < math.inf
        ):
            raise ValueError(f"precondition must be a finite number >= 0, got {precondition!r}")
        self.precondition = float(precondition)
        target = check_positive("target_acceptance", target_acceptance)
        if not target < 1:
            raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance!r}")
        self.extended, self.adapt, self.target_acceptance = extended, adapt, target
        self._step = self.step_size  # the Δt in force (adapted during burn-in)
        self._acceptance: list[torch.Tensor] = []
        self._burn_in_acceptance: float | None = None

    # ------------------------------------------------------------------- hooks
    def _state_dim(self, n_visible: int) -> int:
        return 2 * n_visible if self.extended else n_visible

    def _logdensity_fn(self, params: RelaxParams) -> LogDensityFn:
        if self.extended:
            return lambda phi: extended_log_density_and_grad(params, phi, self.tau)
        return lambda u: log_density_and_grad(params, u, self.tau)

    def _init_position(self, n_chains: int, n_visible: int, gen: torch.Generator) -> torch.Tensor:
        kw = {"device": self.device, "dtype": self.dtype}
        if not self.extended:
            return sample_logistic((n_chains, n_visible), gen, **kw)
        # ℓ = −Gumbel and g = Gumbel, so ℓ + g ~ Logistic(0, 1): the same base law as u.
        shape = (n_chains, n_visible)
        return torch.cat([-sample_gumbel(shape, gen, **kw), sample_gumbel(shape, gen, **kw)], 1)

    def _to_u(self, position: torch.Tensor) -> torch.Tensor:
        return extended_to_u(position) if self.extended else position

    def _on_fresh_chains(self) -> None:
        self._step = self.step_size

    def _burn_in(
        self, gen: torch.Generator, state: LangevinState, fn: LogDensityFn
    ) -> LangevinState:
        log_step = torch.tensor(math.log(self._step), dtype=torch.float64)
        accepted = []
        for t in range(self.burn_in):
            step = kink_step(float(log_step.exp()), self.tau, self.precondition, self.extended)
            state, info = mala_step(gen, state, fn, step)
            cancel.check()
            rate = info.acceptance_prob.mean().double().cpu()
            accepted.append(rate)
            if self.adapt:
                log_step = adapt_log_step(log_step, rate, t, target=self.target_acceptance)
        if self.adapt and self.burn_in:
            self._step = float(log_step.exp())
        self._burn_in_acceptance = float(torch.stack(accepted).mean()) if accepted else None
        return state

    def _run(
        self, gen: torch.Generator, state: LangevinState, fn: LogDensityFn, steps: int
    ) -> LangevinState:
        step = kink_step(self._step, self.tau, self.precondition, self.extended)
        for _ in range(steps):
            state, info = mala_step(gen, state, fn, step)
            cancel.check()
            self._acceptance.append(info.is_accepted.sum())
        return state

    def _begin_call(self) -> None:
        self._acceptance, self._burn_in_acceptance = [], None

    def _info(self, n_chains: int) -> dict[str, Any]:
        accepted = float(torch.stack(self._acceptance).sum()) if self._acceptance else 0.0
        total = len(self._acceptance) * n_chains
        info = {
            "step_size": self._step,
            "acceptance": accepted / total if total else float("nan"),
            "extended": self.extended,
            "precondition": self.precondition,
        }
        if self._burn_in_acceptance is not None:
            info["burn_in_acceptance"] = self._burn_in_acceptance
        return info

    # --------------------------------------------------------- persistent state
    def reset(self) -> None:
        super().reset()
        self._step = self.step_size

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step_size": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("step_size") is not None:
            self._step = float(state["step_size"])
