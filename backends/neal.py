"""`neal`: simulated annealing from dwave-samplers on `rbm.to_bqm()`.

Default mode `boltzmann` runs single-spin Gibbs-acceptance MCMC at fixed β (beta_range=(β, β)),
so each read is one approximately independent draw from exp(-β E). Mode `anneal` runs a
geometric schedule from `beta_start` up to β, ending at the target temperature.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import dimod
import numpy as np
import torch
from dwave.samplers import SimulatedAnnealingSampler
from pydantic import ValidationInfo, field_validator

from backends.base import (
    BackendOptions,
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    check_state_bytes,
    make_generator,
)
from backends.options import Capabilities, Field
from qvae import cancel
from qvae.rbm import RBM

#: dwave-samplers accepts seeds below 2**31 only (whatever its error message says).
SEED_LIMIT = 2**31


class NealOptions(BackendOptions):
    num_sweeps: int = Field(200, ge=1,
                            description="sweeps per read (each read is one chain); cost scales "
                            "with it")
    mode: Literal["boltzmann", "anneal"] = Field(
        "boltzmann", description="boltzmann: Gibbs-acceptance MCMC held at beta (a thermal "
        "sample of exp(-beta E)); anneal: a geometric schedule from beta_start up to beta")
    beta: float = Field(1.0, gt=0, description="inverse temperature of the samples (> 0)")
    beta_start: float = Field(0.1, gt=0, description="anneal mode: first beta of the schedule "
                              "(> 0, at most beta)")
    randomize_order: bool = Field(False, description="visit the spins in a random order each "
                                  "sweep instead of in sequence")

    @field_validator("beta_start")
    @classmethod
    def _start_below_beta(cls, beta_start: float, info: ValidationInfo) -> float:
        beta = info.data.get("beta")
        if info.data.get("mode") == "anneal" and beta is not None and beta_start > beta:
            raise ValueError(f"must be <= beta ({beta}) in anneal mode")
        return beta_start


class NealSampler(Sampler):
    """Simulated annealing / fixed-β Gibbs MCMC from dwave-samplers."""

    name = "neal"
    Options = NealOptions
    capabilities = Capabilities(resource="cpu", output="binary", general_bqm=True)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
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
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        o = cls.parse_options(options)
        return {
            "work": Cost(cls.UPDATE_COST * num_samples * o.num_sweeps * shape.size,
                         f"{cls.UPDATE_COST:g} × num_samples {num_samples} × num_sweeps "
                         f"{o.num_sweeps} × size {shape.size}",
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
        o = self.options
        if o.mode == "boltzmann":
            return np.array([o.beta])
        last = max(1, o.num_sweeps - 1)
        k = np.arange(start, start + count, dtype=np.float64)
        return o.beta_start * (o.beta / o.beta_start) ** (k / last)

    def _run(self, bqm: dimod.BinaryQuadraticModel, num_samples: int,
             seed: int | None) -> dimod.SampleSet:
        if seed is None:  # derive a seed from fresh entropy: dwave-samplers needs one < 2**31
            seed = int(torch.randint(0, SEED_LIMIT, (1,), generator=make_generator(None)))
        o = self.options
        check_state_bytes(self._state_bytes(num_samples, bqm.num_variables),
                          f"num_samples={num_samples} on {bqm.num_variables} variables")
        common = {"num_reads": num_samples, "proposal_acceptance_criteria": "Gibbs",
                  "randomize_order": o.randomize_order}
        token = cancel.current()
        if token is not None:  # dwave-samplers calls it between reads
            common["interrupt_function"] = lambda: token.cancelled or (
                token.deadline is not None and token.deadline < time.monotonic())
        size = max(1, num_samples * (bqm.num_variables + bqm.num_interactions))
        chunk = min(self.CHUNK_MAX_SWEEPS, max(1, self.CHUNK_UPDATES // size))
        if chunk >= o.num_sweeps:
            if o.mode == "boltzmann":  # one β for all sweeps: no schedule of num_sweeps βs
                schedule = {"beta_range": (o.beta, o.beta), "beta_schedule_type": "linear",
                            "num_sweeps_per_beta": o.num_sweeps}
            else:
                schedule = {"beta_range": (o.beta_start, o.beta),
                            "beta_schedule_type": "geometric"}
            out = self._sa.sample(bqm, num_sweeps=o.num_sweeps, seed=seed % SEED_LIMIT,
                                  **common, **schedule)
            cancel.check()  # an interrupted run returns early: report it, not its samples
            return out
        rng = np.random.default_rng(seed)
        out = None
        for start in range(0, o.num_sweeps, chunk):
            count = min(chunk, o.num_sweeps - start)
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
        info = {"mode": self.options.mode, "beta": self.options.beta,
                "num_sweeps": self.options.num_sweeps}
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
        info = {"mode": self.options.mode, "beta": self.options.beta,
                "num_sweeps": self.options.num_sweeps}
        return SampleSet(states[:, :nv], states[:, nv:], energy.to(rbm.weight.device), info)
