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

import math
from collections.abc import Mapping
from typing import Any

import torch

from backends._langevin_kernels import LangevinState, init_state, ula_step
from backends.base import (
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    check_state_bytes,
    energies,
    make_generator,
    option_values,
)
from backends.numerics import check_precision, mixing_check
from qvae import cancel
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

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_int(key: str, val: Any, low: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < low:
        raise ValueError(f"{key} must be an int >= {low}, got {val!r}")
    return val


def check_positive(key: str, val: Any) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not (
        math.isfinite(val) and val > 0
    ):
        raise ValueError(f"{key} must be a finite number > 0, got {val!r}")
    return float(val)


def check_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use 'cpu'")
    return dev


class LangevinSampler(Sampler):
    """Unadjusted Langevin (Euler–Maruyama) on π_τ with persistent chains.

    Args:
        tau: relaxation temperature τ; the rounded law's TV bias is ≈ 0.4–0.5 τ on the
            reference RBMs.
        step_size: Euler–Maruyama step Δt. Keep Δt ≲ τ²: π_τ sees the RBM only in a width-τ
            band around u_i = 0, and steps of size √(2Δt) ≫ τ jump over it, so the RBM's
            influence (and the accuracy) is lost; the cost of a mixed sample is ≈ 16/Δt steps.
        num_steps: steps per call (and between successive rounds when num_samples > chains);
            the default 2500 is one time unit at the default Δt, a quarter of the
            relaxation time, so successive calls' samples are correlated (like PCD).
        burn_in: steps run once when chains are (re)initialised; the default 45000 (18 time
            units) mixes the chains from the base law on the reference RBMs.
        num_chains: parallel chains; None means one chain per requested sample.
        persistent: keep chains across calls (PCD); False starts fresh chains every call.
        num_threads: torch intra-op threads while sampling (restored afterwards); None leaves
            torch's setting. The steps are many small element-wise ops, so on a machine whose
            other cores are busy, 1 avoids OpenMP barrier stalls (measured 20x slower with 2
            threads on this 2-core machine while another process held one core).
        device, dtype: where and in what precision the chains run.
    """

    name = "langevin"
    binary = False
    #: The defaults are the conformance settings. τ = 0.02: relaxation bias TV 0.0096 (6x4) /
    #: 0.0078 (8x8) against tolerances 0.033 / 0.051 at N = 20000, moment bias ≤ 1.8 sd (limit
    #: 5.5). Δt = τ²: the discretisation bias is within the noise at Δt ≤ τ² but adds ≈ 4 sd to
    #: the worst moment at Δt = 2τ² (τ = 0.03, Δt = τ² passes with z = 5.53 of 5.54: too close).
    #: Mixing from the base law takes ≈ 16 time units (TV to π_τ falls by e every ≈ 4), so
    #: burn-in is 45000 steps = 18 time units.
    conformance_options: dict[str, Any] = {"num_threads": 1}

    def __init__(
        self,
        *,
        tau: float = 0.02,
        step_size: float = 4e-4,
        num_steps: int = 2500,
        burn_in: int = 45000,
        num_chains: int | None = None,
        persistent: bool = True,
        num_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self._init_chains(tau=tau, step_size=step_size, num_steps=num_steps, burn_in=burn_in,
                          num_chains=num_chains, persistent=persistent,
                          num_threads=num_threads, device=device, dtype=dtype)

    def _init_chains(
        self, *, tau: Any, step_size: Any, num_steps: Any, burn_in: Any, num_chains: Any,
        persistent: Any, num_threads: Any, device: Any, dtype: Any,
    ) -> None:
        """Validate and store the options common to `langevin` and `mala`."""
        self.tau = check_positive("tau", tau)
        self.step_size = check_positive("step_size", step_size)
        self.num_steps = check_int("num_steps", num_steps, 1)
        self.burn_in = check_int("burn_in", burn_in, 0)
        if num_chains is not None:
            check_int("num_chains", num_chains, 1)
        self.num_chains = num_chains
        if not isinstance(persistent, bool):
            raise ValueError(f"persistent must be a bool, got {persistent!r}")
        self.persistent = persistent
        if num_threads is not None:
            check_int("num_threads", num_threads, 1)
        self.num_threads = num_threads
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device, self.dtype = check_device(device), DTYPES[dtype]
        self._position: torch.Tensor | None = None  # persistent chain state
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ work model
    #: A step costs each chain ~STEP_COST × (units + couplings) update-equivalents (a gradient
    #: of F: two matmuls; MALA adds the log density and the reverse proposal), plus a fixed
    #: dispatch cost of many small torch ops (~50 µs for ULA) however small the problem.
    STEP_COST, STEP_OVERHEAD = 1.3, 5e5
    #: Buffers of one chain's state per unit (position, gradient, proposal, noise, …).
    STATE_BUFFERS = 8

    @classmethod
    def work(cls, options: Mapping[str, Any], shape: ProblemShape, num_samples: int
             ) -> dict[str, Cost]:
        o = option_values(cls, options)
        chains = o["num_chains"] or num_samples
        rounds = math.ceil(num_samples / chains)
        steps = o["burn_in"] + rounds * o["num_steps"]
        elem = DTYPES[o["dtype"]].itemsize
        return {
            "work": Cost(steps * (cls.STEP_COST * chains * shape.size + cls.STEP_OVERHEAD),
                         f"(burn_in {o['burn_in']} + {rounds} round(s) × num_steps "
                         f"{o['num_steps']}) steps × ({cls.STEP_COST:g} × num_chains {chains} "
                         f"× size {shape.size} + {cls.STEP_OVERHEAD:g})",
                         ("num_steps", "burn_in", "num_chains", "num_samples")),
            "state_bytes": Cost(cls._state_bytes(chains, num_samples, shape.n_units, elem),
                                f"num_chains {chains} × {shape.n_units} units × {elem} bytes",
                                ("num_chains", "num_samples")),
        }

    @classmethod
    def _state_bytes(cls, chains: int, num_samples: int, n_units: int, elem: int) -> float:
        return float(elem * n_units * (2 * cls.STATE_BUFFERS * chains + 4 * num_samples))

    # ------------------------------------------------------------- hooks for `mala`
    def _state_dim(self, n_visible: int) -> int:
        return n_visible

    def _logdensity_fn(self, params: RelaxParams) -> LogDensityFn:
        return lambda u: log_density_and_grad(params, u, self.tau, with_log_density=False)

    def _init_position(self, n_chains: int, n_visible: int, gen: torch.Generator) -> torch.Tensor:
        return sample_logistic((n_chains, n_visible), gen, device=self.device, dtype=self.dtype)

    def _to_u(self, position: torch.Tensor) -> torch.Tensor:
        return position

    def _burn_in(
        self, gen: torch.Generator, state: LangevinState, fn: LogDensityFn
    ) -> LangevinState:
        return self._run(gen, state, fn, self.burn_in)

    def _run(
        self, gen: torch.Generator, state: LangevinState, fn: LogDensityFn, steps: int
    ) -> LangevinState:
        for _ in range(steps):
            state, _ = ula_step(gen, state, fn, self.step_size)
            cancel.check()  # a service's wall-time limit or shutdown stops the run here
        return state

    def _begin_call(self) -> None:
        """Called at the start of every `sample` call."""

    def _on_fresh_chains(self) -> None:
        """Called before burn-in of freshly initialised chains."""

    def _info(self, n_chains: int) -> dict[str, Any]:
        """Backend facts for `info` (after the call's steps)."""
        return {"step_size": self.step_size}

    # ------------------------------------------------------------- persistent state
    def reset(self) -> None:
        self._position = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": None if self._position is None else self._position.cpu(),
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state.get("position")
        self._position = None if position is None else position.to(self.device, self.dtype)
        if state.get("generator") is not None:
            self._generator = make_generator(0, self.device)
            self._generator.set_state(state["generator"])

    # ------------------------------------------------------------------- sampling
    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        with torch_threads(self.num_threads):
            return self._sample_chains(rbm, num_samples, seed=seed, timer=timer)

    def _sample_chains(
        self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer
    ) -> SampleSet:
        with timer("preprocess"):
            check_precision(rbm, self.dtype, backend=self.name)
            self._begin_call()
            if seed is not None or self._generator is None:
                self._generator = make_generator(seed, self.device)
            gen = self._generator
            params = RelaxParams.from_rbm(rbm, self.device, self.dtype)
            fn = self._logdensity_fn(params)
            n_chains = self.num_chains or num_samples
            check_state_bytes(self._state_bytes(n_chains, num_samples, rbm.n_units,
                                                self.dtype.itemsize),
                              f"num_chains={n_chains} on {rbm.n_units} units")
            shape = (n_chains, self._state_dim(rbm.n_visible))
            fresh = (not self.persistent or self._position is None
                     or tuple(self._position.shape) != shape)
        with timer("sample"):
            if fresh:
                self._on_fresh_chains()
                state = init_state(self._init_position(n_chains, rbm.n_visible, gen), fn)
                state = self._burn_in(gen, state, fn)
            else:  # the RBM may have changed since the last call: re-evaluate log π
                state = init_state(self._position, fn)
            rounds = math.ceil(num_samples / n_chains)
            us = []
            for _ in range(rounds):
                state = self._run(gen, state, fn, self.num_steps)
                us.append(self._to_u(state.position))
            if self.persistent:
                self._position = state.position
        with timer("postprocess"):
            u = torch.cat(us)[:num_samples]
            visible = round_visible(u)
            hidden = sample_hidden(params, visible, gen)
            out_device, out_dtype = rbm.weight.device, rbm.weight.dtype
            visible, hidden = visible.to(out_device, out_dtype), hidden.to(out_device, out_dtype)
            energy = energies(rbm, visible, hidden)
            continuous = to_visible(u, self.tau).to(out_device, out_dtype)
            # the chains' own check: samples the RBM makes implausible mean "not mixed"
            mixing = mixing_check(rbm, visible, backend=self.name)
        info = {
            "tau": self.tau,
            "num_steps": self.num_steps,
            "num_chains": n_chains,
            "rounds": rounds,
            "burned_in": fresh and self.burn_in > 0,
            "u": u.to(out_device, out_dtype),
            **self._info(n_chains),
            **mixing,
        }
        return SampleSet(visible, hidden, energy, info, continuous=continuous)
