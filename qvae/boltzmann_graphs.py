"""Constructors of `BoltzmannMachine` priors: k-partite, QPU-native, and from an `RBM`.

>>> bm = multipartite([3, 3, 2], seed=0)
>>> bm.n_edges == 3 * 3 + 3 * 2 + 3 * 2  # complete 3-partite at density 1
True
>>> [c.tolist() for c in bm.colour_classes]
[[0, 1, 2], [3, 4, 5], [6, 7]]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_edges import greedy_colouring
from qvae.rbm import RBM

TOPOLOGIES = ("chimera", "pegasus", "zephyr")


def from_rbm(rbm: RBM) -> BoltzmannMachine:
    """The RBM as a BoltzmannMachine with z = [v, h]: units 0..nv-1 visible, nv.. hidden (the
    labels of `RBM.variable_labels`), one edge per visible-hidden pair the mask allows (all of
    them without a mask, zero weights included), and the two layers as its colour classes.
    Same energies and log Z; a detached copy (training the RBM does not move it)."""
    rbm.validate()
    nv, nh = rbm.n_visible, rbm.n_hidden
    w = rbm.effective_weight().detach()
    allowed = torch.ones_like(w, dtype=torch.bool) if rbm.mask is None else rbm.mask != 0
    i, j = allowed.nonzero(as_tuple=True)
    return BoltzmannMachine(
        nv + nh,
        torch.stack([i, j + nv], 1),
        bias=torch.cat([rbm.visible_bias, rbm.hidden_bias]).detach(),
        coupling=w[i, j],
        parts=[range(nv), range(nv, nv + nh)],
        dtype=rbm.weight.dtype,
    ).to(rbm.weight.device)


def multipartite(
    sizes: Sequence[int],
    density: float = 1.0,
    *,
    seed: int | None = None,
    scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> BoltzmannMachine:
    """A k-partite Boltzmann machine: parts of `sizes` (contiguous unit indices, labels 0..n-1),
    couplers only between parts. At density 1 every inter-part pair is coupled (complete
    k-partite); below, a uniformly random subset of round(density · pairs) of them (seeded).
    Couplings start N(0, scale²), biases at zero; the parts are the colour classes.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two part sizes, ints >= 1; got {sizes}")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    part = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = starts[-1]
    i, j = torch.triu_indices(n, n, offset=1)
    across = part[i] != part[j]
    pairs = torch.stack([i[across], j[across]], 1)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if density < 1.0:
        keep = torch.randperm(pairs.shape[0], generator=gen)[: round(density * pairs.shape[0])]
        pairs = pairs[keep.sort().values]
    coupling = torch.randn(pairs.shape[0], generator=gen, dtype=torch.float64) * scale
    return BoltzmannMachine(
        n,
        pairs,
        coupling=coupling,
        parts=[range(starts[k], starts[k + 1]) for k in range(len(sizes))],
        dtype=dtype,
    )


