"""Mapping an RBM onto QPU qubits: cached minor-embeddings and hardware-native RBM masks.

* `get_embedding` finds a minor-embedding of the RBM's coupling graph in the solver's working
  graph and caches it on disk, keyed by solver, topology and a hash of the source edges, so only
  the first call pays. Dense RBMs on Chimera/Pegasus/Zephyr use minorminer's constructive
  biclique embeddings (`busclique`, seconds and short chains); anything else, or a failure,
  uses `minorminer.find_embedding`.
* `Embedding` is a vectorised form of `dwave.embedding.embed_bqm` / `unembed_sampleset` with
  majority vote, precomputed once per (embedding, source graph), so a call costs a few array
  operations instead of Python loops over ~10⁴ couplings.
* `native_rbm_mask` picks a bipartite subgraph of the working graph (one qubit per unit) on
  which an RBM needs no embedding at all.
* `Mappings` keeps one sampler's mapping per RBM shape in memory (embedded or native), and
  per `BoltzmannMachine` graph (`get_bm`: one qubit per unit when the model is a subgraph of
  the working graph, else a cached minor-embedding from `get_graph_embedding`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from qvae.atomic import write_bytes_atomic

Chains = dict[int, list[int]]


# ------------------------------------------------------------------ source graph
def rbm_edges(n_visible: int, n_hidden: int, mask: torch.Tensor | None) -> np.ndarray:
    """(E, 2) source edges (i, n_visible + j) of the RBM's coupling graph, row-major.

    Dense RBMs use every pair (so the embedding does not change as weights pass through zero);
    masked RBMs use the mask's nonzero entries.
    """
    if mask is None:
        rows, cols = np.divmod(np.arange(n_visible * n_hidden), n_hidden)
    else:
        rows, cols = np.nonzero(mask.detach().cpu().numpy())
    return np.stack([rows, cols + n_visible], 1).astype(np.int64)


def edges_key(n_units: int, edges: np.ndarray) -> str:
    """A short, stable hash of a source graph."""
    digest = hashlib.sha256(np.ascontiguousarray(edges, dtype=np.int64).tobytes())
    digest.update(str(n_units).encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$QVAE_CACHE_DIR/embeddings, else ~/.cache/qvae/embeddings."""
    root = os.environ.get("QVAE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "qvae") / "embeddings"


# -------------------------------------------------------------------- embedding
def find_embedding(
    source_edges: np.ndarray, n_visible: int, n_hidden: int, graph: nx.Graph, *,
    dense: bool, timeout: float, seed: int = 0,
) -> Chains:
    """A minor-embedding {unit: [qubits]} of the source graph in `graph` (ValueError if none)."""
    import minorminer

    if dense and graph.graph.get("family") in ("chimera", "pegasus", "zephyr"):
        try:
            from minorminer.busclique import busgraph_cache

            chains = busgraph_cache(graph).find_biclique_embedding(n_visible, n_hidden)
            if chains:
                return {int(k): [int(q) for q in v] for k, v in chains.items()}
        except Exception:  # noqa: BLE001 - any failure: fall through to the heuristic
            pass
    chains = minorminer.find_embedding(
        [tuple(e) for e in source_edges.tolist()], list(graph.edges),
        random_seed=seed, timeout=timeout,
    )
    if not chains or len(chains) < n_visible + n_hidden:
        raise ValueError(
            f"no embedding of the {n_visible}x{n_hidden} RBM ({len(source_edges)} couplings) "
            f"in the {graph.number_of_nodes()}-qubit working graph within {timeout} s; "
            "use a smaller RBM, a sparser mask, mode='native', or a larger embedding_timeout"
        )
    return {int(k): [int(q) for q in v] for k, v in chains.items()}


def get_embedding(
    source_edges: np.ndarray, n_visible: int, n_hidden: int, graph: nx.Graph, *,
    solver_id: str, cache_dir: Path | None, timeout: float, refresh: bool = False,
) -> tuple[Chains, str, float]:
    """(chains, "hit"|"miss", seconds spent finding it) through the on-disk cache
    (`refresh` ignores a cached entry and overwrites it)."""
    topo = graph.graph.get("name", f"{graph.number_of_nodes()}q")
    digest = edges_key(n_visible + n_hidden, source_edges)
    key = f"{solver_id}|{topo}|{n_visible}x{n_hidden}|{digest}"
    path = None
    if cache_dir is not None:
        name = hashlib.sha256(key.encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"{name}.json"
        if path.exists() and not refresh:
            try:
                data = json.loads(path.read_text())
                chains = {int(k): v for k, v in data["chains"].items()}
                if data.get("key") == key and all(graph.has_node(q) for c in chains.values()
                                                   for q in c):
                    return chains, "hit", 0.0
            except (OSError, ValueError, KeyError):
                pass  # unreadable or stale: recompute and overwrite
    start = time.perf_counter()
    dense = len(source_edges) == n_visible * n_hidden
    chains = find_embedding(source_edges, n_visible, n_hidden, graph, dense=dense,
                            timeout=timeout)
    seconds = time.perf_counter() - start
    if path is not None:
        write_bytes_atomic(path, json.dumps({"key": key, "seconds": seconds,
                                             "chains": chains}).encode())
    return chains, "miss", seconds


def find_graph_embedding(source_edges: np.ndarray, n_units: int, graph: nx.Graph, *,
                         timeout: float, seed: int = 0) -> Chains:
    """A minor-embedding {unit: [qubits]} of a graph on units 0..n_units-1 (a Boltzmann
    machine's) in `graph`, ValueError if none. Dense graphs (at least half of all pairs
    coupled, e.g. a complete k-partite model) on Chimera/Pegasus/Zephyr use minorminer's
    constructive clique embedding (`busclique`: seconds, short uniform chains, and it embeds
    every subgraph of K_n); anything else, or a failure, `minorminer.find_embedding`."""
    import minorminer

    dense = len(source_edges) >= 0.5 * n_units * (n_units - 1) / 2
    if dense and graph.graph.get("family") in ("chimera", "pegasus", "zephyr"):
        try:
            from minorminer.busclique import busgraph_cache

            chains = busgraph_cache(graph).find_clique_embedding(n_units)
            if chains and len(chains) == n_units:
                return {int(k): [int(q) for q in v] for k, v in chains.items()}
        except Exception:  # noqa: BLE001 - any failure: fall through to the heuristic
            pass
    chains = minorminer.find_embedding(
        [tuple(e) for e in source_edges.tolist()], list(graph.edges),
        random_seed=seed, timeout=timeout,
    )
    isolated = set(range(n_units)) - {int(u) for e in source_edges.tolist() for u in e}
    free = (q for q in sorted(graph) if not any(q in c for c in chains.values()))
    for u in sorted(isolated):  # units without couplings: any unused qubit
        chains[u] = [next(free, None)]
    if not chains or len(chains) < n_units or any(c == [None] for c in chains.values()):
        raise ValueError(
            f"no embedding of the {n_units}-unit Boltzmann machine ({len(source_edges)} "
            f"couplings) in the {graph.number_of_nodes()}-qubit working graph within {timeout} "
            "s; use a smaller or sparser model, a QPU-native one (qvae.boltzmann_graphs."
            "qpu_native on the solver's graph) or a larger embedding_timeout")
    return {int(k): [int(q) for q in v] for k, v in chains.items()}


def _read_cached(path: Path, key: str, graph: nx.Graph) -> Chains | None:
    try:
        data = json.loads(path.read_text())
        chains = {int(k): v for k, v in data["chains"].items()}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or stale: recompute and overwrite
    if data.get("key") == key and all(graph.has_node(q) for c in chains.values() for q in c):
        return chains
    return None


def get_graph_embedding(
    source_edges: np.ndarray, n_units: int, graph: nx.Graph, *, solver_id: str,
    cache_dir: Path | None, timeout: float, refresh: bool = False,
) -> tuple[Chains, str, float]:
    """`get_embedding` for a graph on units 0..n_units-1 (a Boltzmann machine's): (chains,
    "hit"|"miss", seconds spent finding it), through the same on-disk cache."""
    topo = graph.graph.get("name", f"{graph.number_of_nodes()}q")
    key = f"{solver_id}|{topo}|graph{n_units}|{edges_key(n_units, source_edges)}"
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        if path.exists() and not refresh:
            chains = _read_cached(path, key, graph)
            if chains is not None:
                return chains, "hit", 0.0
    start = time.perf_counter()
    chains = find_graph_embedding(source_edges, n_units, graph, timeout=timeout)
    seconds = time.perf_counter() - start
    if path is not None:
        write_bytes_atomic(path, json.dumps({"key": key, "seconds": seconds,
                                             "chains": chains}).encode())
    return chains, "miss", seconds


def native_misfit(variables: list[Any], edges: np.ndarray, graph: nx.Graph) -> str | None:
    """None when a model on `variables` with couplings `edges` (index pairs) is a subgraph of
    the working graph (every variable a working qubit, every coupling a coupler); else what is
    missing, in words."""
    absent = [v for v in variables if not graph.has_node(v)]
    if absent:
        return (f"{len(absent)} of its {len(variables)} variables are not working qubits "
                f"(e.g. {absent[:5]})")
    off = [(variables[i], variables[j]) for i, j in edges.tolist()
           if not graph.has_edge(variables[i], variables[j])]
    if off:
        return (f"{len(off)} of its {len(edges)} couplings join qubits that share no coupler "
                f"(e.g. {off[:3]})")
    return None


class Embedding:
    """Precomputed index arrays for embedding a logical Ising problem and unembedding samples.

    Qubits are kept in `self.qubits` order. Each logical coupling (u, v) is split evenly over
    all couplers between chain u and chain v; each linear bias evenly over its chain's qubits
    (as `dwave.embedding.embed_bqm` does in spin space); couplers inside a chain get
    −chain_strength.
    """

    def __init__(self, chains: Chains, n_units: int, source_edges: np.ndarray,
                 target_edges: Iterable[tuple[int, int]]) -> None:
        missing = [u for u in range(n_units) if not chains.get(u)]
        if missing:
            raise ValueError(f"embedding has no chain for unit(s) {missing[:5]}")
        self.qubits = np.array([q for u in range(n_units) for q in chains[u]], dtype=np.int64)
        self.chain = np.repeat(np.arange(n_units), [len(chains[u]) for u in range(n_units)])
        if len(set(self.qubits.tolist())) != self.qubits.size:
            raise ValueError("embedding chains overlap")
        self.n_units = n_units
        self.source_edges = np.asarray(source_edges, dtype=np.int64).reshape(-1, 2)
        self.chain_size = np.bincount(self.chain, minlength=n_units)
        pos = {int(q): i for i, q in enumerate(self.qubits)}
        edge_id = {(int(a), int(b)): e for e, (a, b) in enumerate(source_edges)}
        inter, chain_edges = [], []
        for a, b in target_edges:
            ia, ib = pos.get(a), pos.get(b)
            if ia is None or ib is None:
                continue
            ua, ub = int(self.chain[ia]), int(self.chain[ib])
            if ua == ub:
                chain_edges.append((ia, ib))
                continue
            e = edge_id.get((ua, ub), edge_id.get((ub, ua)))
            if e is not None:
                inter.append((ia, ib, e))
        arr = np.array(inter, dtype=np.int64).reshape(-1, 3)
        self.coupler_a, self.coupler_b, self.coupler_edge = arr[:, 0], arr[:, 1], arr[:, 2]
        self.per_edge = np.bincount(self.coupler_edge, minlength=len(source_edges))
        if len(source_edges) and self.per_edge.min() == 0:
            bad = int(np.argmin(self.per_edge))
            raise ValueError(f"embedding misses coupling {tuple(source_edges[bad].tolist())}: "
                             "no coupler between its chains")
        ce = np.array(chain_edges, dtype=np.int64).reshape(-1, 2)
        self.chain_a, self.chain_b = ce[:, 0], ce[:, 1]
        self.multi = self.chain_size > 1
        self.starts = np.concatenate([[0], np.cumsum(self.chain_size)[:-1]])  # chains contiguous
        self.native = False  # unit i on qubit variables[i] (a BM that is a hardware subgraph)

    @property
    def max_chain_length(self) -> int:
        return int(self.chain_size.max())

    @property
    def mean_chain_length(self) -> float:
        return float(self.chain_size.mean())

    def embed(self, h: np.ndarray, j: np.ndarray, chain_strength: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Physical (h_q, rows, cols, J) in qubit positions; chain couplers last."""
        hq = h[self.chain] / self.chain_size[self.chain]
        jq = j[self.coupler_edge] / self.per_edge[self.coupler_edge]
        jc = np.full(self.chain_a.size, -float(chain_strength))
        rows = np.concatenate([self.coupler_a, self.chain_a])
        cols = np.concatenate([self.coupler_b, self.chain_b])
        return hq, rows, cols, np.concatenate([jq, jc])

    def contract(self, hq: np.ndarray, jq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The logical problem that physical (hq, problem couplers jq) realise on intact chains."""
        h = np.bincount(self.chain, weights=hq, minlength=self.n_units)
        j = np.bincount(self.coupler_edge, weights=jq, minlength=self.per_edge.size)
        return h, j

    def unembed(self, spins: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Majority vote (ties broken at random): logical spins (R, n_units) and the fraction of
        (read, chain) pairs whose chain was broken."""
        total = np.add.reduceat(spins, self.starts, axis=1, dtype=np.int16)  # (R, n_units)
        out = np.sign(total).astype(np.float32)
        ties = out == 0
        if ties.any():
            out[ties] = np.where(rng.random(int(ties.sum())) < 0.5, -1.0, 1.0)
        broken = np.abs(total[:, self.multi]) < self.chain_size[self.multi]
        fraction = float(broken.sum()) / max(1, total.shape[0] * self.n_units)
        return out, fraction


# ------------------------------------------------------------------ native masks
def working_graph(sampler_or_graph: Any) -> nx.Graph:
    """The qubit graph of a networkx graph, a dimod structured sampler, or a dwave backend."""
    if isinstance(sampler_or_graph, nx.Graph):
        return sampler_or_graph
    if hasattr(sampler_or_graph, "working_graph"):  # DWaveBackend
        return sampler_or_graph.working_graph()
    if hasattr(sampler_or_graph, "to_networkx_graph"):
        return sampler_or_graph.to_networkx_graph()
    if hasattr(sampler_or_graph, "nodelist") and hasattr(sampler_or_graph, "edgelist"):
        g = nx.Graph()
        g.add_nodes_from(sampler_or_graph.nodelist)
        g.add_edges_from(sampler_or_graph.edgelist)
        return g
    raise TypeError(
        "expected a networkx graph, a dimod structured sampler or a dwave backend, got "
        f"{type(sampler_or_graph).__name__}"
    )


def _shores(graph: nx.Graph) -> dict[int, int]:
    """A 2-colouring: proper for bipartite graphs (Chimera), else by qubit orientation for
    Pegasus/Zephyr (keeps the ~80% of couplers that join orthogonal qubits), else BFS parity."""
    family = graph.graph.get("family")
    if family in ("pegasus", "zephyr") and graph.graph.get("labels") == "int":
        import dwave.graphs as dnx

        if family == "pegasus":
            coords = dnx.pegasus_coordinates(graph.graph["rows"])
            return {q: coords.linear_to_pegasus(q)[0] for q in graph}
        coords = dnx.zephyr_coordinates(graph.graph["rows"], graph.graph["tile"])
        return {q: coords.linear_to_zephyr(q)[0] for q in graph}
    if nx.is_bipartite(graph):
        return nx.bipartite.color(graph)
    colour: dict[int, int] = {}
    for start in sorted(graph):
        if start not in colour:
            for q, depth in nx.single_source_shortest_path_length(graph, start).items():
                colour[q] = depth % 2
    return colour


def native_rbm_mask(
    sampler_or_graph: Any, n_visible: int, n_hidden: int
) -> tuple[torch.Tensor, list[int], list[int]]:
    """An RBM connectivity that is a bipartite subgraph of the QPU working graph.

    Returns (mask (n_visible, n_hidden), visible_qubits, hidden_qubits): unit i of the visible
    layer sits on qubit visible_qubits[i], hidden unit j on hidden_qubits[j], and mask[i, j] = 1
    exactly where those qubits share a coupler. The qubits grow greedily from the best-connected
    qubit, each step adding the qubit (of the shore still short of units) with the most
    couplers to already chosen qubits of the other shore. Deterministic for a given graph.
    """
    for name, n in (("n_visible", n_visible), ("n_hidden", n_hidden)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    graph = working_graph(sampler_or_graph)
    side = _shores(graph)
    nodes = sorted(graph)
    sizes = [sum(1 for q in nodes if side[q] == s) for s in (0, 1)]
    if n_visible > sizes[0] or n_hidden > sizes[1]:
        raise ValueError(f"a native {n_visible}x{n_hidden} RBM needs more qubits than the "
                         f"working graph's shores offer ({sizes[0]} and {sizes[1]})")
    cross = {q: [p for p in graph[q] if side[p] != side[q]] for q in nodes}
    need = {0: n_visible, 1: n_hidden}
    chosen: dict[int, list[int]] = {0: [], 1: []}
    taken: set[int] = set()
    score: dict[int, int] = {}  # frontier: couplers to chosen qubits of the other shore
    while need[0] or need[1]:
        candidates = [q for q in score if need[side[q]]]
        if not candidates:  # first step, or the frontier ran dry: start at the best-connected
            best = max((q for q in nodes if need[side[q]] and q not in taken),
                       key=lambda q: (len(cross[q]), -q))
        else:
            best = max(candidates, key=lambda q: (score[q], -q))
        score.pop(best, None)
        taken.add(best)
        chosen[side[best]].append(best)
        need[side[best]] -= 1
        for p in cross[best]:
            if p not in taken:
                score[p] = score.get(p, 0) + 1
    vis, hid = sorted(chosen[0]), sorted(chosen[1])
    mask = torch.tensor([[float(graph.has_edge(a, b)) for b in hid] for a in vis])
    return mask, vis, hid


def native_embedding(graph: nx.Graph, n_visible: int, n_hidden: int,
                     qubits: tuple[list[int], list[int]] | None, solver_id: str) -> Embedding:
    """One qubit per unit: `qubits` = (visible, hidden) or, when None, `native_rbm_mask`'s."""
    nv, nh = n_visible, n_hidden
    if qubits is None:
        _, vq, hq = native_rbm_mask(graph, nv, nh)
    else:
        vq, hq = qubits
        if (len(vq), len(hq)) != (nv, nh):
            raise ValueError(f"native_qubits has {len(vq)}+{len(hq)} qubits but the RBM is "
                             f"{nv}x{nh}")
        absent = [q for q in vq + hq if not graph.has_node(q)]
        if absent:
            raise ValueError(f"native_qubits {absent[:5]} are not working qubits of {solver_id}")
    edges = np.array([(i, nv + k) for i, a in enumerate(vq) for k, b in enumerate(hq)
                      if graph.has_edge(a, b)], np.int64).reshape(-1, 2)
    return Embedding({i: [q] for i, q in enumerate(vq + hq)}, nv + nh, edges, graph.edges)


def check_native(rbm: Any, emb: Embedding, solver_id: str) -> None:
    """ValueError naming the first RBM coupling that is not a coupler of the native mapping."""
    nv, nh = rbm.n_visible, rbm.n_hidden
    w = rbm.effective_weight().detach().cpu()
    allowed = torch.zeros(nv, nh, dtype=torch.bool)
    src = torch.from_numpy(emb.source_edges)
    allowed[src[:, 0], src[:, 1] - nv] = True
    bad = (w != 0) & ~allowed
    if bad.any():
        i, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"native mode: coupling W[{i}, {k}] = {float(w[i, k]):.4g} joins qubits "
            f"{int(emb.qubits[i])} and {int(emb.qubits[nv + k])}, which share no coupler on "
            f"{solver_id} ({int(bad.sum())} such couplings); build the RBM with the mask from "
            "native_rbm_mask(sampler, n_visible, n_hidden)")


class Mappings:
    """The unit→qubit mapping of each RBM shape one sampler meets, kept in memory: a
    minor-embedding (from the disk cache of `get_embedding`, or found) or native qubits."""

    def __init__(self, cache_dir: Path, timeout: float) -> None:
        self.cache_dir, self.timeout = cache_dir, timeout
        self._known: dict[tuple, Embedding] = {}

    def get(self, rbm: Any, graph: nx.Graph, solver_id: str, *, native: bool,
            native_qubits: tuple[list[int], list[int]] | None = None
            ) -> tuple[Embedding, str, float]:
        """(mapping, where it came from: native / memory / hit / miss, seconds spent finding
        it). Native mode also checks that the RBM's couplings are couplers."""
        nv, nh = rbm.n_visible, rbm.n_hidden
        if native:
            key: tuple = ("native", nv, nh)
            if key not in self._known:
                self._known[key] = native_embedding(graph, nv, nh, native_qubits, solver_id)
            check_native(rbm, self._known[key], solver_id)
            return self._known[key], "native", 0.0
        edges = rbm_edges(nv, nh, rbm.mask)
        key = ("embedded", nv, nh, edges.tobytes())
        if key in self._known:
            return self._known[key], "memory", 0.0
        find = dict(solver_id=solver_id, cache_dir=self.cache_dir, timeout=self.timeout)
        chains, status, seconds = get_embedding(edges, nv, nh, graph, **find)
        try:
            emb = Embedding(chains, nv + nh, edges, graph.edges)
        except ValueError:  # a cached embedding that no longer fits (e.g. qubits went away)
            chains, status, seconds = get_embedding(edges, nv, nh, graph, refresh=True, **find)
            emb = Embedding(chains, nv + nh, edges, graph.edges)
        self._known[key] = emb
        return emb, status, seconds

    def get_bm(self, bm: Any, graph: nx.Graph, solver_id: str, *, native: bool
               ) -> tuple[Embedding, str, float]:
        """The mapping of a `BoltzmannMachine`: (mapping, native / memory / hit / miss,
        seconds). When its `variables` are working qubits and its couplings couplers (a
        `qpu_native` model of this solver), unit i sits on qubit variables[i]: no chains, in
        either mode (one qubit per unit is the shortest embedding there is). Otherwise
        `native` raises a ValueError naming what is missing and embedded mode minor-embeds
        it (cached like an RBM's)."""
        edges = bm.edges.detach().cpu().numpy().astype(np.int64)
        key: tuple = ("bm", tuple(bm.variables), edges.tobytes())
        if key in self._known:
            emb = self._known[key]
            return emb, "native" if emb.native else "memory", 0.0
        misfit = native_misfit(bm.variables, edges, graph)
        if misfit is None:
            emb = Embedding({i: [int(q)] for i, q in enumerate(bm.variables)}, bm.n_units,
                            edges, graph.edges)
            emb.native = True
            self._known[key] = emb
            return emb, "native", 0.0
        if native:
            raise ValueError(
                f"native mode: this Boltzmann machine is not a subgraph of {solver_id}'s "
                f"working graph: {misfit}; build it with qvae.boltzmann_graphs.qpu_native("
                "None, partitions, graph=sampler.working_graph()) or use mode='embedded'")
        find = dict(solver_id=solver_id, cache_dir=self.cache_dir, timeout=self.timeout)
        chains, status, seconds = get_graph_embedding(edges, bm.n_units, graph, **find)
        try:
            emb = Embedding(chains, bm.n_units, edges, graph.edges)
        except ValueError:  # a cached embedding that no longer fits
            chains, status, seconds = get_graph_embedding(edges, bm.n_units, graph,
                                                          refresh=True, **find)
            emb = Embedding(chains, bm.n_units, edges, graph.edges)
        self._known[key] = emb
        return emb, status, seconds
