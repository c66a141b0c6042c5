"""The QPU emulator: dwave-system's MockDWaveSampler with a thermal sampler substituted.

`make_emulator` builds a `MockDWaveSampler` on a Pegasus, Zephyr or Chimera graph whose
samples follow exp(−emulated_beta · E_prog) of the programmed problem — the thermal QPU model
the backend's β_eff calibration assumes — drawn by one of two substitute samplers:

* `ThermalIsingSampler` (emulator_sampler "thermal", the default): heat-bath MCMC at a fixed β
  on exactly the programmed (embedded) problem. Single-spin sweeps alone (simulated annealing
  with Gibbs acceptance at fixed β) cannot flip a chain once its coupling is strong: a flip must
  pass through a broken chain, which costs exp(−2 β |J_chain|) ≈ e^-12 at β = 6 and
  J_chain = −1. Measured on the 8×8 reference RBM embedded in Pegasus(6): TV 0.35 against a
  tolerance of 0.05. So each sweep also proposes collective flips of the clusters held together
  by strong ferromagnetic couplings (chains, found from the couplings alone; the emulator does
  not know the embedding), accepted with the exact heat-bath probability. Both moves keep
  exp(−β E_prog) invariant.
* dwave-samplers' `SimulatedAnnealingSampler` held at β (emulator_sampler
  "simulated_annealing"): exact without chains (native mode), mixes poorly across strong chains.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import dimod
import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import expit

from qvae import cancel

__all__ = ["DEFAULT_SHAPE", "TOPOLOGIES", "ThermalIsingSampler", "make_emulator", "topology_shape"]

#: topology name -> MockDWaveSampler's topology_shape for an int size
TOPOLOGIES = {"pegasus": lambda m: [m], "zephyr": lambda m: [m, 4], "chimera": lambda m: [m, m, 4]}
DEFAULT_SHAPE = {"pegasus": 6, "zephyr": 4, "chimera": 16}
ONE = np.float32(1.0)


def topology_shape(topology: str, shape: int | list[int] | None) -> list[int]:
    """MockDWaveSampler's topology_shape for a size (None: the default size of `topology`)."""
    shape = DEFAULT_SHAPE[topology] if shape is None else shape
    return TOPOLOGIES[topology](shape) if isinstance(shape, int) else list(shape)


def make_emulator(topology: str, shape: list[int], *, beta: float, sweeps: int,
                  sampler: Literal["thermal", "simulated_annealing"]) -> tuple[Any, str]:
    """(a MockDWaveSampler whose samples follow exp(−beta · E_prog), its solver id)."""
    from dwave.system.testing import MockDWaveSampler

    if sampler == "simulated_annealing":
        # dwave-samplers SA at fixed β with Gibbs acceptance: exact without chains (native
        # mode); single-spin moves cannot flip strong chains, so embedded mode mixes poorly.
        from dwave.samplers import SimulatedAnnealingSampler

        substitute: dimod.Sampler = SimulatedAnnealingSampler()
        kwargs: dict[str, Any] = {"beta_range": (beta, beta), "beta_schedule_type": "linear",
                                  "proposal_acceptance_criteria": "Gibbs",
                                  "num_sweeps": sweeps,
                                  # one β: no schedule array of emulator_sweeps βs
                                  "num_sweeps_per_beta": sweeps}
    else:
        substitute, kwargs = ThermalIsingSampler(), {"beta": beta, "num_sweeps": sweeps}
    qpu = MockDWaveSampler(topology_type=topology, topology_shape=shape,
                           parameter_warnings=False, substitute_sampler=substitute,
                           substitute_kwargs=kwargs)
    qpu.parameters["seed"] = []  # reproducible emulator runs
    return qpu, f"emulator-{topology}-" + "x".join(map(str, shape))


def _greedy_colouring(adj: sparse.csr_matrix) -> np.ndarray:
    """Colour the graph of a symmetric sparse matrix so that no edge joins equal colours."""
    n = adj.shape[0]
    colour = np.full(n, -1, dtype=np.int64)
    indptr, indices = adj.indptr, adj.indices
    order = np.argsort(-np.diff(indptr), kind="stable")  # largest degree first
    for i in order:
        taken = set(colour[indices[indptr[i]:indptr[i + 1]]].tolist())
        c = 0
        while c in taken:
            c += 1
        colour[i] = c
    return colour


