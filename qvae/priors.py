"""The prior of a DVAE from `model.prior`: an `RBM` or a `BoltzmannMachine` on another graph.

`build_prior` turns the config section into a model; `structure` / `from_structure` carry a
Boltzmann machine's graph (labels, edges, parts) as plain data, so a checkpoint rebuilds it
exactly (a QPU-native graph taken from a solver cannot be rebuilt from its name alone), and the
state dict then restores biases and couplings.

>>> from qvae.config import load_config
>>> cfg = load_config(None, ["model.prior.kind=multipartite", "model.prior.parts=4"])
>>> bm = build_prior(cfg.model.prior, 200, seed=0)
>>> [len(c) for c in bm.colour_classes], from_structure(structure(bm)).n_edges == bm.n_edges
([50, 50, 50, 50], True)
"""

from __future__ import annotations

from typing import Any

import torch

from qvae.boltzmann import BoltzmannMachine
from qvae.config import PriorConfig
from qvae.rbm import RBM

Prior = RBM | BoltzmannMachine


def build_prior(
    spec: PriorConfig, n_latent: int, *, seed: int | None, sampler: Any = None
) -> BoltzmannMachine:
    """The Boltzmann machine `spec` describes over `n_latent` units (kind multipartite or
    qpu_native; the RBM is built by the DVAE itself). `sampler`: the training backend, whose
    solver graph a qpu_native prior with graph=backend uses (a dwave backend; its emulator
    needs no QPU)."""
    from qvae.boltzmann_graphs import multipartite, qpu_native

    spec.check_units(n_latent)
    if spec.kind == "multipartite":
        sizes = spec.sizes or [n_latent // spec.parts] * spec.parts  # type: ignore[operator]
        return multipartite(sizes, spec.density, seed=seed, scale=spec.init_scale)
    if spec.kind == "qpu_native":
        per = n_latent // spec.partitions
        if spec.graph == "backend":
            return qpu_native(None, spec.partitions, graph=solver_graph(sampler),
                              qubits_per_partition=per, seed=seed, scale=spec.init_scale)
        return qpu_native(spec.topology, spec.partitions, shape=spec.shape,
                          qubits_per_partition=per, seed=seed, scale=spec.init_scale)
    raise ValueError(f"model.prior.kind={spec.kind!r} is built by the DVAE (an RBM)")


def solver_graph(sampler: Any) -> Any:
    """The networkx graph of a dwave backend's solver (or emulator), connecting to it."""
    client = getattr(sampler, "client", None)
    if client is None or not hasattr(client, "connect"):
        raise ValueError("model.prior.graph=backend needs the dwave backend (its solver graph); "
                         f"got backend {getattr(sampler, 'name', type(sampler).__name__)!r}")
    if not client.connect():
        raise ValueError(f"model.prior.graph=backend: the dwave backend has no solver graph "
                         f"({client.latched}); use backend.options.solver=emulator or "
                         "model.prior.graph=topology")
    return client.graph


def structure(bm: BoltzmannMachine) -> dict[str, Any]:
    """The graph of `bm` as plain data: variables, edges [[i, j], ...] and parts (its colour
    classes), for `from_structure`."""
    return {"variables": [_plain(v) for v in bm.variables],
            "edges": bm.edges.cpu().tolist(),
            "parts": [c.cpu().tolist() for c in bm.colour_classes]}


def from_structure(data: dict[str, Any], *, dtype: torch.dtype = torch.float32
                   ) -> BoltzmannMachine:
    """A BoltzmannMachine on the graph of `structure(...)`, zero parameters (load the state
    dict for its biases and couplings)."""
    try:
        variables = [tuple(v) if isinstance(v, list) else v for v in data["variables"]]
        edges, parts = data["edges"], data["parts"]
    except (KeyError, TypeError):
        raise ValueError("a prior structure needs 'variables', 'edges' and 'parts'") from None
    pairs = torch.as_tensor(edges, dtype=torch.int64).reshape(-1, 2)
    return BoltzmannMachine(variables, pairs, parts=parts, init_std=0.0, dtype=dtype)


def _plain(label: Any) -> Any:
    """A unit label as plain checkpoint data (Pegasus nice coordinates are tuples of ints)."""
    if isinstance(label, tuple):
        return [int(x) for x in label]
    return int(label) if hasattr(label, "__index__") else label


def enumerated_units(prior: Prior) -> int:
    """Units an exact log Z enumerates: the smaller RBM layer, or a BM's units outside its
    largest colour class (what `eval.exact_limit_units` bounds)."""
    if isinstance(prior, RBM):
        return min(prior.n_visible, prior.n_hidden)
    return prior.n_units - int(torch.bincount(prior.colour).max())


def sampling_macs(prior: Prior, num_samples: int) -> float:
    """Multiply-adds of one sweep of `num_samples` chains (for `qvae.threads`)."""
    from qvae.threads import rbm_sampling_macs

    if isinstance(prior, RBM):
        return rbm_sampling_macs(prior.n_visible, prior.n_hidden, num_samples)
    return 2.0 * max(1, prior.n_edges) * num_samples


def describe_prior(prior: Prior) -> str:
    """One line, e.g. 'RBM 100 x 100' or 'BoltzmannMachine 200 units, 4 parts, 15000 edges'."""
    if isinstance(prior, RBM):
        return f"RBM {prior.n_visible} x {prior.n_hidden}"
    return (f"BoltzmannMachine {prior.n_units} units, {len(prior.colour_classes)} colour "
            f"classes, {prior.n_edges} edges")
