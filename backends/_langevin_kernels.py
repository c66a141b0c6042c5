"""Langevin MCMC kernels shared by the `langevin` and `mala` backends (blackjax style).

A kernel is a plain function `(generator, state, logdensity_fn, step_size) -> (state, info)` on
a batch of independent chains (`ula_steps` / `mala_steps` run k of them, as the chain shell
`backends.chains` calls them); `logdensity_fn(x) -> (log π(x), ∇ log π(x))` per row (the log
density may be None for `ula_step`, which needs only the gradient). The step
size is a float or a tensor broadcastable to the positions; `mala_step` also takes a function
of the position returning a per-coordinate step (a position-dependent diagonal preconditioner,
"simplified manifold MALA"; exactness only needs the MH ratio to use it at both ends).
Convention (docs/relaxation.md): the Langevin move is

    x' = x + Δt ∇log π(x) + √(2Δt) ξ,   ξ ~ N(0, I),

so the proposal density is q(x' | x) = N(x'; x + Δt ∇log π(x), 2Δt I). MALA written with √α ξ
has α = 2Δt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from qvae import cancel
from qvae.relax import LogDensityFn

#: A step size: a float, a tensor broadcastable to (N, d), or position -> (N, d) steps.
StepSize = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

#: Asymptotically optimal MALA acceptance rate (Roberts & Rosenthal 1998).
TARGET_ACCEPTANCE = 0.574


class LangevinState(NamedTuple):
    """Chain positions (N, d) with their log densities (N,) (or None) and gradients (N, d)."""

    position: torch.Tensor
    logdensity: torch.Tensor | None
    grad: torch.Tensor


class MALAInfo(NamedTuple):
    """Per-chain Metropolis–Hastings facts of one step."""

    acceptance_prob: torch.Tensor  # (N,) min(1, MH ratio)
    is_accepted: torch.Tensor  # (N,) bool


def init_state(position: torch.Tensor, logdensity_fn: LogDensityFn) -> LangevinState:
    """Evaluate log π and its gradient at `position`."""
    logp, grad = logdensity_fn(position)
    return LangevinState(position, logp, grad)


def _step_tensor(step_size: StepSize, position: torch.Tensor) -> torch.Tensor:
    """The step as a tensor broadcastable to `position` (evaluated there if a function)."""
    step = step_size(position) if callable(step_size) else step_size
    return torch.as_tensor(step, dtype=position.dtype, device=position.device)


def _proposal(
    generator: torch.Generator, state: LangevinState, step: torch.Tensor | float
) -> torch.Tensor:
    """x + Δt ∇log π(x) + √(2Δt) ξ (in place on the noise buffer for a float Δt)."""
    x = state.position
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(step, float):
        return noise.mul_(math.sqrt(2 * step)).add_(state.grad, alpha=step).add_(x)
    return x + step * state.grad + torch.sqrt(2 * step) * noise


def ula_step(
    generator: torch.Generator,
    state: LangevinState,
    logdensity_fn: LogDensityFn,
    step_size: float | torch.Tensor,
) -> tuple[LangevinState, None]:
    """One unadjusted (Euler–Maruyama) Langevin step; biased for finite Δt."""
    if callable(step_size):  # would need the Itô drift ∇·D to keep π invariant
        raise TypeError("ula_step takes a constant step size, not a function of the position")
    step = float(step_size) if isinstance(step_size, (int, float)) else _step_tensor(
        step_size, state.position)
    return init_state(_proposal(generator, state, step), logdensity_fn), None


def _log_proposal(
    to: torch.Tensor, start: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
    varying: bool,
) -> torch.Tensor:
    """log q(to | start) = Σ −(to − start − Δt ∇)² / (4Δt) − ½ log Δt up to a constant, (N,).

    The log Δt term cancels between the two directions unless the step `varying` with position.
    """
    log_q = -((to - start - step * grad) ** 2) / (4 * step)
    if varying:
        log_q = log_q - 0.5 * step.expand_as(to).log()
    return log_q.sum(-1)


def mala_step(
    generator: torch.Generator,
    state: LangevinState,
    logdensity_fn: LogDensityFn,
    step_size: StepSize,
) -> tuple[LangevinState, MALAInfo]:
    """One Metropolis-adjusted Langevin step: exact (π-reversible) for any step size.

    With a position-dependent `step_size` the reverse proposal uses the step at the proposed
    point, so the kernel stays exact. A proposal whose log density or gradient is not finite
    is rejected.
    """
    x = state.position
    step_x = _step_tensor(step_size, x)
    proposal = init_state(_proposal(generator, state, step_x), logdensity_fn)
    y = proposal.position
    varying = callable(step_size)
    step_y = _step_tensor(step_size, y) if varying else step_x
    log_ratio = (
        proposal.logdensity - state.logdensity
        + _log_proposal(x, y, proposal.grad, step_y, varying)
        - _log_proposal(y, x, state.grad, step_x, varying)
    )
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    uniform = torch.rand(log_ratio.shape, generator=generator, device=x.device, dtype=x.dtype)
    accept = uniform.log() < log_ratio
    keep = accept.unsqueeze(-1)
    new = LangevinState(
        torch.where(keep, y, x),
        torch.where(accept, proposal.logdensity, state.logdensity),
        torch.where(keep, proposal.grad, state.grad),
    )
    return new, MALAInfo(log_ratio.clamp(max=0.0).exp(), accept)


class MALARunInfo(NamedTuple):
    """What k MALA steps report: the last step's acceptance probabilities (what a step-size
    adaptation learns from) and the accepted proposals over all steps and chains."""

    acceptance_prob: torch.Tensor  # (N,)
    num_accepted: torch.Tensor  # () int64


def ula_steps(
    generator: torch.Generator, state: LangevinState, logdensity_fn: LogDensityFn,
    step_size: float | torch.Tensor, num_steps: int,
) -> tuple[LangevinState, None]:
    """`num_steps` steps of `ula_step`."""
    for _ in range(num_steps):
        state, _ = ula_step(generator, state, logdensity_fn, step_size)
        cancel.check()  # a service's wall-time limit or shutdown stops the run here
    return state, None


def mala_steps(
    generator: torch.Generator, state: LangevinState, logdensity_fn: LogDensityFn,
    step_size: StepSize, num_steps: int,
) -> tuple[LangevinState, MALARunInfo]:
    """`num_steps` (>= 1) steps of `mala_step`."""
    accepted = []
    for _ in range(num_steps):
        state, info = mala_step(generator, state, logdensity_fn, step_size)
        cancel.check()
        accepted.append(info.is_accepted.sum())
    return state, MALARunInfo(info.acceptance_prob, torch.stack(accepted).sum())


def adapt_log_step(
    log_step: float, acceptance: float, iteration: int, *,
    target: float = TARGET_ACCEPTANCE, rate: float = 1.0, decay: float = 0.6,
) -> float:
    """Robbins–Monro update of log Δt toward the target mean acceptance probability.

    log Δt ← log Δt + rate · (iteration + 1)^(−decay) · (acceptance − target); the gains sum to
    infinity and their squares do not (0.5 < decay ≤ 1), so the iterate settles at the step size
    whose acceptance is `target`.
    """
    return log_step + rate * (iteration + 1) ** (-decay) * (acceptance - target)