def qpu_native(
    topology: str | None,
    partitions: int,
    *,
    shape: int | Sequence[int] | None = None,
    graph: Any = None,
    qubits_per_partition: int | None = None,
    seed: int | None = None,
    scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> BoltzmannMachine:
    """A `partitions`-partite Boltzmann machine on a QPU's own qubits and couplers.

    The hardware graph is `graph` (a solver's networkx graph, e.g.
    `DWaveSampler().to_networkx_graph()`, missing qubits and all) or, without it,
    `dwave.graphs.<topology>_graph(*shape)`. Its qubits are coloured properly with the
    topology's own colouring: Chimera 2 colours (`chimera_two_color`), Pegasus and Zephyr 4
    (`pegasus_four_color`, `zephyr_four_color`: both have K4 subgraphs, so 4 is the least);
    a graph of no known family gets `boltzmann_edges.greedy_colouring`. Then:
    - `partitions` equal to the number of colours: the colour classes are the partitions;
    - more: each colour class is split (qubits dealt round-robin in graph order) — subsets of
      independent sets stay independent, so every coupler is kept;
    - fewer: colours are merged in contiguous groups (Pegasus 4 → 2 merges by orientation,
      vertical against horizontal, keeping its 12 internal couplers per qubit), and couplers
      inside a merged partition are dropped — a k-partite model has none.
    `qubits_per_partition` keeps that many qubits of each partition, the first in breadth-first
    order over the hardware graph (a compact patch, so most of its couplers stay). Only
    couplers the QPU has, between kept qubits of different partitions, become edges;
    `variables` are the qubit labels (in graph order), couplings start N(0, scale²) (seeded).
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 2:
        raise ValueError(f"partitions must be an int >= 2, got {partitions!r}")
    hw = _hardware_graph(topology, shape, graph)
    nodes = list(hw.nodes)
    colour = _hardware_colouring(hw)
    n_colours = max(colour.values()) + 1
    part = _to_partitions(nodes, colour, n_colours, partitions)
    if qubits_per_partition is not None:
        chosen = _bfs_choice(hw, nodes, part, partitions, qubits_per_partition)
        nodes = [q for q in nodes if q in chosen]
    kept = set(nodes)
    edges = [
        (u, v) for u, v in hw.edges if u in kept and v in kept and part[u] != part[v]
    ]
    index = {q: k for k, q in enumerate(nodes)}
    parts = [[index[q] for q in nodes if part[q] == p] for p in range(partitions)]
    if any(not p for p in parts):
        raise ValueError(
            f"the hardware graph has {len(nodes)} usable qubits, too few for {partitions} "
            "non-empty partitions"
        )
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    coupling = torch.randn(len(edges), generator=gen, dtype=torch.float64) * scale
    return BoltzmannMachine(
        nodes,
        [(index[u], index[v]) for u, v in edges],
        coupling=coupling,
        parts=parts,
        dtype=dtype,
    )


def _hardware_graph(topology: str | None, shape: Any, graph: Any) -> Any:
    import networkx as nx

    if topology is not None and topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose one of {TOPOLOGIES}")
    if graph is not None:
        if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
            raise TypeError(
                f"graph must be an undirected networkx.Graph, got {type(graph).__name__}"
            )
        family = graph.graph.get("family")
        if topology is not None and family is not None and family != topology:
            raise ValueError(f"topology={topology!r} but the given graph is a {family} graph")
        return graph
    if topology is None or shape is None:
        raise ValueError("give a topology and its shape (e.g. 'pegasus', shape=16) or a graph")
    import dwave.graphs

    dims = [shape] if isinstance(shape, int) else list(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"shape must be a positive int or a sequence of them, got {shape!r}")
    return getattr(dwave.graphs, f"{topology}_graph")(*dims)


def _hardware_colouring(hw: Any) -> dict[Hashable, int]:
    """A proper colouring: the family's own (via coordinates), else a greedy one; checked."""
    colour = _family_colouring(hw)
    if colour is None or any(colour[u] == colour[v] for u, v in hw.edges):
        # no known family, or one with non-standard offsets the formula does not cover
        nodes = list(hw.nodes)
        index = {q: k for k, q in enumerate(nodes)}
        found = greedy_colouring(len(nodes), [(index[u], index[v]) for u, v in hw.edges])
        colour = dict(zip(nodes, found, strict=True))
    if any(colour[u] == colour[v] for u, v in hw.edges):  # pragma: no cover - a bug
        raise RuntimeError("the hardware graph colouring is not proper")
    used = sorted(set(colour.values()))  # compact the colour numbers to 0..k-1
    return {q: used.index(c) for q, c in colour.items()}


def _family_colouring(hw: Any) -> dict[Hashable, int] | None:
    import dwave.graphs as dg

    family, labels = hw.graph.get("family"), hw.graph.get("labels")
    rows, cols, tile = hw.graph.get("rows"), hw.graph.get("columns"), hw.graph.get("tile")
    to_coord: Callable[[Any], Any]
    if family == "chimera":
        colour_of = dg.chimera_two_color
        to_coord = dg.chimera_coordinates(rows, cols, tile).linear_to_chimera
    elif family == "pegasus":
        colour_of = dg.pegasus_four_color
        coords = dg.pegasus_coordinates(rows)
        to_coord = coords.nice_to_pegasus if labels == "nice" else coords.linear_to_pegasus
    elif family == "zephyr":
        colour_of = dg.zephyr_four_color
        to_coord = dg.zephyr_coordinates(rows, tile).linear_to_zephyr
    else:
        return None
    if labels == "coordinate":
        to_coord = tuple
    return {q: int(colour_of(to_coord(q))) for q in hw.nodes}


def _to_partitions(
    nodes: list[Hashable], colour: dict[Hashable, int], n_colours: int, k: int
) -> dict[Hashable, int]:
    if k <= n_colours:  # merge contiguous groups of colours
        return {q: colour[q] * k // n_colours for q in nodes}
    # split colour c into the partitions p with p % n_colours == c, round-robin in graph order
    split = {c: [p for p in range(k) if p % n_colours == c] for c in range(n_colours)}
    seen = dict.fromkeys(range(n_colours), 0)
    part = {}
    for q in nodes:
        c = colour[q]
        part[q] = split[c][seen[c] % len(split[c])]
        seen[c] += 1
    return part


def _bfs_choice(
    hw: Any, nodes: list[Hashable], part: dict[Hashable, int], k: int, per_part: int
) -> set[Hashable]:
    if isinstance(per_part, bool) or not isinstance(per_part, int) or per_part < 1:
        raise ValueError(f"qubits_per_partition must be an int >= 1, got {per_part!r}")
    order = {q: i for i, q in enumerate(nodes)}
    counts = [0] * k
    chosen: set[Hashable] = set()
    visited: set[Hashable] = set()
    for root in nodes:  # each component in turn, in graph order
        if root in visited:
            continue
        visited.add(root)
        queue = deque([root])
        while queue:
            q = queue.popleft()
            if counts[part[q]] < per_part:
                counts[part[q]] += 1
                chosen.add(q)
            if min(counts) == per_part:
                return chosen
            for nb in sorted(hw.neighbors(q), key=order.__getitem__):
                if nb not in visited:
                    visited.add(nb)
                    queue.append(nb)
    raise ValueError(
        f"qubits_per_partition={per_part} but the partitions have only "
        f"{[sum(1 for q in nodes if part[q] == p) for p in range(k)]} qubits"
    )


@torch.no_grad()
def to_rbm(bm: BoltzmannMachine) -> tuple[RBM, torch.Tensor] | None:
    """A two-colour (bipartite) model as an RBM: (rbm, order), where the RBM's z = [v, h] holds
    the model's units `order` (colour class 0 visible, class 1 hidden; couplings the graph lacks
    masked out). None for a model with more (or fewer) than two colour classes."""
    classes = bm.colour_classes
    if len(classes) != 2:
        return None
    v, h = classes
    n, device, dtype = bm.n_units, bm.bias.device, bm.bias.dtype
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[v] = torch.arange(v.numel())
    pos[h] = torch.arange(h.numel())
    in_v = torch.zeros(n, dtype=torch.bool)
    in_v[v] = True
    i, j = bm.edges[:, 0].cpu(), bm.edges[:, 1].cpu()
    vi = torch.where(in_v[i], i, j)  # the visible end of each edge
    hj = torch.where(in_v[i], j, i)
    weight = torch.zeros(v.numel(), h.numel(), dtype=dtype)
    weight[pos[vi], pos[hj]] = bm.coupling.detach().cpu()
    allowed = torch.zeros_like(weight)
    allowed[pos[vi], pos[hj]] = 1
    mask = None if bool(allowed.all()) else allowed
    rbm = RBM(int(v.numel()), int(h.numel()), mask=mask, dtype=dtype)
    rbm.weight.copy_(weight)
    rbm.visible_bias.copy_(bm.bias.detach().cpu()[v])
    rbm.hidden_bias.copy_(bm.bias.detach().cpu()[h])
    return rbm.to(device), torch.cat([v, h])
