"""`neal`: simulated annealing from dwave-samplers on `rbm.to_bqm()`.

Default mode `boltzmann` runs single-spin Gibbs-acceptance MCMC at fixed β (beta_range=(β, β)),
so each read is one approximately independent draw from exp(-β E). Mode `anneal` runs a
geometric schedule from `beta_start` up to β, ending at the target temperature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import dimod
import numpy as np
import torch
from dwave.samplers import SimulatedAnnealingSampler

from backends.base import (
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    check_state_bytes,
    make_generator,
    option_values,
)
from qvae import cancel
from qvae.rbm import RBM

MODES = ("boltzmann", "anneal")
#: dwave-samplers accepts seeds below 2**31 only (whatever its error message says).
SEED_LIMIT = 2**31


class NealSampler(Sampler):
    """Simulated annealing / fixed-β Gibbs MCMC from dwave-samplers."""

    name = "neal"
    binary = True

    def __init__(
        self,
        *,
        num_sweeps: int = 200,
        mode: str = "boltzmann",
        beta: float = 1.0,
        beta_start: float = 0.1,
        randomize_order: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int) or num_sweeps < 1:
            raise ValueError(f"num_sweeps must be an int >= 1, got {num_sweeps!r}")
        for key, val in (("beta", beta), ("beta_start", beta_start)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {val!r}")
        if mode == "anneal" and beta_start > beta:
            raise ValueError(f"beta_start ({beta_start}) must be <= beta ({beta}) in anneal mode")
        self.num_sweeps, self.mode, self.beta = num_sweeps, mode, float(beta)
        self.beta_start, self.randomize_order = float(beta_start), bool(randomize_order)
        self._sa = SimulatedAnnealingSampler()

    #: Work model: a sweep updates each read's units and reads its couplings once; the C loop
    #: costs ~5 update-equivalents of the torch kernels per update (measured 0.7–2.8·10^9 /s
    #: against gibbs' 1.6–11·10^9 /s on one core).
    UPDATE_COST = 5.0
    #: A long run is cut into calls of at most this many updates (~0.1–0.3 s) that continue
    #: each other's states, so a wall-time limit or shutdown can stop it in between; runs below
    #: it are one call, exactly as before.
    CHUNK_UPDATES, CHUNK_MAX_SWEEPS = 5 * 10**7, 2**20

    @classmethod
    def work(cls, options: Mapping[str, Any], shape: ProblemShape, num_samples: int
             ) -> dict[str, Cost]:
        o = option_values(cls, options)
        return {
            "work": Cost(cls.UPDATE_COST * num_samples * o["num_sweeps"] * shape.size,
                         f"{cls.UPDATE_COST:g} × num_samples {num_samples} × num_sweeps "
                         f"{o['num_sweeps']} × size {shape.size}",
                         ("num_sweeps", "num_samples")),
            "state_bytes": Cost(float(cls._state_bytes(num_samples, shape.n_units)),
                                f"num_samples {num_samples} × {shape.n_units} units",
                                ("num_samples",)),
        }

    @staticmethod
    def _state_bytes(reads: int, n_units: int) -> int:
        return 24 * reads * n_units  # int8 states, their copies, and float64 views downstream

    def _schedule(self, start: int, count: int) -> np.ndarray:
        """The β of sweeps start..start+count-1 (fixed β, or the geometric anneal's slice)."""
        if self.mode == "boltzmann":
            return np.array([self.beta])
        last = max(1, self.num_sweeps - 1)
        k = np.arange(start, start + count, dtype=np.float64)
        return self.beta_start * (self.beta / self.beta_start) ** (k / last)

    def _run(self, bqm: dimod.BinaryQuadraticModel, num_samples: int,
             seed: int | None) -> dimod.SampleSet:
        if seed is None:  # derive a seed from fresh entropy: dwave-samplers needs one < 2**31
            seed = int(torch.randint(0, SEED_LIMIT, (1,), generator=make_generator(None)))
        check_state_bytes(self._state_bytes(num_samples, bqm.num_variables),
                          f"num_samples={num_samples} on {bqm.num_variables} variables")
        common = {"num_reads": num_samples, "proposal_acceptance_criteria": "Gibbs",
                  "randomize_order": self.randomize_order}
        token = cancel.current()
        if token is not None:  # dwave-samplers calls it between reads
            common["interrupt_function"] = lambda: token.cancelled or (
                token.deadline is not None and token.deadline < time.monotonic())
        size = max(1, num_samples * (bqm.num_variables + bqm.num_interactions))
        chunk = min(self.CHUNK_MAX_SWEEPS, max(1, self.CHUNK_UPDATES // size))
        if chunk >= self.num_sweeps:
            if self.mode == "boltzmann":  # one β for all sweeps: no schedule of num_sweeps βs
                schedule = {"beta_range": (self.beta, self.beta), "beta_schedule_type": "linear",
                            "num_sweeps_per_beta": self.num_sweeps}
            else:
                schedule = {"beta_range": (self.beta_start, self.beta),
                            "beta_schedule_type": "geometric"}
            out = self._sa.sample(bqm, num_sweeps=self.num_sweeps, seed=seed % SEED_LIMIT,
                                  **common, **schedule)
            cancel.check()  # an interrupted run returns early: report it, not its samples
            return out
        rng = np.random.default_rng(seed)
        out = None
        for start in range(0, self.num_sweeps, chunk):
            count = min(chunk, self.num_sweeps - start)
            betas = self._schedule(start, count)
            per_beta = count if betas.size == 1 else 1
            extra = {} if out is None else {"initial_states": out}
            out = self._sa.sample(bqm, num_sweeps=count, num_sweeps_per_beta=per_beta,
                                  beta_schedule_type="custom", beta_schedule=betas,
                                  seed=int(rng.integers(SEED_LIMIT)), **common, **extra)
            cancel.check()
        assert out is not None
        return out

    def sample_general_bqm(self, bqm: dimod.BinaryQuadraticModel, num_samples: int, *,
                           seed: int | None = None) -> Any:
        """Any BQM (not only RBMs), samples in its own vartype: see `backends.bqm.sample_bqm`."""
        from backends.bqm import check_bqm, from_dimod

        check_bqm(bqm)
        info = {"mode": self.mode, "beta": self.beta, "num_sweeps": self.num_sweeps}
        return from_dimod(self._run(bqm, num_samples, seed), bqm, info)

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        with timer("preprocess"):
            bqm = rbm.to_bqm()
        with timer("sample"):
            result = self._run(bqm, num_samples, seed)
        with timer("postprocess"):
            order = [result.variables.index(i) for i in range(rbm.n_units)]
            states = torch.from_numpy(np.ascontiguousarray(result.record.sample[:, order]))
            states = states.to(rbm.weight.device, rbm.weight.dtype)
            energy = torch.from_numpy(np.array(result.record.energy))  # copy: 1 read, odd strides
            energy = energy.to(rbm.weight.dtype)
        nv = rbm.n_visible
        info = {"mode": self.mode, "beta": self.beta, "num_sweeps": self.num_sweeps}
        return SampleSet(states[:, :nv], states[:, nv:], energy.to(rbm.weight.device), info)
