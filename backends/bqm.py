"""Sampling a general Ising/QUBO problem (a dimod BQM) with a backend.

A bipartite BQM *is* an RBM (up to a constant): its interaction graph is 2-coloured into a visible
and a hidden layer and any backend samples it. A BQM with an odd cycle is not: backends that
sample arbitrary BQMs (`neal`, `exact`, `dimod`) take it through their `sample_general_bqm`
method, and backends with a kernel for Boltzmann machines on any graph (`gibbs`, `dwave`) take it
as a `qvae.BoltzmannMachine` (`BoltzmannMachine.from_bqm`, then `Sampler.sample(bm)`); the others
(`langevin`, `mala`) refuse it.

>>> import dimod, backends
>>> bqm = dimod.BinaryQuadraticModel({"a": 0.5, "b": -0.5}, {("a", "b"): -1.0}, 0.0, "SPIN")
>>> out = sample_bqm(backends.get_sampler("exact"), bqm, 8, seed=0)
>>> out.samples.shape, out.vartype
((8, 2), 'SPIN')
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import dimod
import numpy as np
import torch

from backends.base import Sampler, Timer, make_generator
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM


class NotBipartite(ValueError):
    """The BQM has an odd cycle, so it is not an RBM."""


@dataclass
class BQMSamples:
    """Samples of a BQM in its own vartype, columns in `variables` order, energies with offset."""

    variables: list[Any]
    vartype: str
    samples: np.ndarray
    energies: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    continuous: np.ndarray | None = None


def check_bqm(bqm: dimod.BinaryQuadraticModel) -> None:
    """ValueError naming the first non-finite bias; a BQM needs at least one variable."""
    if bqm.num_variables == 0:
        raise ValueError("the BQM has no variables")
    for v, bias in bqm.linear.items():
        if not math.isfinite(bias):
            raise ValueError(f"linear bias of variable {v!r} is {bias}")
    for (a, b), bias in bqm.quadratic.items():
        if not math.isfinite(bias):
            raise ValueError(f"quadratic bias of ({a!r}, {b!r}) is {bias}")
    if not math.isfinite(bqm.offset):
        raise ValueError(f"offset is {bqm.offset}")


def bipartition(bqm: dimod.BinaryQuadraticModel) -> tuple[list[Any], list[Any]]:
    """Two layers with every interaction between them (BFS 2-colouring), or NotBipartite."""
    colour: dict[Any, int] = {}
    for start in bqm.variables:
        if start in colour:
            continue
        colour[start] = 0
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for w in bqm.adj[u]:
                if w not in colour:
                    colour[w] = 1 - colour[u]
                    queue.append(w)
                elif colour[w] == colour[u]:
                    raise NotBipartite(
                        f"variables {u!r} and {w!r} interact but fall in the same layer (odd "
                        "cycle): this BQM is not an RBM"
                    )
    visible = [v for v in bqm.variables if colour[v] == 0]
    hidden = [v for v in bqm.variables if colour[v] == 1]
    if not hidden and len(visible) > 1:  # no interactions at all: any split is an RBM
        hidden.append(visible.pop())
    if not hidden:
        raise NotBipartite("a single-variable BQM has no RBM form")
    return visible, hidden


def samples_any_graph(sampler: Sampler | type[Sampler]) -> bool:
    """True when the backend samples a Boltzmann machine on any graph, not only bipartite ones
    (its declared `capabilities.any_graph`: gibbs, dwave, remote, and every general-BQM
    backend). A backend whose own kernel still refuses some graphs raises NotImplementedError
    when asked, which callers turn into a clear error."""
    return sampler.capabilities.any_graph


def any_graph_backends() -> list[str]:
    """The built-in backends that sample Boltzmann machines on any graph (for error messages;
    third-party ones are not imported for a message)."""
    from backends.registry import sampler_class

    builtin = ("exact", "gibbs", "neal", "dwave", "langevin", "mala", "dimod")
    return [name for name in builtin if samples_any_graph(sampler_class(name))]


def sample_bqm(
    sampler: Sampler, bqm: dimod.BinaryQuadraticModel, num_samples: int, *, seed: int | None = None
) -> BQMSamples:
    """Draw `num_samples` states ~ exp(−E_bqm) with `sampler`, in the BQM's vartype."""
    check_bqm(bqm)
    try:
        visible, hidden = bipartition(bqm)
    except NotBipartite as exc:
        if sampler.capabilities.general_bqm:
            timer = Timer()
            with timer("total"), timer("sample"):
                general_out = sampler.sample_general_bqm(bqm, num_samples, seed=seed)
            general_out.info.update(timing=dict(timer.seconds), backend=sampler.name)
            return general_out
        if samples_any_graph(sampler):
            return _sample_as_bm(sampler, bqm, num_samples, seed, exc)
        raise NotBipartite(f"{exc}; backend {sampler.name!r} samples bipartite models only, use "
                           f"one of {any_graph_backends()} for a general BQM") from None
    rbm = RBM.from_bqm(bqm, visible, hidden)
    out = sampler.sample(rbm, num_samples, seed=seed)
    z = out.states.detach().cpu().numpy().astype(np.int8)
    if bqm.vartype is dimod.SPIN:
        z = 2 * z - 1
    position = {v: i for i, v in enumerate(visible + hidden)}
    order = [position[v] for v in bqm.variables]
    samples = z[:, order]
    energies = bqm.energies((samples, list(bqm.variables)))
    continuous = None
    if out.continuous is not None:  # relaxed visible layer; the hidden one is drawn exactly: NaN
        relaxed = np.full(z.shape, np.nan)
        relaxed[:, : len(visible)] = out.continuous.detach().cpu().double().numpy()
        continuous = relaxed[:, order]
    info = {**out.info, "num_visible_layer": len(visible)}
    return BQMSamples(list(bqm.variables), bqm.vartype.name, samples, energies, info, continuous)


