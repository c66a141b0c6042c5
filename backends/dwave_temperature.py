"""Temperature at the QPU boundary: programming E/β̂, estimating β_eff, and the emulator.

Spin convention (s ∈ {−1, +1}): E(s) = Σ_i h_i s_i + Σ_{i<j} J_ij s_i s_j. A QPU returns samples
≈ exp(−β_eff · E_prog(s)) of the Hamiltonian E_prog it was programmed with.

* `program_problem` builds E_prog = E/β̂ on the qubits (embedded), clipped to the solver's
  h_range/j_range with a warning, or refused past `max_clip_ratio`.
* `programmed_beta` estimates β_eff from logical samples against the logical Hamiltonian that
  was actually programmed (after chain splitting and clipping), via `mpl_beta`.
* `mpl_beta` is the maximum pseudo-likelihood estimate of β_eff: it maximises
  Σ_samples Σ_i log P(s_i | s_rest) = Σ log σ(−2 β s_i f_i), with the local field
  f_i = h_i + Σ_j J_ij s_j of the *programmed* Hamiltonian. The objective is concave in β, so the
  root of its derivative is unique.
* `ThermalIsingSampler` is the emulator's stand-in for the QPU: heat-bath MCMC at a fixed β on
  exactly the programmed (embedded) problem. Single-spin sweeps alone (simulated annealing with
  Gibbs acceptance at fixed β) cannot flip a chain once its coupling is strong: a flip must pass
  through a broken chain, which costs exp(−2 β |J_chain|) ≈ e^-12 at β = 6 and J_chain = −1.
  Measured on the 8×8 reference RBM embedded in Pegasus(6): TV 0.35 against a tolerance of 0.05.
  So each sweep also proposes collective flips of the clusters held together by strong
  ferromagnetic couplings (chains, found from the couplings alone; the emulator does not know
  the embedding), accepted with the exact heat-bath probability. Both moves keep
  exp(−β E_prog) invariant, which is the thermal QPU model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import dimod
import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import expit

from qvae import cancel

#: Bracket of β_eff values the estimator searches.
BETA_BOUNDS = (1e-3, 1e3)
ONE = np.float32(1.0)


class UninformativeSamples(ValueError):
    """The samples pin β_eff down to worse than the requested relative standard error (the
    programmed problem is too weak for them to say anything about the temperature)."""


def mpl_beta(spins: np.ndarray, fields: np.ndarray, beta0: float | None = None, *,
             with_information: bool = False, max_relative_se: float | None = None) -> Any:
    """Maximum pseudo-likelihood β from spins s (R, n) and their local fields f (R, n).

    `beta0` is a starting guess (e.g. the previous estimate). With `with_information`, returns
    (β, I) where I = −d²PL/dβ² is the Fisher information of the estimate (its variance is
    ≈ 1/I for independent units). Raises ValueError when the samples carry no information
    about β (all fields zero) or prefer a non-positive β (they are no colder than noise), and
    UninformativeSamples when the relative standard error 1/(β √I) exceeds `max_relative_se`.

    It is the estimator of `dwave.system.temperatures.maximum_pseudolikelihood_temperature`
    (β = 1/T, with en1 = 2 s f), kept because that one returns no Fisher information (only
    bootstrap, one solve per replicate), which the precision-weighted β̂ and the
    UninformativeSamples refusal need, and is slower: on the same samples both agree to
    < 3e-8 relative, in 0.009 s (ours) against 0.12 s (Ocean from the BQM) for 10,000 reads of
    an 8×8 RBM and 0.056 s against 1.35 s (0.87 s given our fields) for 5,000 reads of a
    100×100 RBM (benchmarks/ocean_parity.py; tests/test_ocean.py checks the agreement).
    """
    x = (np.asarray(spins, np.float32) * np.asarray(fields, np.float32)).ravel()
    x = x[x != 0]
    if x.size == 0:
        raise ValueError("cannot estimate beta_eff: every local field is zero")
    lo, hi = BETA_BOUNDS
    limit = 0.0 if max_relative_se is None else max_relative_se**-2
    # I(β) <= Σ x² (as σ(1−σ) <= 1/4): reject hopeless samples near beta0 before any work
    if beta0 and beta0**2 * float(np.sum(np.square(x, dtype=np.float64))) < limit:
        raise UninformativeSamples(f"the samples cannot pin beta_eff to {max_relative_se:.0%}")
    guess = beta0 if beta0 else 1.0 / float(np.mean(np.abs(x), dtype=np.float64))
    if np.sum(x, dtype=np.float64) >= 0:  # slope at β = 0 is −Σ x: no positive maximum
        raise ValueError(
            "cannot estimate beta_eff: the samples are not colder than uniform noise "
            f"(mean s_i*f_i = {x.mean():.3g} >= 0); is the QPU returning garbage?"
        )
    if np.all(x < 0):  # perfectly ordered samples: the likelihood grows without bound
        return (hi, 0.0) if with_information else hi
    # safeguarded Newton on the concave pseudo-log-likelihood; its slope g decreases in β
    beta = min(max(guess, lo), hi)
    xx = x * x
    for _ in range(100):
        p = expit(np.float32(2.0 * beta) * x)
        g = -2.0 * float(np.sum(x * p, dtype=np.float64))  # ufuncs, not BLAS (thread spin)
        if g > 0:
            lo = beta
        else:
            hi = beta
        curvature = 4.0 * float(np.sum(xx * (p * (1 - p)), dtype=np.float64))
        step = beta + g / curvature if curvature > 0 else math.inf
        new = step if lo < step < hi else math.sqrt(lo * hi)  # else bisect (geometrically)
        done = abs(new - beta) <= 1e-7 * beta
        beta = new
        if done:
            break
    if beta**2 * curvature < limit:
        se = 1 / math.sqrt(beta**2 * curvature) if curvature > 0 else math.inf
        raise UninformativeSamples(f"beta_eff = {beta:.4g} has relative standard error "
                                   f"{se:.1%} > {max_relative_se:.0%}")
    return (float(beta), curvature) if with_information else float(beta)


def bipartite_fields(
    s_v: np.ndarray, s_h: np.ndarray, h_v: np.ndarray, h_h: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Local fields of a bipartite Ising model E = h_v·s_v + h_h·s_h + s_vᵀ J s_h."""
    s_v, s_h = s_v.astype(np.float32, copy=False), s_h.astype(np.float32, copy=False)
    j = j.astype(np.float32, copy=False)
    return h_v.astype(np.float32) + s_h @ j.T, h_h.astype(np.float32) + s_v @ j


