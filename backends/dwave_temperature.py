"""Temperature at the QPU boundary: programming E/β̂, estimating β_eff, tracking β̂.

Spin convention (s ∈ {−1, +1}): E(s) = Σ_i h_i s_i + Σ_{i<j} J_ij s_i s_j. A QPU returns samples
≈ exp(−β_eff · E_prog(s)) of the Hamiltonian E_prog it was programmed with.

* `program_problem` builds E_prog = E/β̂ on the qubits (embedded), clipped to the solver's
  h_range/j_range with a warning, or refused past `max_clip_ratio`: a `QPUProgram`.
* `programmed_beta` estimates β_eff from logical samples against the logical Hamiltonian that
  was actually programmed (after chain splitting and clipping), via `mpl_estimate`.
* `mpl_estimate` is the maximum pseudo-likelihood estimate of β_eff: it maximises
  Σ_samples Σ_i log P(s_i | s_rest) = Σ log σ(−2 β s_i f_i), with the local field
  f_i = h_i + Σ_j J_ij s_j of the *programmed* Hamiltonian. The objective is concave in β, so the
  root of its derivative is unique. `mpl_beta` is its β alone.
* `BetaTracker` holds β̂ and the Fisher information behind it: a calibration (`init`, `update`
  per round, `final`) and the running re-estimates (`refine`).

The emulator's thermal sampler lives in `backends.dwave_emulator` (re-exported here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import dimod
import numpy as np
from scipy import sparse
from scipy.special import expit

from backends.dwave_emulator import ThermalIsingSampler  # noqa: F401 - its former home

#: Bracket of β_eff values the estimator searches.
BETA_BOUNDS = (1e-3, 1e3)
#: Calibration prior: a typical QPU β_eff is 5–8; the guess carries a 30% relative error.
BETA_GUESS, BETA_PRIOR_REL_SE = 5.0, 0.3
#: Calibration: at most this many rounds; it stops once β̂ moves by less than the tolerance.
CALIBRATION_ROUNDS, CALIBRATION_TOL = 3, 0.02
BETA_MEMORY = 0.9  # re-estimates: information of earlier calls decays by this factor per update
BETA_MAX_REL_SE = 0.05  # re-estimates less precise than this are skipped (near-zero RBMs)


class UninformativeSamples(ValueError):
    """The samples pin β_eff down to worse than the requested relative standard error (the
    programmed problem is too weak for them to say anything about the temperature)."""


class BetaEstimate(NamedTuple):
    """An estimate of β_eff and its Fisher information I (variance ≈ 1/I)."""

    beta: float
    information: float


def mpl_beta(spins: np.ndarray, fields: np.ndarray, beta0: float | None = None, *,
             max_relative_se: float | None = None) -> float:
    """The maximum pseudo-likelihood β of `mpl_estimate` (same arguments), without its
    information."""
    return mpl_estimate(spins, fields, beta0, max_relative_se=max_relative_se).beta


def mpl_estimate(spins: np.ndarray, fields: np.ndarray, beta0: float | None = None, *,
                 max_relative_se: float | None = None) -> BetaEstimate:
    """Maximum pseudo-likelihood β from spins s (R, n) and their local fields f (R, n), with
    I = −d²PL/dβ², the Fisher information of the estimate (its variance is ≈ 1/I for
    independent units).

    `beta0` is a starting guess (e.g. the previous estimate). Raises ValueError when the
    samples carry no information about β (all fields zero) or prefer a non-positive β (they
    are no colder than noise), and UninformativeSamples when the relative standard error
    1/(β √I) exceeds `max_relative_se`.

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
        return BetaEstimate(hi, 0.0)
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
    return BetaEstimate(float(beta), curvature)


