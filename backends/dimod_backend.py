"""`dimod`: any Ocean (dimod) sampler as a qvae backend, given by import path.

`get_sampler("dimod", sampler="dwave.samplers.TabuSampler", sampler_options={...},
sample_kwargs={...})` imports the class, checks that it is a `dimod.Sampler` subclass, builds it
with `sampler_options` and samples the RBM through `rbm.to_bqm()` (BINARY, energy identical to
`rbm.energy`) with `num_reads` and `seed` set by the backend and `sample_kwargs` passed through.
Rows come back one per read: an aggregated answer (`num_occurrences` > 1) is expanded, and a
sampler that returns fewer rows than asked (e.g. a hybrid solver) is called again, at most
`max_calls` times.

Whether the samples follow exp(−E) is up to the wrapped sampler: simulated annealing held at
β = 1 with Gibbs acceptance is thermal and passes the conformance suite (`conformance_options`);
an optimiser such as Tabu returns low-energy states, not Boltzmann samples, which is fine for
inspection but biases a training run's negative phase.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import dimod
import numpy as np
import torch
from pydantic import field_validator

from backends.base import (
    BackendOptions,
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    energies,
    make_generator,
)
from backends.options import Capabilities, Field
from qvae.rbm import RBM

#: dwave-samplers accepts seeds below 2**31 only.
SEED_LIMIT = 2**31
#: Set by the backend on every call, so not allowed in `sample_kwargs`.
RESERVED = ("num_reads", "seed")


def _split_path(path: str) -> tuple[str, str]:
    """("package.module", "Class") of "package.module.Class" or "package.module:Class"."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError("is not an import path 'package.module.Class'")
    return module_name, attr


class DimodOptions(BackendOptions):
    # The path is only parsed here: importing it is construction's job (a service checks it
    # against its allowlist first, so a request never makes it import anything else).
    sampler: str | None = Field(
        None, validate_default=True, description="import path of the dimod.Sampler class to "
        "wrap, 'package.module.Class', e.g. 'dwave.samplers.SimulatedAnnealingSampler' "
        "(required)")
    sampler_options: dict[str, Any] | None = Field(
        None, description="keyword arguments of the wrapped class's constructor")
    sample_kwargs: dict[str, Any] | None = Field(
        None, description="keyword arguments of every .sample call, checked against the "
        "sampler's parameters (not num_reads or seed: the backend sets them)")
    max_calls: int = Field(100, ge=1, description="most .sample calls per draw when "
                           "the sampler returns fewer rows than asked for")

    @field_validator("sampler")
    @classmethod
    def _import_path(cls, path: str | None) -> str | None:
        if path is None or not path.strip():
            raise ValueError("needs sampler='package.module.Class', e.g. "
                             "'dwave.samplers.SimulatedAnnealingSampler'")
        _split_path(path)
        return path

    @field_validator("sample_kwargs")
    @classmethod
    def _not_reserved(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(set(kwargs or {}) & set(RESERVED))
        if reserved:
            raise ValueError(f"may not set {reserved}: the backend sets them (num_reads = "
                             "num_samples, seed = the call's seed)")
        return kwargs


def load_sampler_class(path: str) -> type[dimod.Sampler]:
    """The dimod.Sampler subclass named by a checked `sampler` option (`DimodOptions`);
    ValueError naming the `sampler` option when it cannot be imported or is no such class."""
    module_name, attr = _split_path(path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"sampler={path!r}: cannot import module {module_name!r} ({exc}); "
                         "is its package installed?") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, dimod.Sampler)):
        what = "nothing" if cls is None else f"a {type(cls).__name__}"
        raise ValueError(f"sampler={path!r} names {what}, not a dimod.Sampler subclass; give a "
                         "class such as 'dwave.samplers.SimulatedAnnealingSampler'")
    return cls


