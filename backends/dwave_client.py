"""The `dwave` backend's link to a solver: connection (QPU or emulator), calls with retries, and
the QPU-time budget.

A `QPUClient` connects on first use (a Leap solver through `DWaveSampler`, or the emulator of
`backends.dwave_emulator`), submits `QPUProgram`s split over the solver's num_reads limit and
the spin-reversal transforms, retries transient failures (`backends.retry`), and charges each
call to its own `qpu_time_budget_s` and to an outside `meter` (the service's ledger). When the
solver cannot serve, it raises `QPUUnavailable` under strict=True and otherwise latches a
reason: the backend then hands this and later calls to its neal fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import dimod
import numpy as np

from backends.base import Timer
from backends.dwave_emulator import make_emulator, topology_shape
from backends.dwave_temperature import QPUProgram
from backends.neal import SEED_LIMIT
from backends.retry import call_with_retries

if TYPE_CHECKING:
    from backends.dwave import DWaveOptions
    from backends.dwave_embedding import Embedding

__all__ = ["QPUBudgetExceeded", "QPUClient", "QPUFallbackWarning", "QPUMeter", "QPUUnavailable",
           "qpu_status"]

QPU_PROGRAMMING_S, QPU_PER_READ_S = 0.015, 0.0002  # published timing model, per call / read
# num_reads_range of Advantage solvers (and MockDWaveSampler): the split used for an estimate made
# before the solver is connected
DEFAULT_READS_LIMIT = 10_000

#: How strict errors start: the CLI spelling of the option (Python: strict=True).
STRICT = "dwave backend (--set backend.options.strict=true; Python: strict=True)"


class QPUFallbackWarning(UserWarning):
    """The QPU did not serve a call; the `neal` backend did."""


class QPUUnavailable(RuntimeError):
    """strict=True and the QPU could not serve a call (no token or solver, refused, failing)."""


class QPUBudgetExceeded(RuntimeError):
    """The next QPU call would exceed `qpu_time_budget_s` and `on_budget="stop"`, or the
    `meter` refused it."""


class QPUMeter(Protocol):
    """A budget outside the sampler (the service's ledger): asked before and told after each
    QPU call. `before_call` raises QPUBudgetExceeded to refuse the call."""

    def before_call(self, estimated_s: float) -> None: ...

    def after_call(self, estimated_s: float, charged_s: float) -> None: ...


class Unavailable(Exception):  # noqa: N818 - a control-flow signal, caught by the backend
    """The QPU could not serve this call (strict=False): the backend falls back."""


@dataclass
class CallRecord:
    """What the QPU calls of one `sample` did."""

    calls: int = 0
    qpu_s: float = 0.0
    retries: int = 0
    estimated: bool = False  # some call's QPU time came from the timing model


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


def estimated_cost(reads: int, calls: int, annealing_time: float | None) -> float:
    """QPU access seconds of `reads` reads in `calls` calls under the published timing model."""
    per_read = QPU_PER_READ_S + max(0.0, (annealing_time or 20.0) - 20.0) * 1e-6
    return calls * QPU_PROGRAMMING_S + reads * per_read


class QPUClient:
    """One solver (or emulator) of a `dwave` backend, its retries and its QPU-time budget."""

    def __init__(self, options: DWaveOptions) -> None:
        self.options = options
        self.qpu: Any = None
        self.graph: Any = None
        self.solver_id = ""
        self.latched: str | None = None  # permanent fallback reason (no QPU / budget spent)
        self.qpu_time_s = 0.0
        self.retries = 0
        #: asked before / told after every QPU call (the service sets one per request)
        self.meter: QPUMeter | None = None

    @property
    def emulated(self) -> bool:
        return self.options.solver == "emulator"

    @property
    def properties(self) -> dict[str, Any]:
        return self.qpu.properties

    def connect(self) -> bool:
        """Build the QPU (or emulator) sampler; on failure raise (strict) or latch the
        fallback and return False."""
        if self.latched is not None:
            return False
        if self.qpu is not None:
            return True
        o = self.options
        try:
            if self.emulated:
                qpu, self.solver_id = make_emulator(
                    o.topology, topology_shape(o.topology, o.topology_shape),
                    beta=o.emulated_beta, sweeps=o.emulator_sweeps, sampler=o.emulator_sampler)
            else:
                status = qpu_status()
                if not status["token"]:
                    raise RuntimeError(status["message"])
                from dwave.system import DWaveSampler

                qpu = DWaveSampler(**({} if o.solver is None else {"solver": o.solver}))
                self.solver_id = str(qpu.solver.name)
            self.graph = qpu.to_networkx_graph()
            self.qpu = qpu
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to reach a solver
            reason = f"cannot use D-Wave solver {o.solver!r}: {exc}"
            if o.strict:
                raise QPUUnavailable(f"{STRICT}: {reason}") from exc
            self.latched = reason
            return False

    # ------------------------------------------------------------------ budget
    def estimated_cost(self, reads: int, calls: int | None = None) -> float:
        """QPU access seconds for `reads` reads (in `calls` calls; default: as `run` splits
        them) under the published timing model."""
        if calls is None:
            limit = (DEFAULT_READS_LIMIT if self.qpu is None
                     else int(self.properties["num_reads_range"][1]))
            calls = max(1, self.options.num_spin_reversal_transforms, -(-reads // limit))
        return estimated_cost(reads, calls, self.options.annealing_time)

    def over_budget(self, cost: float) -> str | None:
        """None if `cost` more seconds fit the qpu_time_budget_s; else QPUBudgetExceeded
        (on_budget="stop"), or the reason, latched (later calls fall back too)."""
        o = self.options
        if o.qpu_time_budget_s is None or self.qpu_time_s + cost <= o.qpu_time_budget_s:
            return None
        reason = (f"qpu_time_budget_s exhausted: {self.qpu_time_s:.3f} s spent, next call "
                  f"~{cost:.3f} s, budget {o.qpu_time_budget_s} s")
        if o.on_budget == "stop":
            raise QPUBudgetExceeded(reason)
        self.latched = reason
        return reason

    # ------------------------------------------------------------------- calls
    def run(self, program: QPUProgram, emb: Embedding, num_reads: int,
            rng: np.random.Generator, record: CallRecord, timer: Timer) -> np.ndarray:
        """Physical spins (num_reads, qubits): split over the num_reads limit and spin-reversal
        transforms, each call retried on transient errors."""
        srts = self.options.num_spin_reversal_transforms
        limit = int(self.properties["num_reads_range"][1])
        parts = max(1, srts, -(-num_reads // limit))
        sizes = [num_reads // parts + (i < num_reads % parts) for i in range(parts)]
        labels = emb.qubits.tolist()
        params: dict[str, Any] = {"answer_mode": "raw", "auto_scale": False}
        if self.options.annealing_time is not None:
            params["annealing_time"] = self.options.annealing_time
        out = []
        for size in sizes:
            with timer("preprocess"):
                # Spin-reversal transforms by hand, not dwave.preprocessing's
                # SpinReversalTransformComposite: given the same transforms (`srts`) both
                # program identical BQMs and return identical spins, but the composite runs
                # num_reads per transform (we split the reads), concatenating its transforms
                # drops info["timing"] (the QPU time `call` bills), and called once per
                # transform it adds 0.12 s per 4 transforms on Pegasus(16) against our 0.02 s
                # (benchmarks/ocean_parity.py).
                gauge = np.ones(len(labels))
                if srts:
                    gauge = np.where(rng.random(len(labels)) < 0.5, -1.0, 1.0)
                bqm = program.bqm(labels, gauge)
                if self.emulated:
                    params["seed"] = int(rng.integers(SEED_LIMIT))
            with timer("sample"):
                result = self.call(bqm, size, params, record)
            with timer("postprocess"):
                got = list(result.variables)
                spins = result.record.sample
                if got != labels:
                    index = {q: i for i, q in enumerate(got)}
                    spins = spins[:, [index[q] for q in labels]]
                if result.vartype is dimod.BINARY:
                    spins = 2 * spins.astype(np.int8) - 1
                out.append(spins * gauge.astype(np.int8) if srts else spins)
        return np.concatenate(out)

    def call(self, bqm: dimod.BinaryQuadraticModel, reads: int, params: dict[str, Any],
             record: CallRecord) -> dimod.SampleSet:
        """One QPU call with bounded retries and exponential backoff; records QPU time."""
        from dwave.cloud.exceptions import SolverAuthenticationError, SolverNotFoundError

        o = self.options
        refused = (SolverAuthenticationError, SolverNotFoundError)
        transient = _transient_errors()
        estimate = self.estimated_cost(reads, calls=1)
        if self.meter is not None:
            self.meter.before_call(estimate)  # may raise QPUBudgetExceeded: nothing is spent

        def attempt() -> dimod.SampleSet:
            result = self.qpu.sample(bqm, num_reads=reads, **params)
            result.resolve()
            return result

        def count(_: Exception) -> None:
            self.retries += 1
            record.retries += 1

        try:
            result = call_with_retries(
                attempt, max_retries=o.max_retries, backoff_s=o.retry_backoff_s,
                retryable=lambda e: isinstance(e, transient) and not isinstance(e, refused),
                on_retry=count)
        except refused as exc:
            if o.strict:
                raise QPUUnavailable(f"{STRICT}: {exc!r}") from exc
            self.latched = f"QPU refused the call: {exc!r}"
            raise Unavailable(self.latched) from exc
        except transient as exc:
            attempts = o.max_retries + 1
            if o.strict:
                raise QPUUnavailable(f"{STRICT}: QPU call failed {attempts} times: "
                                     f"{exc!r}") from exc
            raise Unavailable(f"QPU call failed {attempts} times (last: {exc!r})") from exc
        if self.emulated or "qpu_access_time" not in result.info.get("timing", {}):
            seconds = estimate  # the mock's timing is a placeholder
            record.estimated = True
        else:
            seconds = float(result.info["timing"]["qpu_access_time"]) * 1e-6
        record.calls += 1
        record.qpu_s += seconds
        self.qpu_time_s += seconds
        if self.meter is not None:
            self.meter.after_call(estimate, seconds)
        return result