def bipartite_fields(
    s_v: np.ndarray, s_h: np.ndarray, h_v: np.ndarray, h_h: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Local fields of a bipartite Ising model E = h_v·s_v + h_h·s_h + s_vᵀ J s_h."""
    s_v, s_h = s_v.astype(np.float32, copy=False), s_h.astype(np.float32, copy=False)
    j = j.astype(np.float32, copy=False)
    return h_v.astype(np.float32) + s_h @ j.T, h_h.astype(np.float32) + s_v @ j


def graph_fields(spins: np.ndarray, h: np.ndarray, edges: np.ndarray, j: np.ndarray
                 ) -> np.ndarray:
    """Local fields f = h + J s (R, n) of an Ising model on any graph: `edges` (m, 2) unit
    pairs, `j` (m,) their couplings (a sparse product, so a hardware graph costs O(m))."""
    n = spins.shape[1]
    rows, cols = edges[:, 0], edges[:, 1]
    jmat = sparse.coo_matrix((np.concatenate([j, j]).astype(np.float32),
                              (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
                             shape=(n, n)).tocsr()
    s = spins.astype(np.float32, copy=False)
    return h.astype(np.float32) + np.asarray(jmat @ s.T).T


@dataclass(frozen=True, eq=False)
class QPUProgram:
    """The physical problem one QPU call is programmed with, in spin form on the embedding's
    qubits (in `Embedding.qubits` order): linear biases `h`, couplers (`rows[k]`, `cols[k]`)
    of strength `j[k]` (problem couplers first, chain couplers after), how many terms were
    `clipped` to the solver's ranges and the largest `clip_ratio` before clipping."""

    h: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    j: np.ndarray
    clipped: int = 0
    clip_ratio: float = 0.0

    def bqm(self, labels: list[int], gauge: np.ndarray | None = None
            ) -> dimod.BinaryQuadraticModel:
        """The SPIN BQM on qubit `labels`, under the spin-reversal transform `gauge` (±1 per
        qubit: s_i → g_i s_i, so h_i → g_i h_i and J_ij → g_i g_j J_ij) when given."""
        h, j = self.h, self.j
        if gauge is not None:
            h, j = h * gauge, j * gauge[self.rows] * gauge[self.cols]
        return dimod.BinaryQuadraticModel.from_numpy_vectors(
            h, (self.rows, self.cols, j), 0.0, dimod.SPIN, variable_order=labels)


def program_problem(
    h: np.ndarray, j: np.ndarray, emb: Any, chain_strength: float, beta: float,
    h_range: Sequence[float], j_range: Sequence[float], max_clip_ratio: float,
) -> QPUProgram:
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
    return QPUProgram(hq, rows, cols, jq, clipped, ratio)


def programmed_beta(logical: np.ndarray, program: QPUProgram, emb: Any, n_visible: int | None,
                    beta0: float | None = None, max_relative_se: float | None = None
                    ) -> BetaEstimate:
    """MPL β_eff (and its information) of logical spins (R, n_units) under the logical
    Hamiltonian that `program` realises on intact chains (clipping and chain splitting
    included). `n_visible`: the RBM's first layer (a dense bipartite product); None: a model
    on any graph (a `BoltzmannMachine`; fields from its edge list). The pseudo-likelihood
    needs no bipartite structure: each unit's conditional given all others is
    σ(−2 β s_i f_i) on any graph, so the estimator is the same."""
    h, jvec = emb.contract(program.h, program.j[:emb.coupler_edge.size])
    if n_visible is None:
        fields = graph_fields(logical, h, emb.source_edges, jvec)
        return mpl_estimate(logical, fields, beta0=beta0, max_relative_se=max_relative_se)
    nv = n_visible
    jmat = np.zeros((nv, emb.n_units - nv), np.float32)
    jmat[emb.source_edges[:, 0], emb.source_edges[:, 1] - nv] = jvec
    fv, fh = bipartite_fields(logical[:, :nv], logical[:, nv:], h[:nv], h[nv:], jmat)
    return mpl_estimate(logical, np.concatenate([fv, fh], 1), beta0=beta0,
                        max_relative_se=max_relative_se)


@dataclass(frozen=True)
class Calibration:
    """What a calibration did: rounds run, the estimate of each round (None: the samples said
    nothing about β_eff) and the relative standard error of the β̂ it settled on."""

    rounds: int
    betas: list[float | None]
    relative_se: float


class BetaTracker:
    """β̂ and the Fisher information behind it (0: none yet).

    Calibration, while β̂ is unknown: `init()` gives the β to program first; after each round
    `update(estimate)` (None: the samples were uninformative) gives the β to program next, or
    None when the calibration is over; `final()` makes the result β̂. Each round combines its
    estimate with a weak prior (BETA_GUESS ± 30%) by Fisher information, so an RBM too weak to
    reveal the temperature (e.g. freshly initialised) keeps β̂ near the prior instead of
    chasing noise. Afterwards `refine(estimate)` folds a re-estimate into β̂, weighted by
    precision, forgetting earlier calls by BETA_MEMORY per update.
    """

    #: information of the calibration prior, (30% of BETA_GUESS)^-2
    PRIOR = (BETA_PRIOR_REL_SE * BETA_GUESS) ** -2

    def __init__(self, beta: float | None = None) -> None:
        self.fixed = beta  # the beta_eff option: what `reset` returns to
        self.beta, self.information = beta, 0.0
        self._round: tuple[float, float, list[float | None]] | None = None

    # ------------------------------------------------------------- calibration
    def init(self) -> float:
        """Start a calibration; the β to program for its first round."""
        self._round = (BETA_GUESS, self.PRIOR, [])
        return BETA_GUESS

    def update(self, estimate: BetaEstimate | None) -> float | None:
        """Record one calibration round; the β for the next round, or None when done (β̂
        self-consistent to CALIBRATION_TOL, uninformative samples, or rounds spent)."""
        if self._round is None:
            raise RuntimeError("BetaTracker.update before init")
        beta, information, history = self._round
        history.append(None if estimate is None else estimate.beta)
        if estimate is None:
            return None
        information = self.PRIOR + estimate.information
        new = (self.PRIOR * BETA_GUESS + estimate.information * estimate.beta) / information
        self._round = (new, information, history)
        done = abs(new / beta - 1) < CALIBRATION_TOL or len(history) >= CALIBRATION_ROUNDS
        return None if done else new

    def final(self) -> Calibration:
        """End the calibration: its β becomes β̂; what it did."""
        if self._round is None:
            raise RuntimeError("BetaTracker.final before init")
        beta, information, history = self._round
        self._round = None
        self.beta, self.information = beta, information
        return Calibration(len(history), history, 1 / (beta * math.sqrt(information)))

    # ------------------------------------------------------------- re-estimates
    def refine(self, estimate: BetaEstimate) -> None:
        """Fold a re-estimate from a sampling call into β̂ (precision-weighted running
        estimate that slowly forgets old calls)."""
        if self.beta is None:
            raise RuntimeError("BetaTracker.refine before calibration")
        self.information = BETA_MEMORY * self.information + estimate.information
        self.beta += (estimate.beta - self.beta) * estimate.information / self.information

    def reset(self) -> None:
        """Forget β̂ (back to the beta_eff option, or unknown)."""
        self.beta, self.information, self._round = self.fixed, 0.0, None