class DimodBackend(Sampler):
    """A dimod sampler (by import path) sampling the RBM's BQM; see the module doc and
    `DimodOptions`."""

    name = "dimod"
    Options = DimodOptions
    capabilities = Capabilities(resource="cpu", output="binary", general_bqm=True)
    #: simulated annealing held at β = 1 with Gibbs acceptance: a thermal sampler of exp(−E)
    conformance_options = {
        "sampler": "dwave.samplers.SimulatedAnnealingSampler",
        "sample_kwargs": {"beta_range": [1.0, 1.0], "beta_schedule_type": "linear",
                          "proposal_acceptance_criteria": "Gibbs", "num_sweeps": 100},
    }

    #: update-equivalents per spin update of dwave-samplers' C loops (as for `neal`)
    UPDATE_COST = 5.0

    @classmethod
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        """The answer's memory, and CPU work where it is known: a sweep-based sampler (a
        `num_sweeps` in sample_kwargs, as dwave-samplers' SA) costs like `neal`. Any other
        wrapped sampler's cost is its own; a service bounds it by allowlisting the class and
        locking `sampler_options` / `sample_kwargs`."""
        o = cls.parse_options(options)
        out = {"state_bytes": Cost(24.0 * num_samples * shape.n_units,
                                   f"num_samples {num_samples} × {shape.n_units} units × 24 bytes",
                                   ("num_samples",))}
        sweeps = (o.sample_kwargs or {}).get("num_sweeps")
        if isinstance(sweeps, int) and not isinstance(sweeps, bool):
            out["work"] = Cost(cls.UPDATE_COST * num_samples * sweeps * shape.size,
                               f"{cls.UPDATE_COST:g} × num_samples {num_samples} × num_sweeps "
                               f"{sweeps} × size {shape.size}", ("sample_kwargs", "num_samples"))
        return out

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        sampler, options, kwargs = o.sampler, dict(o.sampler_options or {}), o.sample_kwargs or {}
        cls = load_sampler_class(sampler)
        try:
            self.sampler = cls(**options)
        except Exception as exc:  # noqa: BLE001 - any constructor failure, reported as such
            raise ValueError(f"cannot build {sampler} with sampler_options={options!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
        # which keywords the built sampler takes is the sampler's to say, not a declared range
        valid = set(self.sampler.parameters)
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"sample_kwargs {unknown} are not parameters of {sampler}; valid: "
                             f"{sorted(valid - set(RESERVED))}")
        self.sampler_path, self.sampler_options, self.sample_kwargs = sampler, options, kwargs
        self.max_calls = o.max_calls
        self._takes_reads, self._takes_seed = "num_reads" in valid, "seed" in valid

    def _draw(self, bqm: dimod.BinaryQuadraticModel, num_samples: int, seed: int | None,
              timer: Timer) -> tuple[np.ndarray, dict[str, Any]]:
        """`num_samples` rows in `bqm`'s variable order and vartype, and the call's info."""
        with timer("preprocess"):
            labels = list(bqm.variables)
            if seed is None:  # fresh entropy, within what dwave-samplers accepts
                seed = int(torch.randint(0, SEED_LIMIT, (1,), generator=make_generator(None)))
            seeds = np.random.default_rng(seed)
        rows: list[np.ndarray] = []
        have, calls, info = 0, 0, {}
        while have < num_samples:
            if calls == self.max_calls:
                raise RuntimeError(f"{self.sampler_path} returned {have} of {num_samples} "
                                   f"samples in max_calls={self.max_calls} calls")
            kwargs = dict(self.sample_kwargs)
            if self._takes_reads:
                kwargs["num_reads"] = num_samples - have
            if self._takes_seed:  # the first call gets the seed itself: same as calling directly
                kwargs["seed"] = seed % SEED_LIMIT if calls == 0 else int(
                    seeds.integers(SEED_LIMIT))
            with timer("sample"):
                result = self.sampler.sample(bqm, **kwargs)
                result.resolve()
            calls += 1
            with timer("postprocess"):
                record, info = result.record, dict(result.info)
                missing = set(labels) - set(result.variables)
                if missing:
                    raise RuntimeError(f"{self.sampler_path} returned no values for "
                                       f"{sorted(map(str, missing))[:5]}")
                order = [result.variables.index(v) for v in labels]
                block = np.repeat(record.sample[:, order], record.num_occurrences, axis=0)
                if result.vartype is not bqm.vartype:
                    block = (block + 1) // 2 if bqm.vartype is dimod.BINARY else 2 * block - 1
                rows.append(block.astype(np.int8))
                have += block.shape[0]
        return np.concatenate(rows)[:num_samples], {
            "sampler": self.sampler_path, "calls": calls, "seeded": self._takes_seed,
            "sampler_info": info}

    def sample_general_bqm(self, bqm: dimod.BinaryQuadraticModel, num_samples: int, *,
                           seed: int | None = None) -> Any:
        """Any BQM (not only RBMs), in its own vartype: see `backends.bqm.sample_bqm`."""
        from backends.bqm import BQMSamples, check_bqm

        check_bqm(bqm)
        samples, info = self._draw(bqm, num_samples, seed, Timer())
        return BQMSamples(list(bqm.variables), bqm.vartype.name, samples,
                          bqm.energies((samples, list(bqm.variables))), info)

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        with timer("preprocess"):
            bqm = rbm.to_bqm()  # BINARY, variables 0..n_units-1 = [v, h]
        z, info = self._draw(bqm, num_samples, seed, timer)
        with timer("postprocess"):
            z = torch.from_numpy(z.astype(np.float64)).to(rbm.weight.device, rbm.weight.dtype)
            visible, hidden = z[:, : rbm.n_visible], z[:, rbm.n_visible:]
            energy = energies(rbm, visible, hidden)
        return SampleSet(visible, hidden, energy, info)
