"""Step-size adaptation for Metropolis-adjusted kernels: `init / update / final`, blackjax style.

The adaptation is a value, not a set of attributes on a sampler: `init` gives its state, `update`
takes that state and one kernel step's info and returns the next state, `final` returns the step
size to sample with and the facts to report. The chain shell (`backends.chains.burn_in`) drives it
during burn-in only, so after burn-in the chain is a fixed π-reversible kernel.

>>> from backends._langevin_kernels import MALAInfo
>>> adapt = StepSizeAdaptation(target=0.5)
>>> state = adapt.init(4.0)
>>> for _ in range(300):  # a kernel accepting with probability 1 / (1 + Δt): 0.5 at Δt = 1
...     p = torch.tensor([1 / (1 + adapt.params(state))])
...     state = adapt.update(state, MALAInfo(p, p > 0.5))
>>> step, info = adapt.final(state)
>>> round(step, 1), sorted(info)
(1.0, ['burn_in_acceptance'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from backends._langevin_kernels import TARGET_ACCEPTANCE, MALAInfo, MALARunInfo, adapt_log_step


class StepSizeState(NamedTuple):
    """Where the adaptation stands: log Δt, the steps seen, and their summed mean acceptance."""

    log_step: torch.Tensor  # float64 scalar on the CPU
    iteration: int
    acceptance_sum: torch.Tensor  # float64 scalar: Σ over steps of the mean acceptance prob.
    initial: float  # the step size it started from (returned when adaptation is off)


@dataclass(frozen=True)
class StepSizeAdaptation:
    """Robbins–Monro on log Δt toward a mean acceptance probability of `target`
    (`adapt_log_step`). With `enabled=False` it only records the acceptance, and `final`
    returns the initial step size unchanged."""

    target: float = TARGET_ACCEPTANCE
    enabled: bool = True

    def init(self, step_size: float) -> StepSizeState:
        zero = torch.zeros((), dtype=torch.float64)
        return StepSizeState(torch.tensor(math.log(step_size), dtype=torch.float64), 0, zero,
                             float(step_size))

    @staticmethod
    def params(state: StepSizeState) -> float:
        """The step size of the next kernel step."""
        return float(state.log_step.exp())

    def update(self, state: StepSizeState, info: MALAInfo | MALARunInfo) -> StepSizeState:
        """After one kernel step, from its per-chain acceptance probabilities."""
        rate = info.acceptance_prob.mean().double().cpu()
        log_step = state.log_step
        if self.enabled:
            log_step = adapt_log_step(log_step, rate, state.iteration, target=self.target)
        return StepSizeState(log_step, state.iteration + 1, state.acceptance_sum + rate,
                             state.initial)

    def final(self, state: StepSizeState) -> tuple[float, dict[str, Any]]:
        """(the step size to sample with, info): the adapted Δt, or the initial one when
        adaptation is off or saw no step; info holds the mean burn-in acceptance, if any."""
        if state.iteration == 0:
            return state.initial, {}
        step = self.params(state) if self.enabled else state.initial
        return step, {"burn_in_acceptance": float(state.acceptance_sum / state.iteration)}
