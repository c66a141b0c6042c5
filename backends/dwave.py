"""`dwave`: the RBM prior sampled on a D-Wave QPU (or its offline emulator), with neal fallback.

Temperature (see docs/qpu-temperature.md). Write E for the RBM energy in spin form. A QPU
returns samples ≈ exp(−β_eff · E_prog) of the Hamiltonian it is programmed with. The backend
programs E_prog = E / β̂ (auto_scale off), clipped to the solver's h_range / j_range with a
warning, so samples follow exp(−(β_eff / β̂) · E) = exp(−E) once β̂ = β_eff. β̂ comes from
`beta_eff` or from calibration calls (maximum pseudo-likelihood of β_eff with respect to the
*programmed* logical Hamiltonian, iterated until β̂ is self-consistent to 2%), and is re-estimated
from the returned samples every `beta_every` calls.

Mapping: `embedded` (default) minor-embeds the RBM (cached on disk) with chains of strength
`chain_strength` and majority-vote unembedding; `native` puts unit i on one qubit and needs an
RBM whose couplings are QPU couplers (build its mask with `native_rbm_mask`).

Failures never stop a training run unless `strict=True`: no token / solver / network, an
exhausted `qpu_time_budget_s` (with `on_budget="fallback"`) or transient errors that outlast
`max_retries` hand the call to the `neal` backend, loudly, and record it in `info["fallback"]`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

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
    option_values,
)
from backends.dwave_embedding import (
    Embedding,
    check_native,
    default_cache_dir,
    get_embedding,
    native_embedding,
    native_rbm_mask,
    rbm_edges,
)
from backends.dwave_temperature import (
    ThermalIsingSampler,
    UninformativeSamples,
    program_problem,
    programmed_beta,
)
from backends.neal import SEED_LIMIT
from qvae.rbm import RBM

__all__ = ["DWaveBackend", "QPUBudgetExceeded", "QPUFallbackWarning", "QPUMeter",
           "native_rbm_mask", "qpu_status"]

MODES = ("embedded", "native")
EMULATOR_SAMPLERS = ("thermal", "simulated_annealing")
TOPOLOGIES = {"pegasus": lambda m: [m], "zephyr": lambda m: [m, 4], "chimera": lambda m: [m, m, 4]}
DEFAULT_SHAPE = {"pegasus": 6, "zephyr": 4, "chimera": 16}
BETA_GUESS, BETA_PRIOR_REL_SE = 5.0, 0.3  # calibration prior: typical QPU β_eff is 5–8
CALIBRATION_ROUNDS, CALIBRATION_TOL = 3, 0.02
BETA_MEMORY = 0.9  # re-estimates: information of earlier calls decays by this factor per update
BETA_MAX_REL_SE = 0.05  # re-estimates less precise than this are skipped (near-zero RBMs)
QPU_PROGRAMMING_S, QPU_PER_READ_S = 0.015, 0.0002  # published timing model, per call / read
# num_reads_range of Advantage solvers (and MockDWaveSampler): the split used for an estimate made
# before the solver is connected
DEFAULT_READS_LIMIT = 10_000
MAX_EMULATOR_SWEEPS = 10**6


class QPUFallbackWarning(UserWarning):
    """The QPU did not serve a call; the `neal` backend did."""


class QPUUnavailable(RuntimeError):
    """strict=True and the QPU could not serve a call (no token or solver, refused, failing)."""


#: How strict errors start: the CLI spelling of the option (Python: strict=True).
STRICT = "dwave backend (--set backend.options.strict=true; Python: strict=True)"


class QPUBudgetExceeded(RuntimeError):
    """The next QPU call would exceed `qpu_time_budget_s` and `on_budget="stop"`, or the
    `meter` refused it."""


class QPUMeter(Protocol):
    """A budget outside the sampler (the service's ledger): asked before and told after each
    QPU call. `before_call` raises QPUBudgetExceeded to refuse the call."""

    def before_call(self, estimated_s: float) -> None: ...

    def after_call(self, estimated_s: float, charged_s: float) -> None: ...


def qpu_status() -> dict[str, Any]:
    """Whether a D-Wave API token is configured (env or config file); never contacts the QPU."""
    try:
        from dwave.cloud.config import load_config

        config = load_config()
    except Exception as exc:  # noqa: BLE001 - a broken config file must not crash `qvae backends`
        return {"token": False, "message": f"cannot read the D-Wave config ({exc}); "
                "`solver: emulator` works offline, other calls fall back to neal"}
    if config.get("token"):
        return {"token": True, "solver": config.get("solver"),
                "message": "D-Wave API token configured (QPU not contacted)"}
    return {"token": False, "message": "no D-Wave API token: set DWAVE_API_TOKEN or run "
            "`dwave config create`; `solver: emulator` works offline, other calls fall back "
            "to neal"}


def _transient_errors() -> tuple[type[BaseException], ...]:
    from dwave.cloud import exceptions as exc
    from requests.exceptions import RequestException

    return (exc.SolverFailureError, exc.Timeout, exc.SolverOfflineError, exc.ProblemUploadError,
            ConnectionError, TimeoutError, RequestException)


def _positive(name: str, value: Any, *, integer: bool = False, zero: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (
            value < 0 if zero else value <= 0):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


class DWaveBackend(Sampler):
    """D-Wave QPU sampler (or its emulator) for RBM priors; see the module doc and README."""

    name = "dwave"
    binary = True
    #: the emulator; 10,000 calibration reads pin β_eff to ~1% on the 16-unit reference RBMs
    conformance_options = {"solver": "emulator", "mode": "embedded", "calibration_reads": 10000}

    def __init__(
        self,
        *,
        solver: str | dict[str, Any] | None = None,
        mode: str = "embedded",
        native_qubits: tuple[list[int], list[int]] | None = None,
        chain_strength: float | None = None,
        embedding_cache: str | None = None,
        embedding_timeout: float = 600.0,
        beta_eff: float | None = None,
        beta_every: int = 10,
        calibration_reads: int = 1000,
        annealing_time: float | None = None,
        num_spin_reversal_transforms: int = 0,
        max_clip_ratio: float = 4.0,
        qpu_time_budget_s: float | None = None,
        on_budget: str = "fallback",
        strict: bool = False,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        fallback_options: dict[str, Any] | None = None,
        topology: str = "pegasus",
        topology_shape: int | list[int] | None = None,
        emulated_beta: float = 6.0,
        emulator_sweeps: int = 50,
        emulator_sampler: str = "thermal",
    ) -> None:
        if not (solver is None or isinstance(solver, (str, dict))):
            raise ValueError(f"solver must be None, a name, a features dict or 'emulator', "
                             f"got {solver!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_budget not in ("fallback", "stop"):
            raise ValueError(f"on_budget must be 'fallback' or 'stop', got {on_budget!r}")
        if emulator_sampler not in EMULATOR_SAMPLERS:
            raise ValueError(f"emulator_sampler must be one of {EMULATOR_SAMPLERS}, "
                             f"got {emulator_sampler!r}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)}, got {topology!r}")
        for key, val in (("chain_strength", chain_strength), ("beta_eff", beta_eff),
                         ("annealing_time", annealing_time),
                         ("qpu_time_budget_s", qpu_time_budget_s)):
            if val is not None:
                _positive(key, val)
        for key, val in (("embedding_timeout", embedding_timeout),
                         ("emulated_beta", emulated_beta)):
            _positive(key, val)
        _positive("max_clip_ratio", max_clip_ratio)
        if max_clip_ratio < 1:
            raise ValueError(f"max_clip_ratio must be >= 1, got {max_clip_ratio!r}")
        _positive("retry_backoff_s", retry_backoff_s, zero=True)
        for key, val in (("calibration_reads", calibration_reads),
                         ("emulator_sweeps", emulator_sweeps)):
            _positive(key, val, integer=True)
        if emulator_sweeps > MAX_EMULATOR_SWEEPS:
            raise ValueError(f"emulator_sweeps must be <= {MAX_EMULATOR_SWEEPS} (the emulator "
                             f"runs ~10^3 sweeps per second), got {emulator_sweeps!r}")
        for key, val in (("beta_every", beta_every), ("max_retries", max_retries),
                         ("num_spin_reversal_transforms", num_spin_reversal_transforms)):
            _positive(key, val, integer=True, zero=True)
        shape = DEFAULT_SHAPE[topology] if topology_shape is None else topology_shape
        self.topology_shape = TOPOLOGIES[topology](shape) if isinstance(shape, int) else list(shape)
        if native_qubits is not None:
            native_qubits = (list(map(int, native_qubits[0])), list(map(int, native_qubits[1])))
        self.solver, self.mode, self.native_qubits = solver, mode, native_qubits
        self.chain_strength, self.beta_eff_option = chain_strength, beta_eff
        self.embedding_cache = (default_cache_dir() if embedding_cache is None
                                else Path(embedding_cache))
        self.embedding_timeout, self.beta_every = float(embedding_timeout), beta_every
        self.calibration_reads, self.annealing_time = calibration_reads, annealing_time
        self.num_spin_reversal_transforms, self.max_clip_ratio = num_spin_reversal_transforms, \
            float(max_clip_ratio)
        self.qpu_time_budget_s, self.on_budget, self.strict = qpu_time_budget_s, on_budget, strict
        self.max_retries, self.retry_backoff_s = max_retries, float(retry_backoff_s)
        self.fallback_options = dict(fallback_options or {})
        self.topology, self.emulated_beta = topology, float(emulated_beta)
        self.emulator_sweeps, self.emulator_sampler = emulator_sweeps, emulator_sampler
        self._qpu: Any = None
        self._graph: Any = None
        self._solver_id = ""
        self._latched: str | None = None  # permanent fallback reason (no QPU / budget spent)
        self._fallback: Sampler | None = None
        self._mappings: dict[tuple, tuple[Embedding, str, float]] = {}
        self.beta: float | None = None if beta_eff is None else float(beta_eff)
        self._beta_information = 0.0  # Fisher information behind self.beta (0: none yet)
        self.calls = self.fallbacks = self.retries = 0
        self.qpu_time_s = 0.0
        #: asked before / told after every QPU call (the service sets one per request)
        self.meter: QPUMeter | None = None

    # -------------------------------------------------------------- work model
    #: The emulator's sweep costs ~100 update-equivalents per logical unit or coupling
    #: (measured: 1.3·10^8 /s against the torch kernels' ~10^10; chains multiply the qubits).
    EMULATOR_UPDATE_COST = 100.0

    @classmethod
    def work(cls, options: Mapping[str, Any], shape: ProblemShape, num_samples: int
             ) -> dict[str, Cost]:
        """Reads (calibration included while β_eff is unknown) × anneal time on the QPU; on
        the emulator, reads × emulator_sweeps × size too; and the embedding search, which
        holds the process for up to embedding_timeout (nothing interrupts it)."""
        o = option_values(cls, options)
        calibration = 0 if o["beta_eff"] is not None else CALIBRATION_ROUNDS * o[
            "calibration_reads"]
        reads = num_samples + calibration
        reads_txt = f"(num_samples {num_samples} + calibration {calibration}) reads"
        anneal_us = o["annealing_time"] or 20.0
        per_read = QPU_PER_READ_S + max(0.0, anneal_us - 20.0) * 1e-6
        calls = (1 + (CALIBRATION_ROUNDS if calibration else 0)) * max(
            1, o["num_spin_reversal_transforms"]) + reads // DEFAULT_READS_LIMIT
        out = {
            "qpu_seconds": Cost(reads * per_read + calls * QPU_PROGRAMMING_S,
                                f"{reads_txt} × (200 µs + annealing_time {anneal_us:g} µs "
                                f"− 20 µs) + {calls} call(s) × {QPU_PROGRAMMING_S} s",
                                ("num_samples", "annealing_time", "calibration_reads")),
            "seconds": Cost(float(o["embedding_timeout"]), "embedding_timeout",
                            ("embedding_timeout",)),
        }
        if o["solver"] == "emulator":
            out["work"] = Cost(cls.EMULATOR_UPDATE_COST * reads * o["emulator_sweeps"]
                               * shape.size,
                               f"{cls.EMULATOR_UPDATE_COST:g} × {reads_txt} × emulator_sweeps "
                               f"{o['emulator_sweeps']} × size {shape.size}",
                               ("emulator_sweeps", "num_samples", "calibration_reads"))
        return out

    # ------------------------------------------------------------------ status
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Always usable (the emulator and the neal fallback need nothing); says QPU status."""
        return True, "QPU: " + qpu_status()["message"]

    @staticmethod
    def qpu_status() -> dict[str, Any]:
        """Token status for the CLI (fast, offline)."""
        return qpu_status()

    @property
    def emulated(self) -> bool:
        return self.solver == "emulator"

    def working_graph(self) -> Any:
        """The solver's qubit graph (connects on first use; raises if there is no QPU)."""
        if self._qpu is None and not self._connect():
            raise RuntimeError(f"no D-Wave solver: {self._latched}")
        return self._graph

    def _substitute(self) -> dict[str, Any]:
        """The emulator's thermal sampler at `emulated_beta` (see `emulator_sampler`)."""
        if self.emulator_sampler == "simulated_annealing":
            # dwave-samplers SA at fixed β with Gibbs acceptance: exact without chains (native
            # mode); single-spin moves cannot flip strong chains, so embedded mode mixes poorly.
            from dwave.samplers import SimulatedAnnealingSampler

            beta = (self.emulated_beta, self.emulated_beta)
            return {"substitute_sampler": SimulatedAnnealingSampler(),
                    "substitute_kwargs": {"beta_range": beta, "beta_schedule_type": "linear",
                                          "proposal_acceptance_criteria": "Gibbs",
                                          "num_sweeps": self.emulator_sweeps,
                                          # one β: no schedule array of emulator_sweeps βs
                                          "num_sweeps_per_beta": self.emulator_sweeps}}
        return {"substitute_sampler": ThermalIsingSampler(),
                "substitute_kwargs": {"beta": self.emulated_beta,
                                      "num_sweeps": self.emulator_sweeps}}

    def _connect(self) -> bool:
        """Build the QPU (or emulator) sampler; on failure warn/raise and latch the fallback."""
        if self._latched is not None:
            return False
        if self._qpu is not None:
            return True
        try:
            if self.emulated:
                from dwave.system.testing import MockDWaveSampler

                qpu = MockDWaveSampler(
                    topology_type=self.topology, topology_shape=self.topology_shape,
                    parameter_warnings=False, **self._substitute())
                qpu.parameters["seed"] = []  # reproducible emulator runs
                self._solver_id = f"emulator-{self.topology}-" + "x".join(
                    map(str, self.topology_shape))
            else:
                status = qpu_status()
                if not status["token"]:
                    raise RuntimeError(status["message"])
                from dwave.system import DWaveSampler

                qpu = DWaveSampler(**({} if self.solver is None else {"solver": self.solver}))
                self._solver_id = str(qpu.solver.name)
            self._graph = qpu.to_networkx_graph()
            self._qpu = qpu
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to reach a solver
            reason = f"cannot use D-Wave solver {self.solver!r}: {exc}"
            if self.strict:
                raise QPUUnavailable(f"{STRICT}: {reason}") from exc
            self._latched = reason
            return False

    # --------------------------------------------------------------- sampling
    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        with timer("preprocess"):
            h, w = self._logical_ising(rbm)
            rng = np.random.default_rng(seed)
            if not self._connect():
                return self._serve_fallback(rbm, num_samples, seed, timer, self._latched)
            emb, cache_status, emb_seconds = self._mapping(rbm)
            src = emb.source_edges
            j = -w[src[:, 0], src[:, 1] - rbm.n_visible] / 4
            props = self._qpu.properties
            cs = self.chain_strength if self.chain_strength is not None else -props["j_range"][0]
            if emb.chain_a.size and not props["j_range"][0] <= -cs:
                raise ValueError(f"chain_strength {cs} exceeds the solver's j_range "
                                 f"{props['j_range']}")
            reads = [num_samples] + ([] if self.beta is not None else
                                     [self.calibration_reads] * CALIBRATION_ROUNDS)
            cost = sum(self._estimated_cost(r) for r in reads)
        if self.qpu_time_budget_s is not None and self.qpu_time_s + cost > self.qpu_time_budget_s:
            reason = (f"qpu_time_budget_s exhausted: {self.qpu_time_s:.3f} s spent, next call "
                      f"~{cost:.3f} s, budget {self.qpu_time_budget_s} s")
            if self.on_budget == "stop":
                raise QPUBudgetExceeded(reason)
            self._latched = reason
            return self._serve_fallback(rbm, num_samples, seed, timer, reason)
        info: dict[str, Any] = {"calls": 0, "qpu_s": 0.0, "retries": 0, "calibration": None,
                                "estimated": False}
        try:
            if self.beta is None:
                info["calibration"] = self._calibrate(h, j, emb, cs, rbm.n_visible, rng,
                                                      timer, info)
            beta = self.beta
            with timer("preprocess"):
                program = self._program(h, j, emb, cs, beta)
            spins = self._run(program, emb, num_samples, rng, info, timer)
        except _Unavailable as exc:
            return self._serve_fallback(rbm, num_samples, seed, timer, str(exc))
        with timer("postprocess"):
            logical, breaks = emb.unembed(spins, rng)
            estimate, update = None, None
            self.calls += 1
            if self.beta_every and self.calls % self.beta_every == 0:
                try:
                    estimate, information = self._estimate(logical, program, emb,
                                                           rbm.n_visible, BETA_MAX_REL_SE)
                    # precision-weighted running estimate that slowly forgets old calls
                    self._beta_information = BETA_MEMORY * self._beta_information + information
                    self.beta += (estimate - self.beta) * information / self._beta_information
                    update = "updated"
                except UninformativeSamples as exc:  # a near-zero RBM: β hardly matters
                    update = f"skipped: {exc}"
                except ValueError as exc:
                    update = f"failed: {exc}"
                    warnings.warn(f"dwave: beta_eff re-estimation failed, keeping "
                                  f"{self.beta:.4g}: {exc}", stacklevel=3)
            z = torch.from_numpy((logical + 1) / 2).to(rbm.weight.device, rbm.weight.dtype)
            v, hid = z[:, :rbm.n_visible], z[:, rbm.n_visible:]
            out = SampleSet(v, hid, energies(rbm, v, hid))
        out.info.update(
            served_by="emulator" if self.emulated else "dwave", fallback=None,
            solver=self._solver_id, mode=self.mode, beta_eff=beta, beta_eff_estimate=estimate,
            beta_eff_update=update,
            calibration=info["calibration"], chain_strength=cs, chain_break_fraction=breaks,
            max_chain_length=emb.max_chain_length, num_qubits=int(emb.qubits.size),
            embedding_cache=cache_status, embedding_seconds=emb_seconds,
            clipped=program["clipped"], clip_ratio=program["clip_ratio"],
            qpu_calls=info["calls"], qpu_access_time_s=info["qpu_s"],
            qpu_access_time_estimated=info["estimated"], qpu_time_total_s=self.qpu_time_s,
            retries=info["retries"],
        )
        return out

    @staticmethod
    def _logical_ising(rbm: RBM) -> tuple[np.ndarray, np.ndarray]:
        """Spin-form linear biases h (n_units,) and the couplings W of the RBM (float64).

        With s = 2z − 1: h_v = −b/2 − W·1/4, h_h = −c/2 − Wᵀ·1/4, J_(i, nv+j) = −W_ij/4.
        ValueError on an all-zero RBM (nothing to program).
        """
        w = rbm.effective_weight().detach().double().cpu().numpy()
        b = rbm.visible_bias.detach().double().cpu().numpy()
        c = rbm.hidden_bias.detach().double().cpu().numpy()
        h = np.concatenate([-b / 2 - w.sum(1) / 4, -c / 2 - w.sum(0) / 4])
        if not (np.any(h) or np.any(w)):
            raise ValueError("the RBM is all zeros (no biases, no couplings): nothing to "
                             "program on the QPU, which would return pure noise")
        return h, w

    def _mapping(self, rbm: RBM) -> tuple[Embedding, str, float]:
        """The unit→qubit mapping for this RBM shape: embedding (cached) or native qubits."""
        nv, nh = rbm.n_visible, rbm.n_hidden
        if self.mode == "native":
            key: tuple = ("native", nv, nh)
            if key not in self._mappings:
                emb = native_embedding(self._graph, nv, nh, self.native_qubits, self._solver_id)
                self._mappings[key] = (emb, "native", 0.0)
            emb = self._mappings[key][0]
            check_native(rbm, emb, self._solver_id)
            return emb, "native", 0.0
        edges = rbm_edges(nv, nh, rbm.mask)
        key = ("embedded", nv, nh, edges.tobytes())
        if key in self._mappings:
            return self._mappings[key][0], "memory", 0.0
        cache = self.embedding_cache
        chains, status, seconds = get_embedding(edges, nv, nh, self._graph,
                                                solver_id=self._solver_id, cache_dir=cache,
                                                timeout=self.embedding_timeout)
        try:
            emb = Embedding(chains, nv + nh, edges, self._graph.edges)
        except ValueError:  # a cached embedding that no longer fits (e.g. qubits went away)
            chains, status, seconds = get_embedding(edges, nv, nh, self._graph,
                                                    solver_id=self._solver_id, cache_dir=cache,
                                                    timeout=self.embedding_timeout, refresh=True)
            emb = Embedding(chains, nv + nh, edges, self._graph.edges)
        self._mappings[key] = (emb, status, seconds)
        return emb, status, seconds

    def _program(self, h: np.ndarray, j: np.ndarray, emb: Embedding, cs: float, beta: float
                 ) -> dict[str, Any]:
        props = self._qpu.properties
        return program_problem(h, j, emb, cs, beta, props["h_range"], props["j_range"],
                               self.max_clip_ratio)

    def _estimated_cost(self, reads: int, calls: int | None = None) -> float:
        """QPU access seconds for `reads` reads (in `calls` calls; default: as `_run` splits
        them) under the published timing model."""
        per_read = QPU_PER_READ_S + max(0.0, (self.annealing_time or 20.0) - 20.0) * 1e-6
        if calls is None:
            limit = (DEFAULT_READS_LIMIT if self._qpu is None
                     else int(self._qpu.properties["num_reads_range"][1]))
            calls = max(1, self.num_spin_reversal_transforms, -(-reads // limit))
        return calls * QPU_PROGRAMMING_S + reads * per_read

    def estimate_qpu_seconds(self, num_samples: int) -> float:
        """Upper estimate of the QPU access time of `sample(rbm, num_samples)` before it runs:
        the calibration rounds (all of them, while β̂ is unknown), the read split over
        num_reads_range and the spin-reversal transforms, annealing_time included. On the
        emulator it equals what the calls are charged; on a QPU it is the timing model's."""
        reads = [num_samples] + ([] if self.beta is not None else
                                 [self.calibration_reads] * CALIBRATION_ROUNDS)
        return sum(self._estimated_cost(r) for r in reads)

    def _run(self, program: dict[str, Any], emb: Embedding, num_reads: int,
             rng: np.random.Generator, info: dict[str, Any], timer: Timer) -> np.ndarray:
        """Physical spins (num_reads, qubits): split over the num_reads limit and spin-reversal
        transforms, each call retried on transient errors."""
        limit = int(self._qpu.properties["num_reads_range"][1])
        parts = max(1, self.num_spin_reversal_transforms, -(-num_reads // limit))
        sizes = [num_reads // parts + (i < num_reads % parts) for i in range(parts)]
        labels = emb.qubits.tolist()
        params: dict[str, Any] = {"answer_mode": "raw", "auto_scale": False}
        if self.annealing_time is not None:
            params["annealing_time"] = self.annealing_time
        out = []
        for size in sizes:
            with timer("preprocess"):
                # Spin-reversal transforms by hand, not dwave.preprocessing's
                # SpinReversalTransformComposite: given the same transforms (`srts`) both
                # program identical BQMs and return identical spins, but the composite runs
                # num_reads per transform (we split the reads), concatenating its transforms
                # drops info["timing"] (the QPU time _call bills), and called once per
                # transform it adds 0.12 s per 4 transforms on Pegasus(16) against our 0.02 s
                # (benchmarks/ocean_parity.py).
                gauge = np.ones(len(labels))
                if self.num_spin_reversal_transforms:
                    gauge = np.where(rng.random(len(labels)) < 0.5, -1.0, 1.0)
                j = program["j"] * gauge[program["rows"]] * gauge[program["cols"]]
                bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
                    program["h"] * gauge, (program["rows"], program["cols"], j), 0.0,
                    dimod.SPIN, variable_order=labels)
                if self.emulated:
                    params["seed"] = int(rng.integers(SEED_LIMIT))
            with timer("sample"):
                result = self._call(bqm, size, params, info)
            with timer("postprocess"):
                got = list(result.variables)
                spins = result.record.sample
                if got != labels:
                    index = {q: i for i, q in enumerate(got)}
                    spins = spins[:, [index[q] for q in labels]]
                if result.vartype is dimod.BINARY:
                    spins = 2 * spins.astype(np.int8) - 1
                out.append(spins * gauge.astype(np.int8) if self.num_spin_reversal_transforms
                           else spins)
        return np.concatenate(out)

    def _call(self, bqm: dimod.BinaryQuadraticModel, reads: int, params: dict[str, Any],
              info: dict[str, Any]) -> dimod.SampleSet:
        """One QPU call with bounded retries and exponential backoff; records QPU time."""
        from dwave.cloud.exceptions import SolverAuthenticationError, SolverNotFoundError

        transient = _transient_errors()
        estimate = self._estimated_cost(reads, calls=1)
        if self.meter is not None:
            self.meter.before_call(estimate)  # may raise QPUBudgetExceeded: nothing is spent
        for attempt in range(self.max_retries + 1):
            try:
                result = self._qpu.sample(bqm, num_reads=reads, **params)
                result.resolve()
                break
            except (SolverAuthenticationError, SolverNotFoundError) as exc:
                if self.strict:
                    raise QPUUnavailable(f"{STRICT}: {exc!r}") from exc
                self._latched = f"QPU refused the call: {exc!r}"
                raise _Unavailable(self._latched) from exc
            except transient as exc:
                if attempt == self.max_retries:
                    if self.strict:
                        raise QPUUnavailable(f"{STRICT}: QPU call failed "
                                             f"{attempt + 1} times: {exc!r}") from exc
                    raise _Unavailable(f"QPU call failed {attempt + 1} times "
                                       f"(last: {exc!r})") from exc
                self.retries += 1
                info["retries"] += 1
                time.sleep(self.retry_backoff_s * 2**attempt)
        if self.emulated or "qpu_access_time" not in result.info.get("timing", {}):
            seconds = estimate  # the mock's timing is a placeholder
            info["estimated"] = True
        else:
            seconds = float(result.info["timing"]["qpu_access_time"]) * 1e-6
        info["calls"] += 1
        info["qpu_s"] += seconds
        self.qpu_time_s += seconds
        if self.meter is not None:
            self.meter.after_call(estimate, seconds)
        return result

    # ------------------------------------------------------------- temperature
    def _estimate(self, logical: np.ndarray, program: dict[str, Any], emb: Embedding, nv: int,
                  max_relative_se: float | None, beta0: float | None = None
                  ) -> tuple[float, float]:
        return programmed_beta(logical, program, emb, nv, beta0=beta0 or self.beta,
                               max_relative_se=max_relative_se)

    def _calibrate(self, h: np.ndarray, j: np.ndarray, emb: Embedding, cs: float, nv: int,
                   rng: np.random.Generator, timer: Timer, info: dict[str, Any]) -> dict:
        """Iterate β̂ ← MPL β_eff of samples programmed at E/β̂ until self-consistent.

        Each round combines its estimate with a weak prior (BETA_GUESS ± 30%) by Fisher
        information, so an RBM too weak to reveal the temperature (e.g. freshly initialised)
        keeps β̂ near the prior instead of chasing noise; re-estimates refine it later.
        """
        prior = (BETA_PRIOR_REL_SE * BETA_GUESS) ** -2
        beta, history, information = BETA_GUESS, [], prior
        for _ in range(CALIBRATION_ROUNDS):
            with timer("preprocess"):
                program = self._program(h, j, emb, cs, beta)
            spins = self._run(program, emb, self.calibration_reads, rng, info, timer)
            with timer("postprocess"):
                logical, _ = emb.unembed(spins, rng)
                try:
                    estimate, found = self._estimate(logical, program, emb, nv,
                                                     BETA_PRIOR_REL_SE, beta0=beta)
                except UninformativeSamples:
                    history.append(None)
                    break
            history.append(estimate)
            information = prior + found
            new = (prior * BETA_GUESS + found * estimate) / information
            done = abs(new / beta - 1) < CALIBRATION_TOL
            beta = new
            if done:
                break
        self.beta, self._beta_information = beta, information
        return {"rounds": len(history), "reads": self.calibration_reads, "betas": history,
                "relative_se": 1 / (beta * math.sqrt(information))}

    # ---------------------------------------------------------------- fallback
    def _serve_fallback(self, rbm: RBM, num_samples: int, seed: int | None, timer: Timer,
                        reason: str | None) -> SampleSet:
        warnings.warn(f"dwave backend: the QPU did not serve this call, neal (simulated "
                      f"annealing) did: {reason}. To make this an error: --set "
                      "backend.options.strict=true (Python: strict=True).",
                      QPUFallbackWarning, stacklevel=4)
        if self._fallback is None:
            from backends.registry import get_sampler

            self._fallback = get_sampler("neal", **self.fallback_options)
        self.fallbacks += 1
        with timer("sample"):
            out = self._fallback.sample(rbm, num_samples, seed=seed)
        inner = out.info.pop("timing", None)
        out.info.update(served_by="neal", fallback=reason, fallback_timing=inner,
                        beta_eff=None, qpu_access_time_s=0.0, qpu_time_total_s=self.qpu_time_s,
                        fallbacks=self.fallbacks)
        return out

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget β̂ and the fallback latch (not the QPU time spent, which the budget counts)."""
        self.beta, self._beta_information = self.beta_eff_option, 0.0
        self._latched = None
        self.calls = 0

    def connectivity_mask(self, n_visible: int, n_hidden: int) -> torch.Tensor | None:
        """Native mode: the QPU-shaped couplings a trainer must give its RBM (and the qubits
        they sit on become this sampler's mapping). Embedded mode: None (any dense RBM)."""
        if self.mode != "native":
            return None
        mask, visible, hidden = native_rbm_mask(self, n_visible, n_hidden)
        if self.native_qubits is None:
            self.native_qubits = (visible, hidden)
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"beta_eff": self.beta, "beta_information": self._beta_information,
                "qpu_time_s": self.qpu_time_s, "calls": self.calls, "fallbacks": self.fallbacks,
                "retries": self.retries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state.get("beta_eff", self.beta)
        self._beta_information = float(state.get("beta_information", 0.0))
        self.qpu_time_s = float(state.get("qpu_time_s", self.qpu_time_s))
        for key in ("calls", "fallbacks", "retries"):
            setattr(self, key, int(state.get(key, getattr(self, key))))


class _Unavailable(Exception):
    """Internal: the QPU could not serve this call (the caller falls back)."""