def program_problem(
    h: np.ndarray, j: np.ndarray, emb: Any, chain_strength: float, beta: float,
    h_range: Sequence[float], j_range: Sequence[float], max_clip_ratio: float,
) -> dict[str, Any]:
    """The physical problem for E/β: scale the logical Ising (h, J per source edge) by 1/β,
    embed it (`emb`: a `dwave_embedding.Embedding`), clip to the solver's ranges with a warning
    saying by how much, and refuse (ValueError, nothing submitted) past `max_clip_ratio`."""
    hq, rows, cols, jq = emb.embed(h / beta, j / beta, chain_strength)
    n_prob = emb.coupler_edge.size  # problem couplers first, chain couplers after
    if not (np.all(np.isfinite(hq)) and np.all(np.isfinite(jq))):
        raise ValueError(f"programmed problem is not finite (beta_eff = {beta!r})")
    (hlo, hhi), (jlo, jhi) = h_range, j_range
    ratio = max(float(np.max(np.maximum(hq / hhi, hq / hlo), initial=0.0)),
                float(np.max(np.maximum(jq[:n_prob] / jhi, jq[:n_prob] / jlo), initial=0.0)))
    clipped = 0
    if ratio > 1:
        if ratio > max_clip_ratio:
            raise ValueError(
                f"programmed problem exceeds the solver's h_range {[hlo, hhi]} / j_range "
                f"{[jlo, jhi]} by a factor {ratio:.3g} > max_clip_ratio {max_clip_ratio} "
                f"(beta_eff = {beta:.4g}); not submitted")
        clipped = int(np.sum((hq < hlo) | (hq > hhi)) +
                      np.sum((jq[:n_prob] < jlo) | (jq[:n_prob] > jhi)))
        hq = np.clip(hq, hlo, hhi)
        jq[:n_prob] = np.clip(jq[:n_prob], jlo, jhi)
        warnings.warn(
            f"dwave: {clipped} of {hq.size + n_prob} programmed terms exceed the solver's "
            f"h_range {[hlo, hhi]} / j_range {[jlo, jhi]} by up to a factor {ratio:.3g}; "
            "clipped, so those terms are sampled weaker than the RBM says", stacklevel=5)
    return {"h": hq, "rows": rows, "cols": cols, "j": jq, "clipped": clipped,
            "clip_ratio": ratio}


def programmed_beta(logical: np.ndarray, program: dict[str, Any], emb: Any, n_visible: int,
                    beta0: float | None = None, max_relative_se: float | None = None
                    ) -> tuple[float, float]:
    """(MPL β_eff, its Fisher information) of logical spins (R, n_units) under the logical
    Hamiltonian that `program` realises on intact chains (clipping and chain splitting
    included)."""
    nv = n_visible
    h, jvec = emb.contract(program["h"], program["j"][:emb.coupler_edge.size])
    jmat = np.zeros((nv, emb.n_units - nv), np.float32)
    jmat[emb.source_edges[:, 0], emb.source_edges[:, 1] - nv] = jvec
    fv, fh = bipartite_fields(logical[:, :nv], logical[:, nv:], h[:nv], h[nv:], jmat)
    return mpl_beta(logical, np.concatenate([fv, fh], 1), beta0=beta0, with_information=True,
                    max_relative_se=max_relative_se)


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