class ThermalIsingSampler(dimod.Sampler):
    """Heat-bath MCMC for exp(−β E) of an Ising problem: chromatic single-spin sweeps plus
    collective flips of strongly ferromagnetically coupled clusters (see the module doc).

    Parameters of `sample`: `num_reads`, `seed`, `beta`, `num_sweeps`. QPU parameters that the
    emulator passes through (`annealing_time`, `auto_scale`, `answer_mode`, …) are ignored.
    """

    parameters: dict[str, list] = {"num_reads": [], "seed": [], "beta": [], "num_sweeps": []}
    properties: dict[str, Any] = {}

    def __init__(self, strong_fraction: float = 0.5) -> None:
        #: a ferromagnetic coupling joins a cluster when |J| >= strong_fraction * max |J|.
        self.strong_fraction = strong_fraction

    def sample(  # type: ignore[override]
        self,
        bqm: dimod.BinaryQuadraticModel,
        *,
        num_reads: int = 1,
        seed: int | None = None,
        beta: float = 1.0,
        num_sweeps: int = 100,
        **qpu_parameters: Any,
    ) -> dimod.SampleSet:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        labels = list(bqm.variables)
        n = len(labels)
        spin = bqm.spin
        h, (row, col, q), _ = spin.to_numpy_vectors(variable_order=labels)
        coo = sparse.coo_matrix((q, (row, col)), shape=(n, n))
        j = (coo + coo.T).tocsr().astype(np.float32)
        h = h.astype(np.float32)[:, None]
        rng = np.random.default_rng(seed)
        s = np.where(rng.random((n, num_reads)) < 0.5, -1.0, 1.0).astype(np.float32)
        colour = _greedy_colouring(j)
        single = [np.flatnonzero(colour == c) for c in range(int(colour.max(initial=-1)) + 1)]
        single_mats = [j[idx] for idx in single]
        groups = self._cluster_groups(j)
        b = np.float32(beta)
        for _ in range(num_sweeps):
            cancel.check()  # a service's wall-time limit or shutdown stops the run here
            for idx, rows in zip(single, single_mats, strict=True):
                field = h[idx] + rows @ s
                up = rng.random(field.shape, dtype=np.float32) < expit(-2 * b * field)
                s[idx] = np.where(up, ONE, -ONE)
            for members, boundary, aggregate, which in groups:
                local = s[members] * (h[members] + boundary @ s)
                delta = -2.0 * (aggregate @ local)  # energy change of flipping each cluster
                flip = rng.random(delta.shape, dtype=np.float32) < expit(-b * delta)
                s[members] *= np.where(flip[which], -ONE, ONE)
        samples = s.T.astype(np.int8)
        if bqm.vartype is dimod.BINARY:
            samples = (samples + 1) // 2
        out = dimod.SampleSet.from_samples_bqm((samples, labels), bqm)
        out.info.update(beta=float(beta), num_sweeps=num_sweeps)
        return out

    def _cluster_groups(self, j: sparse.csr_matrix) -> list[tuple[Any, ...]]:
        """Clusters of ≥ 2 spins joined by strong ferromagnetic couplings, in groups of
        mutually uncoupled clusters: (members, boundary couplings, member→cluster sum, index)."""
        n = j.shape[0]
        if j.nnz == 0:
            return []
        threshold = self.strong_fraction * float(np.abs(j.data).max())
        strong = j.copy()
        strong.data = (strong.data <= -threshold).astype(np.float32)
        strong.eliminate_zeros()
        _, label = connected_components(strong, directed=False)
        sizes = np.bincount(label)
        multi = np.flatnonzero(sizes >= 2)
        if multi.size == 0:
            return []
        member = sizes[label] >= 2
        # cluster adjacency: clusters coupled by any coupling must not flip simultaneously
        p = sparse.csr_matrix((np.ones(member.sum()), (np.flatnonzero(member),
                               np.searchsorted(multi, label[member]))), shape=(n, multi.size))
        adj = (p.T @ abs(j) @ p).tocsr()
        adj.setdiag(0)
        adj.eliminate_zeros()
        colour = _greedy_colouring(adj)
        groups = []
        for c in range(int(colour.max()) + 1):
            clusters = multi[colour == c]
            members = np.flatnonzero(np.isin(label, clusters))
            which = np.searchsorted(clusters, label[members])
            rows = j[members].tocoo()
            outside = label[members[rows.row]] != label[rows.col]  # drop intra-cluster bonds
            boundary = sparse.csr_matrix(
                (rows.data[outside], (rows.row[outside], rows.col[outside])),
                shape=(members.size, n), dtype=np.float32,
            )
            aggregate = sparse.csr_matrix(
                (np.ones(members.size, np.float32), (which, np.arange(members.size))),
                shape=(clusters.size, members.size),
            )
            groups.append((members, boundary, aggregate, which))
        return groups
