"""`neal`: simulated annealing from dwave-samplers on `rbm.to_bqm()`.

Default mode `boltzmann` runs single-spin Gibbs-acceptance MCMC at fixed β (beta_range=(β, β)),
so each read is one approximately independent draw from exp(-β E). Mode `anneal` runs a
geometric schedule from `beta_start` up to β, ending at the target temperature.
"""

from __future__ import annotations

import math
from typing import Any

import dimod
import numpy as np
import torch
from dwave.samplers import SimulatedAnnealingSampler

from backends.base import Sampler, SampleSet, Timer, make_generator
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

    def _run(self, bqm: dimod.BinaryQuadraticModel, num_samples: int,
             seed: int | None) -> dimod.SampleSet:
        if seed is None:  # derive a seed from fresh entropy: dwave-samplers needs one < 2**31
            seed = int(torch.randint(0, SEED_LIMIT, (1,), generator=make_generator(None)))
        if self.mode == "boltzmann":
            schedule = {"beta_range": (self.beta, self.beta), "beta_schedule_type": "linear"}
        else:
            schedule = {"beta_range": (self.beta_start, self.beta),
                        "beta_schedule_type": "geometric"}
        return self._sa.sample(
            bqm,
            num_reads=num_samples,
            num_sweeps=self.num_sweeps,
            proposal_acceptance_criteria="Gibbs",
            randomize_order=self.randomize_order,
            seed=seed % SEED_LIMIT,
            **schedule,
        )

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
            energy = torch.from_numpy(np.ascontiguousarray(result.record.energy))
            energy = energy.to(rbm.weight.dtype)
        nv = rbm.n_visible
        info = {"mode": self.mode, "beta": self.beta, "num_sweeps": self.num_sweeps}
        return SampleSet(states[:, :nv], states[:, nv:], energy.to(rbm.weight.device), info)
