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

from backends.base import (
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    energies,
    make_generator,
    option_values,
)
from qvae.rbm import RBM

#: dwave-samplers accepts seeds below 2**31 only.
SEED_LIMIT = 2**31
#: Set by the backend on every call, so not allowed in `sample_kwargs`.
RESERVED = ("num_reads", "seed")


def load_sampler_class(path: Any) -> type[dimod.Sampler]:
    """The dimod.Sampler subclass named by "package.module.Class" (or "package.module:Class");
    ValueError naming the `sampler` option otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("the dimod backend needs sampler='package.module.Class', e.g. "
                         f"'dwave.samplers.SimulatedAnnealingSampler'; got {path!r}")
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"sampler={path!r} is not an import path 'package.module.Class'")
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


def _check_dict(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict of keyword arguments, got {value!r}")
    return dict(value)


class DimodBackend(Sampler):
    """A dimod sampler (by import path) sampling the RBM's BQM; see the module doc.

    Args:
        sampler: import path of a dimod.Sampler subclass, "package.module.Class".
        sampler_options: keyword arguments of the class's constructor.
        sample_kwargs: keyword arguments of every `.sample` call (not num_reads or seed).
        max_calls: at most this many calls per `sample` when the sampler returns fewer rows
            than asked for.
    """

    name = "dimod"
    binary = True
    #: simulated annealing held at β = 1 with Gibbs acceptance: a thermal sampler of exp(−E)
    conformance_options = {
        "sampler": "dwave.samplers.SimulatedAnnealingSampler",
        "sample_kwargs": {"beta_range": [1.0, 1.0], "beta_schedule_type": "linear",
                          "proposal_acceptance_criteria": "Gibbs", "num_sweeps": 100},
    }

    #: update-equivalents per spin update of dwave-samplers' C loops (as for `neal`)
    UPDATE_COST = 5.0

    @classmethod
    def work(cls, options: Mapping[str, Any], shape: ProblemShape, num_samples: int
             ) -> dict[str, Cost]:
        """The answer's memory, and CPU work where it is known: a sweep-based sampler (a
        `num_sweeps` in sample_kwargs, as dwave-samplers' SA) costs like `neal`. Any other
        wrapped sampler's cost is its own; a service bounds it by allowlisting the class and
        locking `sampler_options` / `sample_kwargs`."""
        o = option_values(cls, options)
        out = {"state_bytes": Cost(24.0 * num_samples * shape.n_units,
                                   f"num_samples {num_samples} × {shape.n_units} units × 24 bytes",
                                   ("num_samples",))}
        sweeps = (o.get("sample_kwargs") or {}).get("num_sweeps")
        if isinstance(sweeps, int) and not isinstance(sweeps, bool):
            out["work"] = Cost(cls.UPDATE_COST * num_samples * sweeps * shape.size,
                               f"{cls.UPDATE_COST:g} × num_samples {num_samples} × num_sweeps "
                               f"{sweeps} × size {shape.size}", ("sample_kwargs", "num_samples"))
        return out

    def __init__(
        self,
        *,
        sampler: str | None = None,
        sampler_options: dict[str, Any] | None = None,
        sample_kwargs: dict[str, Any] | None = None,
        max_calls: int = 100,
    ) -> None:
        cls = load_sampler_class(sampler)
        options = _check_dict("sampler_options", sampler_options)
        kwargs = _check_dict("sample_kwargs", sample_kwargs)
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"max_calls must be an int >= 1, got {max_calls!r}")
        try:
            self.sampler = cls(**options)
        except Exception as exc:  # noqa: BLE001 - any constructor failure, reported as such
            raise ValueError(f"cannot build {sampler} with sampler_options={options!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
        valid = set(self.sampler.parameters)
        reserved = sorted(set(kwargs) & set(RESERVED))
        if reserved:
            raise ValueError(f"sample_kwargs may not set {reserved}: the backend sets them "
                             "(num_reads = num_samples, seed = the call's seed)")
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"sample_kwargs {unknown} are not parameters of {sampler}; valid: "
                             f"{sorted(valid - set(RESERVED))}")
        self.sampler_path, self.sampler_options, self.sample_kwargs = sampler, options, kwargs
        self.max_calls = max_calls
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