def _sample_as_bm(sampler: Sampler, bqm: dimod.BinaryQuadraticModel, num_samples: int,
                  seed: int | None, why: Exception) -> BQMSamples:
    """A non-bipartite BQM through `Sampler.sample` as a BoltzmannMachine over its labels."""
    bm = BoltzmannMachine.from_bqm(bqm, dtype=torch.float64)
    try:
        out = sampler.sample(bm, num_samples, seed=seed)
    except NotImplementedError as exc:
        raise NotBipartite(f"{why}; {exc}") from None
    z = out.states.detach().cpu().numpy().astype(np.int8)  # columns: bqm.variables, in order
    samples = 2 * z - 1 if bqm.vartype is dimod.SPIN else z
    variables = list(bqm.variables)
    energies = bqm.energies((samples, variables))
    continuous = None
    if out.continuous is not None and tuple(out.continuous.shape) == z.shape:
        continuous = out.continuous.detach().cpu().double().numpy()
    return BQMSamples(variables, bqm.vartype.name, samples, energies, dict(out.info), continuous)


def from_dimod(sampleset: dimod.SampleSet, bqm: dimod.BinaryQuadraticModel,
               info: dict[str, Any]) -> BQMSamples:
    """A dimod SampleSet (one row per read) as BQMSamples in the BQM's variable order."""
    order = [sampleset.variables.index(v) for v in bqm.variables]
    samples = np.ascontiguousarray(sampleset.record.sample[:, order]).astype(np.int8)
    energies = bqm.energies((samples, list(bqm.variables)))
    return BQMSamples(list(bqm.variables), bqm.vartype.name, samples, energies, info)


def sample_by_enumeration(bqm: dimod.BinaryQuadraticModel, num_samples: int, seed: int | None,
                          max_states: int) -> BQMSamples:
    """Exact draws from exp(−E) over all 2^n states (n ≤ log2 max_states)."""
    n = bqm.num_variables
    if 2**n > max_states:
        raise ValueError(f"exact sampling of a general BQM enumerates 2^{n} states, over "
                         f"max_states={max_states}; use 'neal'")
    table = dimod.ExactSolver().sample(bqm)
    log_p = -torch.from_numpy(np.ascontiguousarray(table.record.energy, dtype=np.float64))
    gen = make_generator(seed)
    idx = torch.multinomial(torch.softmax(log_p, 0), num_samples, replacement=True, generator=gen)
    order = [table.variables.index(v) for v in bqm.variables]
    samples = np.ascontiguousarray(table.record.sample[idx.numpy()][:, order]).astype(np.int8)
    energies = bqm.energies((samples, list(bqm.variables)))
    return BQMSamples(list(bqm.variables), bqm.vartype.name, samples, energies,
                      {"states_enumerated": 2**n})
