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
A `BoltzmannMachine` (any graph) whose `variables` are working qubits and whose couplings are
couplers (`qvae.boltzmann_graphs.qpu_native` on the solver's graph) is placed one unit per
qubit, no chains, in either mode; any other is minor-embedded in `embedded` mode (minorminer's
clique embedding when dense) and refused by `native`, naming the qubits or couplers missing.

Clamped units (`sample(..., clamp=)`) are folded into their neighbours' biases by the base
(`qvae.conditioning`), so the QPU is programmed with the reduced problem of the free units
only, and β_eff is calibrated and re-estimated on that programmed problem like on any other
(one β̂ serves every problem this sampler programs). A reduced native model stays native.

Failures never stop a training run unless `strict=True`: no token / solver / network, an
exhausted `qpu_time_budget_s` (with `on_budget="fallback"`) or transient errors that outlast
`max_retries` hand the call to the `neal` backend, loudly, and record it in `info["fallback"]`.

Where each concern lives: this module orchestrates one `sample` call; `dwave_client` connects,
calls the solver with retries and keeps the QPU-time budget; `dwave_temperature` programs E/β̂,
estimates β_eff and tracks β̂; `dwave_embedding` maps units to qubits; `dwave_emulator` is the
offline QPU.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import dimod
import numpy as np
import torch
from pydantic import field_validator

from backends.base import (
    BackendOptions,
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    energies,
)
from backends.dwave_client import (
    DEFAULT_READS_LIMIT,
    QPU_PROGRAMMING_S,
    CallRecord,
    QPUBudgetExceeded,
    QPUClient,
    QPUFallbackWarning,
    QPUMeter,
    QPUUnavailable,
    Unavailable,
    estimated_cost,
    qpu_status,
)
from backends.dwave_embedding import (
    Embedding,
    Mappings,
    default_cache_dir,
    native_misfit,
    native_rbm_mask,
)
from backends.dwave_temperature import (
    BETA_MAX_REL_SE,
    BETA_PRIOR_REL_SE,
    CALIBRATION_ROUNDS,
    BetaTracker,
    QPUProgram,
    UninformativeSamples,
    program_problem,
    programmed_beta,
)
from backends.options import Capabilities, Field
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM

__all__ = ["DWaveBackend", "DWaveOptions", "QPUBudgetExceeded", "QPUFallbackWarning",
           "QPUMeter", "QPUUnavailable", "logical_ising", "native_rbm_mask"]

#: the emulator runs ~10^3 sweeps per second
MAX_EMULATOR_SWEEPS = 10**6


class DWaveOptions(BackendOptions):
    solver: str | dict[str, Any] | None = Field(
        None, description="None: Leap's default QPU; a solver name; a dict of solver features; "
        "or 'emulator' (offline, dwave-system's MockDWaveSampler)")
    mode: Literal["embedded", "native"] = Field(
        "embedded", description="'embedded' (chains of qubits per unit; a BoltzmannMachine "
        "on the solver's qubits and couplers still gets one qubit per unit) or 'native' (one "
        "qubit per unit; the RBM's couplings must be QPU couplers, see native_rbm_mask; a "
        "BoltzmannMachine must be a subgraph of the working graph, see "
        "qvae.boltzmann_graphs.qpu_native)")
    native_qubits: tuple[list[int], list[int]] | None = Field(
        None, description="native mode: (visible_qubits, hidden_qubits), two lists of qubit "
        "indices; None: from native_rbm_mask")
    chain_strength: float | None = Field(
        None, gt=0, description="chain coupling in programmed units, > 0; None: the strongest "
        "the solver allows (−j_range[0])")
    embedding_cache: str | Path | None = Field(
        None, description="embedding cache directory; None: $QVAE_CACHE_DIR/embeddings, else "
        "~/.cache/qvae/embeddings")
    embedding_timeout: float = Field(
        600.0, gt=0, description="seconds allowed to minorminer.find_embedding, > 0")
    beta_eff: float | None = Field(
        None, gt=0, description="fixed starting β_eff, > 0; None: calibrate on the first call")
    beta_every: int = Field(
        10, ge=0, description="refine β_eff from every N-th call's samples; 0: never")
    calibration_reads: int = Field(
        1000, ge=1, description="reads per calibration call (up to "
        f"{CALIBRATION_ROUNDS} calls while β_eff is unknown)")
    annealing_time: float | None = Field(
        None, gt=0, description="annealing time in µs, > 0; None: the solver's default")
    num_spin_reversal_transforms: int = Field(
        0, ge=0, description="split the reads over this many random gauges; 0: none")
    max_clip_ratio: float = Field(
        4.0, ge=1, description="refuse problems exceeding the solver's h_range/j_range by more "
        "than this factor (>= 1); below it, clip and warn")
    qpu_time_budget_s: float | None = Field(
        None, gt=0, description="total QPU access time allowed, in seconds (> 0); None: no limit")
    on_budget: Literal["fallback", "stop"] = Field(
        "fallback", description="past qpu_time_budget_s: 'fallback' (neal from then on) or "
        "'stop' (raise QPUBudgetExceeded)")
    strict: bool = Field(False, description="raise instead of falling back to neal")
    max_retries: int = Field(
        3, ge=0, description="retries per QPU call on transient errors (timeouts, solver "
        "failures, connection errors)")
    retry_backoff_s: float = Field(
        1.0, ge=0, description="seconds before the first retry, doubled each retry")
    fallback_options: dict[str, Any] | None = Field(
        None, description="options of the neal fallback backend; None: its defaults")
    topology: Literal["chimera", "pegasus", "zephyr"] = Field(
        "pegasus", description="emulator graph: 'pegasus', 'zephyr' or 'chimera'")
    topology_shape: int | list[int] | None = Field(
        None, description="emulator graph size (an int >= 1) or MockDWaveSampler's "
        "topology_shape list; None: Pegasus 6, Zephyr 4, Chimera 16")
    emulated_beta: float = Field(6.0, gt=0, description="the emulator's β_eff, > 0")
    emulator_sweeps: int = Field(
        50, ge=1, le=MAX_EMULATOR_SWEEPS, description="emulator sweeps per read, 1 to 10^6 "
        "(the emulator runs ~10^3 sweeps per second)")
    emulator_sampler: Literal["thermal", "simulated_annealing"] = Field(
        "thermal", description="the emulator's substitute sampler: 'thermal' (heat bath with "
        "chain flips, exact with chains) or 'simulated_annealing' (dwave-samplers at fixed β; "
        "exact in native mode only)")

    @field_validator("fallback_options")
    @classmethod
    def _fallback_options_fit_neal(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # checked by neal's own model now, so a bad fallback fails at construction, not at the
        # first QPU outage mid-run
        if value is not None:
            from backends.neal import NealSampler

            NealSampler.parse_options(value)
        return value

    @field_validator("solver", mode="before")
    @classmethod
    def _solver_kind(cls, value: Any) -> Any:
        if not (value is None or isinstance(value, (str, dict))):
            raise ValueError("must be None, a solver name, a dict of solver features or "
                             "'emulator'")
        return value

    @field_validator("native_qubits", mode="before")
    @classmethod
    def _qubit_lists(cls, value: Any) -> Any:
        """Two sequences of qubit indices (YAML gives lists; numpy ints are fine)."""
        if value is None:
            return None
        try:
            visible, hidden = value
            out = tuple([operator.index(q) for q in part] for part in (visible, hidden))
        except (TypeError, ValueError):
            out = None
        if out is None or any(isinstance(q, bool) for part in value for q in part):
            raise ValueError("must be (visible_qubits, hidden_qubits): two lists of qubit "
                             "indices")
        return out

    @field_validator("topology_shape", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        size = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        listed = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        if not (value is None or size or (listed and value)):
            raise ValueError("must be None, a size (an int >= 1) or a list of ints >= 1")
        return value


def logical_ising(rbm: RBM) -> tuple[np.ndarray, np.ndarray]:
    """Spin-form linear biases h (n_units,) and the couplings W (n_visible, n_hidden) of the
    RBM, float64.

    The spin form is `RBM.to_ising`'s (dimod's conversion of `RBM.to_bqm`), read as arrays:
    h_v = −b/2 − W·1/4, h_h = −c/2 − Wᵀ·1/4, J_(i, nv+j) = −W_ij/4 (bit for bit what the
    formula gives; the arrays avoid to_ising's dicts, 4× slower at 100×100).
    ValueError on an all-zero RBM (nothing to program).
    """
    nv, n = rbm.n_visible, rbm.n_units
    spin = rbm.to_bqm().change_vartype(dimod.SPIN, inplace=True)
    h, (rows, cols, j), _ = spin.to_numpy_vectors(variable_order=range(n))
    w = np.zeros((nv, rbm.n_hidden))
    w[np.minimum(rows, cols), np.maximum(rows, cols) - nv] = -4 * j
    if not (np.any(h) or np.any(w)):
        raise ValueError("the RBM is all zeros (no biases, no couplings): nothing to "
                         "program on the QPU, which would return pure noise")
    return h, w


def bm_ising(bm: BoltzmannMachine) -> tuple[np.ndarray, np.ndarray]:
    """Spin-form linear biases h (n_units,) and couplings J (n_edges,) of a BoltzmannMachine,
    per `bm.edges`, float64: with z = (s + 1)/2, E = −b·z − Σ J_e z_i z_j gives
    h = −b/2 − ¼ Σ_{e ∋ i} J_e and J^s_e = −J_e/4 (the constant dropped), as `logical_ising`
    for an RBM. ValueError on an all-zero model (nothing to program)."""
    b = bm.bias.detach().double().cpu().numpy()
    coupling = bm.coupling.detach().double().cpu().numpy()
    edges = bm.edges.cpu().numpy()
    incident = np.bincount(edges.ravel(), weights=np.repeat(coupling, 2), minlength=b.size)
    h, j = -b / 2 - incident / 4, -coupling / 4
    if not (np.any(h) or np.any(j)):
        raise ValueError("the Boltzmann machine is all zeros (no biases, no couplings): "
                         "nothing to program on the QPU, which would return pure noise")
    return h, j


def native_bm(rbm: RBM, emb: Embedding) -> BoltzmannMachine:
    """A native-mode RBM as a BoltzmannMachine on its qubits: variables = the qubit of each
    unit of z = [v, h], edges = the couplers between them (`emb.source_edges`; `check_native`
    has made sure no nonzero weight lies elsewhere), the layers as colour classes."""
    nv, n = rbm.n_visible, rbm.n_units
    src = torch.from_numpy(emb.source_edges)
    w = rbm.effective_weight().detach().cpu()
    return BoltzmannMachine(
        emb.qubits.tolist(), src,
        bias=torch.cat([rbm.visible_bias, rbm.hidden_bias]).detach().cpu(),
        coupling=w[src[:, 0], src[:, 1] - nv], parts=[range(nv), range(nv, n)],
        dtype=rbm.weight.dtype,
    ).to(rbm.weight.device)


class DWaveBackend(Sampler):
    """D-Wave QPU sampler (or its emulator) for RBM and BoltzmannMachine priors, clamped
    units included; see the module doc and README."""

    name = "dwave"
    Options = DWaveOptions
    capabilities = Capabilities(resource="qpu", output="binary", any_graph=True)
    #: the emulator; 10,000 calibration reads pin β_eff to ~1% on the 16-unit reference RBMs
    conformance_options = {"solver": "emulator", "mode": "embedded", "calibration_reads": 10000}
    options: DWaveOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.client = QPUClient(o)
        self.tracker = BetaTracker(o.beta_eff)
        self.native_qubits = o.native_qubits  # native mode: set by connectivity_mask if None
        self.mappings = Mappings(default_cache_dir() if o.embedding_cache is None
                                 else Path(o.embedding_cache), o.embedding_timeout)
        self._fallback: Sampler | None = None
        self.calls = self.fallbacks = 0

    # -------------------------------------------------------------- work model
    #: The emulator's sweep costs ~100 update-equivalents per logical unit or coupling
    #: (measured: 1.3·10^8 /s against the torch kernels' ~10^10; chains multiply the qubits).
    EMULATOR_UPDATE_COST = 100.0

    @classmethod
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        """Reads (calibration included while β_eff is unknown) × anneal time on the QPU; on
        the emulator, reads × emulator_sweeps × size too; and the embedding search, which
        holds the process for up to embedding_timeout (nothing interrupts it). The same model
        prices a BoltzmannMachine or general BQM (`shape.size` = its units + couplings, any
        graph): QPU time depends on reads and calls, not on the graph."""
        o = cls.parse_options(options)
        calibration = 0 if o.beta_eff is not None else CALIBRATION_ROUNDS * o.calibration_reads
        reads = num_samples + calibration
        reads_txt = f"(num_samples {num_samples} + calibration {calibration}) reads"
        anneal_us = o.annealing_time or 20.0
        calls = (1 + (CALIBRATION_ROUNDS if calibration else 0)) * max(
            1, o.num_spin_reversal_transforms) + reads // DEFAULT_READS_LIMIT
        out = {
            "qpu_seconds": Cost(estimated_cost(reads, calls, o.annealing_time),
                                f"{reads_txt} × (200 µs + annealing_time {anneal_us:g} µs "
                                f"− 20 µs) + {calls} call(s) × {QPU_PROGRAMMING_S} s",
                                ("num_samples", "annealing_time", "calibration_reads")),
            "seconds": Cost(o.embedding_timeout, "embedding_timeout", ("embedding_timeout",)),
        }
        if o.solver == "emulator":
            out["work"] = Cost(cls.EMULATOR_UPDATE_COST * reads * o.emulator_sweeps
                               * shape.size,
                               f"{cls.EMULATOR_UPDATE_COST:g} × {reads_txt} × emulator_sweeps "
                               f"{o.emulator_sweeps} × size {shape.size}",
                               ("emulator_sweeps", "num_samples", "calibration_reads"))
        return out

    # ------------------------------------------------------------------ status
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Always usable (the emulator and the neal fallback need nothing); says QPU status."""
        return True, "QPU: " + qpu_status()["message"]

    @property
    def emulated(self) -> bool:
        return self.client.emulated

    @property
    def beta(self) -> float | None:
        """β̂: the β_eff the problem is programmed for (None until calibrated)."""
        return self.tracker.beta

    @property
    def qpu_time_s(self) -> float:
        """QPU access seconds spent so far (kept in checkpoints; the budget counts it)."""
        return self.client.qpu_time_s

    @property
    def retries(self) -> int:
        return self.client.retries

    @property
    def meter(self) -> QPUMeter | None:
        """Asked before / told after every QPU call (the service sets one per request)."""
        return self.client.meter

    @meter.setter
    def meter(self, meter: QPUMeter | None) -> None:
        self.client.meter = meter

    @property
    def _qpu(self) -> Any:
        return self.client.qpu

    def working_graph(self) -> Any:
        """The solver's qubit graph (connects on first use; raises if there is no QPU)."""
        if self.client.qpu is None and not self.client.connect():
            raise RuntimeError(f"no D-Wave solver: {self.client.latched}")
        return self.client.graph

    # --------------------------------------------------------------- sampling
    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        o, client = self.options, self.client
        with timer("preprocess"):
            h, w = self._logical_ising(rbm)
            if not client.connect():
                return self._serve_fallback(rbm, num_samples, seed, timer, client.latched)
            emb, cache_status, emb_seconds = self.mappings.get(
                rbm, client.graph, client.solver_id, native=o.mode == "native",
                native_qubits=self.native_qubits)
            src = emb.source_edges
            j = -w[src[:, 0], src[:, 1] - rbm.n_visible] / 4
        out = self._anneal(rbm, h, j, emb, rbm.n_visible, num_samples, seed, timer)
        if isinstance(out, SampleSet):
            return out
        logical, info = out
        with timer("postprocess"):
            z = torch.from_numpy((logical + 1) / 2).to(rbm.weight.device, rbm.weight.dtype)
            v, hid = z[:, :rbm.n_visible], z[:, rbm.n_visible:]
            result = SampleSet(v, hid, energies(rbm, v, hid))
        result.info.update(info, mode=o.mode, embedding_cache=cache_status,
                           embedding_seconds=emb_seconds)
        return result

    def _sample_bm(self, bm: BoltzmannMachine, num_samples: int, *, seed: int | None,
                   timer: Timer) -> SampleSet:
        """A BoltzmannMachine on the QPU, any graph. Native (one qubit per unit, no chains)
        when its `variables` are working qubits and its couplings couplers, in either mode
        (bipartite ones too: an RBM would lose their qubit labels); otherwise mode 'native'
        refuses it (naming what is missing) and 'embedded' minor-embeds it (a bipartite one as
        an RBM, for the biclique embeddings of dense layers). β_eff is handled as for an RBM:
        the spin-form BQM divided by β̂, β̂ calibrated and re-estimated by maximum
        pseudo-likelihood on the logical problem programmed."""
        if bm.n_edges == 0:  # independent units: nothing for the QPU to do (the base's exact)
            return super()._sample_bm(bm, num_samples, seed=seed, timer=timer)
        o, client = self.options, self.client
        with timer("preprocess"):
            h, j = bm_ising(bm)
            connected = client.connect()
            as_rbm = (connected and o.mode == "embedded" and len(bm.colour_classes) == 2
                      and native_misfit(bm.variables, bm.edges.cpu().numpy(), client.graph)
                      is not None)
        if not connected:
            return self._serve_fallback(bm, num_samples, seed, timer, client.latched)
        if as_rbm:
            # a bipartite model off the hardware graph: embedded as an RBM (the base's
            # to_rbm), whose dense case has minorminer's biclique embeddings, shorter chains
            return super()._sample_bm(bm, num_samples, seed=seed, timer=timer)
        with timer("preprocess"):
            emb, cache_status, emb_seconds = self.mappings.get_bm(
                bm, client.graph, client.solver_id, native=o.mode == "native")
        out = self._anneal(bm, h, j, emb, None, num_samples, seed, timer)
        if isinstance(out, SampleSet):
            return out
        logical, info = out
        with timer("postprocess"):
            z = torch.from_numpy((logical + 1) / 2).to(bm.bias.device, bm.bias.dtype)
            result = SampleSet.of_states(z, bm.sample_energy(z))
        result.info.update(info, mode="native" if emb.native else "embedded",
                           embedding_cache=cache_status, embedding_seconds=emb_seconds)
        return result

    def _sample_clamped(self, model: RBM | BoltzmannMachine, num_samples: int,
                        clamp: dict[int, int], *, seed: int | None,
                        timer: Timer) -> SampleSet:
        """Native-mode RBMs only; everything else is the base's conditioning (clamped units
        folded into their neighbours' biases, the reduced problem programmed and β_eff
        calibrated on it). Why: the reduced RBM renumbers its units, so the native mapping
        (visible unit i on native_qubits[0][i], ...) would be lost. The RBM is instead
        conditioned as a BoltzmannMachine whose variables are its qubits: the reduced model
        keeps the free units' qubits and a subset of the couplers, so it stays native."""
        if not (isinstance(model, RBM) and self.options.mode == "native"):
            return super()._sample_clamped(model, num_samples, clamp, seed=seed, timer=timer)
        with timer("preprocess"):
            connected = self.client.connect()
        if not connected:  # the base's path ends at the neal fallback
            return super()._sample_clamped(model, num_samples, clamp, seed=seed, timer=timer)
        with timer("preprocess"):
            emb, _, _ = self.mappings.get(model, self.client.graph, self.client.solver_id,
                                          native=True, native_qubits=self.native_qubits)
            bm = native_bm(model, emb)
        out = super()._sample_clamped(bm, num_samples, clamp, seed=seed, timer=timer)
        nv = model.n_visible
        v, hid = out.states[:, :nv], out.states[:, nv:]
        return SampleSet(v, hid, energies(model, v, hid), out.info)

    def _anneal(self, model: RBM | BoltzmannMachine, h: np.ndarray, j: np.ndarray,
                emb: Embedding, nv: int | None, num_samples: int, seed: int | None,
                timer: Timer) -> SampleSet | tuple[np.ndarray, dict[str, Any]]:
        """The QPU part of a call on logical Ising (h, J per `emb.source_edges`): budget,
        calibration while β̂ is unknown, the call, majority-vote unembedding and the β_eff
        re-estimate. (logical spins (R, n_units), info), or the fallback's SampleSet."""
        client = self.client
        with timer("preprocess"):
            rng = np.random.default_rng(seed)
            j_range = client.properties["j_range"]
            cs = (self.options.chain_strength if self.options.chain_strength is not None
                  else -j_range[0])
            if emb.chain_a.size and not j_range[0] <= -cs:
                raise ValueError(f"chain_strength {cs} exceeds the solver's j_range {j_range}")
            cost = self.estimate_qpu_seconds(num_samples)
        reason = client.over_budget(cost)  # raises QPUBudgetExceeded under on_budget="stop"
        if reason is not None:
            return self._serve_fallback(model, num_samples, seed, timer, reason)
        record, calibration = CallRecord(), None
        try:
            if self.tracker.beta is None:
                calibration = self._calibrate(h, j, emb, cs, nv, rng, timer, record)
            beta = self.tracker.beta
            with timer("preprocess"):
                program = self._program(h, j, emb, cs, beta)
            spins = client.run(program, emb, num_samples, rng, record, timer)
        except Unavailable as exc:
            return self._serve_fallback(model, num_samples, seed, timer, str(exc))
        with timer("postprocess"):
            logical, breaks = emb.unembed(spins, rng)
            self.calls += 1
            estimate, update = self._reestimate(logical, program, emb, nv)
        info = dict(
            served_by="emulator" if self.emulated else "dwave", fallback=None,
            solver=client.solver_id, beta_eff=beta, beta_eff_estimate=estimate,
            beta_eff_update=update,
            calibration=calibration, chain_strength=cs, chain_break_fraction=breaks,
            max_chain_length=emb.max_chain_length, mean_chain_length=emb.mean_chain_length,
            num_qubits=int(emb.qubits.size),
            clipped=program.clipped, clip_ratio=program.clip_ratio,
            qpu_calls=record.calls, qpu_access_time_s=record.qpu_s,
            qpu_access_time_estimated=record.estimated, qpu_time_total_s=self.qpu_time_s,
            retries=record.retries,
        )
        return logical, info

    _logical_ising = staticmethod(logical_ising)

    def _program(self, h: np.ndarray, j: np.ndarray, emb: Embedding, cs: float, beta: float
                 ) -> QPUProgram:
        props = self.client.properties
        return program_problem(h, j, emb, cs, beta, props["h_range"], props["j_range"],
                               self.options.max_clip_ratio)

    def estimate_qpu_seconds(self, num_samples: int) -> float:
        """Upper estimate of the QPU access time of `sample(rbm, num_samples)` before it runs:
        the calibration rounds (all of them, while β̂ is unknown), the read split over
        num_reads_range and the spin-reversal transforms, annealing_time included. On the
        emulator it equals what the calls are charged; on a QPU it is the timing model's."""
        reads = [num_samples] + ([] if self.tracker.beta is not None else
                                 [self.options.calibration_reads] * CALIBRATION_ROUNDS)
        return sum(self.client.estimated_cost(r) for r in reads)

    # ------------------------------------------------------------- temperature
    def _calibrate(self, h: np.ndarray, j: np.ndarray, emb: Embedding, cs: float,
                   nv: int | None,
                   rng: np.random.Generator, timer: Timer, record: CallRecord) -> dict:
        """Iterate β̂ ← MPL β_eff of samples programmed at E/β̂ (the tracker's rule)."""
        reads = self.options.calibration_reads
        beta = self.tracker.init()
        while beta is not None:
            with timer("preprocess"):
                program = self._program(h, j, emb, cs, beta)
            spins = self.client.run(program, emb, reads, rng, record, timer)
            with timer("postprocess"):
                logical, _ = emb.unembed(spins, rng)
                try:
                    estimate = programmed_beta(logical, program, emb, nv, beta0=beta,
                                               max_relative_se=BETA_PRIOR_REL_SE)
                except UninformativeSamples:
                    estimate = None
            beta = self.tracker.update(estimate)
        cal = self.tracker.final()
        return {"rounds": cal.rounds, "reads": reads, "betas": cal.betas,
                "relative_se": cal.relative_se}

    def _reestimate(self, logical: np.ndarray, program: QPUProgram, emb: Embedding,
                    nv: int | None) -> tuple[float | None, str | None]:
        """Every beta_every-th call: (this call's β_eff estimate, what became of it)."""
        every = self.options.beta_every
        if not (every and self.calls % every == 0):
            return None, None
        try:
            estimate = programmed_beta(logical, program, emb, nv, beta0=self.tracker.beta,
                                       max_relative_se=BETA_MAX_REL_SE)
        except UninformativeSamples as exc:  # a near-zero RBM: β hardly matters
            return None, f"skipped: {exc}"
        except ValueError as exc:
            warnings.warn(f"dwave: beta_eff re-estimation failed, keeping "
                          f"{self.tracker.beta:.4g}: {exc}", stacklevel=4)
            return None, f"failed: {exc}"
        self.tracker.refine(estimate)
        return estimate.beta, "updated"

    # ---------------------------------------------------------------- fallback
    def _serve_fallback(self, rbm: RBM | BoltzmannMachine, num_samples: int,
                        seed: int | None, timer: Timer, reason: str | None) -> SampleSet:
        warnings.warn(f"dwave backend: the QPU did not serve this call, neal (simulated "
                      f"annealing) did: {reason}. To make this an error: --set "
                      "backend.options.strict=true (Python: strict=True).",
                      QPUFallbackWarning, stacklevel=4)
        if self._fallback is None:
            from backends.registry import get_sampler

            self._fallback = get_sampler("neal", **(self.options.fallback_options or {}))
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
        self.tracker.reset()
        self.client.latched = None
        self.calls = 0

    def connectivity_mask(self, n_visible: int, n_hidden: int) -> torch.Tensor | None:
        """Native mode: the QPU-shaped couplings a trainer must give its RBM (and the qubits
        they sit on become this sampler's mapping). Embedded mode: None (any dense RBM)."""
        if self.options.mode != "native":
            return None
        mask, visible, hidden = native_rbm_mask(self, n_visible, n_hidden)
        if self.native_qubits is None:
            self.native_qubits = (visible, hidden)
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"beta_eff": self.tracker.beta, "beta_information": self.tracker.information,
                "qpu_time_s": self.qpu_time_s, "calls": self.calls, "fallbacks": self.fallbacks,
                "retries": self.retries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.beta = state.get("beta_eff", self.tracker.beta)
        self.tracker.information = float(state.get("beta_information", 0.0))
        self.client.qpu_time_s = float(state.get("qpu_time_s", self.qpu_time_s))
        self.client.retries = int(state.get("retries", self.retries))
        self.calls = int(state.get("calls", self.calls))
        self.fallbacks = int(state.get("fallbacks", self.fallbacks))
