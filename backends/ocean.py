"""Any qvae backend as an Ocean sampler: `as_dimod(name, **options) -> dimod.Sampler`.

The returned sampler speaks dimod: `.sample(bqm, num_reads=N, seed=S)` (and dimod's
`sample_ising` / `sample_qubo`) returns a `dimod.SampleSet` with the BQM's own labels and vartype
and energies under the BQM, offset included. A bipartite BQM is an RBM (`backends.bqm`), so every
backend samples it; a BQM with an odd cycle goes to backends that sample general BQMs (`neal`,
`exact`, `dimod`) as it is, to backends with a kernel for any graph (`gibbs`, `dwave`) as a
`qvae.BoltzmannMachine` (`BoltzmannMachine.from_bqm`, then `Sampler.sample(bm)`), and is refused
with a clear error by the others (`langevin`, `mala`). Empty and one-variable BQMs, which have no
RBM form, are handled here so the sampler passes dimod's own sampler tests.

There is no `clamp` parameter: dimod has no standard one, and Ocean fixes variables before
sampling instead (`bqm.fix_variable(v, value)`, or `dwave.preprocessing.FixVariablesComposite`
with this sampler as its child), which gives the same exact conditional.

Every call is independent, as in any dimod sampler: the backend's persistent state (Gibbs chains,
adapted step sizes, a QPU β_eff estimate) is reset first, so the same seed gives the same samples
and one BQM's chains never leak into the next.

>>> import dimod, backends
>>> bqm = dimod.BinaryQuadraticModel({"a": 0.5, "b": -0.5}, {("a", "b"): -1.0}, 2.0, "SPIN")
>>> ss = backends.as_dimod("exact").sample(bqm, num_reads=4, seed=0)
>>> ss.vartype.name, sorted(ss.variables), len(ss)
('SPIN', ['a', 'b'], 4)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import dimod
import numpy as np
import torch

from backends.base import check_num_samples, check_seed
from backends.bqm import NotBipartite, check_bqm, sample_bqm, samples_any_graph
from backends.registry import get_sampler, option_names, sampler_class

__all__ = ["BackendSampler", "as_dimod", "plain"]


def plain(obj: Any) -> Any:
    """Backend info as plain Python (tensors and numpy scalars converted), so that the
    SampleSet's `to_serializable()` output is JSON."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _as_int(value: Any) -> Any:
    """numpy integers (common in Ocean code) as int; anything else unchanged for the checks."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


class BackendSampler(dimod.Sampler):
    """A qvae backend behind the dimod.Sampler API (build it with `as_dimod`)."""

    def __init__(self, name: str, **options: Any) -> None:
        self.backend = get_sampler(name, **options)  # ValueError naming a bad name or option
        self.name = name
        self._general = self.backend.capabilities.general_bqm
        self._parameters: dict[str, list] = {"num_reads": [], "seed": []}
        self._properties: dict[str, Any] = {
            "backend": name,
            "backend_options": dict(options),
            "backend_option_names": option_names(name),
            "binary": sampler_class(name).capabilities.binary,
            "general_bqm": self._general,
            "any_graph": samples_any_graph(self.backend),
        }

    @property
    def parameters(self) -> dict[str, list]:
        return self._parameters

    @property
    def properties(self) -> dict[str, Any]:
        return self._properties

    def sample(self, bqm: dimod.BinaryQuadraticModel, num_reads: int = 1,  # type: ignore[override]
               seed: int | None = None, **parameters: Any) -> dimod.SampleSet:
        """`num_reads` samples of exp(−E_bqm) as a dimod.SampleSet in the BQM's labels and
        vartype; `info` holds the backend's info (timing, backend facts)."""
        if parameters:
            raise ValueError(f"unknown sample parameter(s) {sorted(parameters)} for the "
                             f"{self.name!r} backend; valid: {sorted(self._parameters)}. Backend "
                             f"options go to as_dimod({self.name!r}, ...)")
        if not isinstance(bqm, dimod.BinaryQuadraticModel):
            raise TypeError(f"expected a dimod.BinaryQuadraticModel, got {type(bqm).__name__}")
        num_reads = check_num_samples(_as_int(num_reads))
        seed = check_seed(_as_int(seed))
        variables = list(bqm.variables)
        if not variables:  # one state, the empty one, of energy = offset
            return dimod.SampleSet.from_samples(
                (np.empty((num_reads, 0), np.int8), []), bqm.vartype,
                energy=np.full(num_reads, float(bqm.offset)),
                info={"backend": self.name})
        check_bqm(bqm)
        problem = bqm
        if len(variables) == 1:  # an RBM needs two layers: add an uncoupled, zero-bias partner
            problem = bqm.copy()
            problem.add_variable(_fresh_label(bqm), 0.0)
        self.backend.reset()
        try:
            out = sample_bqm(self.backend, problem, num_reads, seed=seed)
        except NotBipartite as exc:
            raise ValueError(f"as_dimod({self.name!r}): {exc}") from None
        samples = out.samples
        if problem is not bqm:
            samples = samples[:, : len(variables)]  # the partner is the last variable
        info = plain(out.info)
        if out.continuous is not None:
            info["continuous"] = np.asarray(out.continuous)[:, : len(variables)]
        # sort_labels=False: columns in the BQM's own variable order, as dimod's samplers do
        return dimod.SampleSet.from_samples_bqm((samples, variables), bqm, info=info,
                                                sort_labels=False)


def _fresh_label(bqm: dimod.BinaryQuadraticModel) -> Any:
    label, k = ("qvae_pad", 0), 0
    while label in bqm.variables:
        k += 1
        label = ("qvae_pad", k)
    return label


def as_dimod(name: str, **options: Any) -> BackendSampler:
    """Backend `name` with `options` as a `dimod.Sampler` (see the module doc).

    >>> import backends
    >>> s = backends.as_dimod("gibbs", num_sweeps=20)
    >>> s.properties["backend"], sorted(s.parameters)
    ('gibbs', ['num_reads', 'seed'])
    """
    return BackendSampler(name, **options)
