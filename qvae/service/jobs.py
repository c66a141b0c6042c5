"""Bounded work queues and the job table of the sampler service.

Every request becomes a `Job` on one *resource*: "qpu" (one worker: the QPU is one machine) or
"cpu" (a pool). A resource admits at most `workers + queue` jobs; beyond that `submit` raises
`QueueFull` with a Retry-After estimate, so load turns into 429s instead of an unbounded pile.

A job ends exactly once (done or failed) and is delivered once: inline requests get it in their
response, others fetch it by id, after which only a tombstone remains (410). With a `Store`,
fetch-by-id jobs are kept in its index and their results in it, not in memory: results survive a
restart (when the store is a file), a job cut off by a crash is reported as failed rather than
lost, and a restart reads only the index (result bytes load when fetched).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qvae import cancel
from qvae.service.store import JobRecord, Store

FINAL = ("done", "failed")
# An idempotent retry within this window gets the same answer again (a client retries after a
# lost response within its back-off, seconds); the byte cap bounds what a busy trainer pins.
RETAIN_DELIVERED_S, RETAIN_MAX_BYTES = 30.0, 256 * 2**20


class ServiceError(Exception):
    """An HTTP error to answer with: status code, detail, optional headers."""

    def __init__(self, status_code: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers or {}


class QueueFull(ServiceError):
    def __init__(self, resource: str, limit: int, retry_after: int):
        super().__init__(429, f"the {resource} queue is full ({limit} requests admitted); "
                         f"retry after {retry_after} s", {"Retry-After": str(retry_after)})


class Draining(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "the service is shutting down; retry against its replacement",
                         {"Retry-After": "5"})


@dataclass
class Job:
    id: str
    owner: str
    backend: str
    resource: str
    inline: bool
    idempotency_key: str | None = None
    status: str = "queued"
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: bytes | None = None  # the encoded SampleResult
    error: dict[str, Any] | None = None
    done: Future = field(default_factory=Future)  # resolves when the job is final
    delivered_at: float | None = None
    stored: bool = False  # the result is in the scheduler's store, not in `result`

    def status_json(self, result: bytes | None = None, status: str | None = None) -> bytes:
        """The JobStatus body; the (possibly large) result is spliced in already encoded
        (`result`: the one loaded from the store, when the job keeps it there; `status`: the
        status read before that result, see `Scheduler.status_body`)."""
        status = self.status if status is None else status
        final = status in FINAL  # a final job's fields, only with the final status
        head = {"job_id": self.id, "status": status, "error": self.error if final else None,
                "submitted_at": self.submitted_at, "started_at": self.started_at,
                "finished_at": self.finished_at if final else None}
        body = json.dumps(head, separators=(",", ":")).encode()
        result = result if result is not None else self.result
        result = result if status == "done" and result is not None else b"null"
        return body[:-1] + b',"result":' + result + b"}"


class Resource:
    """A worker pool with bounded admission and a running mean of job duration."""

    def __init__(self, name: str, workers: int, queue: int,
                 initializer: Callable[[], Any] | None = None):
        self.name, self.workers, self.limit = name, workers, workers + queue
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"qvae-{name}",
                                           initializer=initializer)
        self.outstanding = self.running = 0
        self.mean_seconds = 0.05

    def retry_after(self) -> int:
        backlog = max(1, self.outstanding - self.workers + 1)
        return int(min(300, max(1, math.ceil(backlog * self.mean_seconds / self.workers))))


class Scheduler:
    def __init__(self, resources: dict[str, tuple[int, int]], ttl_s: float,
                 store: Store | None = None, initializer: Callable[[], Any] | None = None,
                 max_job_seconds: float | None = None):
        """`resources`: name -> (workers, queue); `initializer` runs once in each worker;
        `store`: where fetch-by-id jobs and their results live (None: in memory, not kept);
        `max_job_seconds`: wall-time limit of a job, enforced by `qvae.cancel` checks."""
        self.resources = {n: Resource(n, w, q, initializer) for n, (w, q) in resources.items()}
        self.ttl_s, self.store = ttl_s, store
        self.jobs: dict[str, Job] = {}
        self.tombstones: dict[str, tuple[float, str]] = {}  # fetched job id -> (when, owner)
        self.idempotent: dict[tuple[str, str], str] = {}
        self.retained: OrderedDict[str, int] = OrderedDict()  # delivered id -> result bytes
        self.retained_bytes = 0
        self.lock = threading.Lock()
        self.draining = False
        self.max_job_seconds = max_job_seconds
        self.tokens: dict[str, cancel.Token] = {}  # running job id -> its stop token
        self._drain_deadline: float | None = None
        if store is not None:
            self._load()

    # ------------------------------------------------------------------ submit / run
    def submit(self, owner: str, backend: str, resource: str, work: Callable[[Job], bytes], *,
               inline: bool, idempotency_key: str | None = None) -> Job:
        """Admit a job (or return the one already admitted under this idempotency key)."""
        with self.lock:
            if idempotency_key is not None:
                known = self.jobs.get(self.idempotent.get((owner, idempotency_key), ""))
                if known is not None:
                    return known
            if self.draining:
                raise Draining()
            res = self.resources[resource]
            if res.outstanding >= res.limit:
                raise QueueFull(resource, res.limit, res.retry_after())
            res.outstanding += 1
            job = Job(uuid.uuid4().hex, owner, backend, resource, inline, idempotency_key)
            self.jobs[job.id] = job
            if idempotency_key is not None:
                self.idempotent[(owner, idempotency_key)] = job.id
        self._persist(job)
        res.executor.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], bytes]) -> None:
        res = self.resources[job.resource]
        with self.lock:
            if job.status != "queued":  # failed by a shutdown before it started
                return
            job.status, job.started_at = "running", time.time()
            res.running += 1
            token = self.tokens[job.id] = cancel.Token(self.max_job_seconds, f"job {job.id}")
        try:
            with cancel.limit(token=token):
                result, error = work(job), None
        except cancel.Cancelled as exc:
            result, error = None, self._cancelled_error(exc)
        except ServiceError as exc:
            result, error = None, {"status_code": exc.status_code, "detail": exc.detail}
        except Exception as exc:  # noqa: BLE001 - reported to the client, never swallowed
            result, error = None, {"status_code": 500, "detail": f"{type(exc).__name__}: {exc}"}
        with self.lock:
            self.tokens.pop(job.id, None)
            res.running -= 1
            res.outstanding -= 1
            took = time.time() - job.started_at
            res.mean_seconds += 0.2 * (took - res.mean_seconds)
        self._finish(job, result, error)

    def _cancelled_error(self, exc: cancel.Cancelled) -> dict[str, Any]:
        if not exc.timed_out:  # a shutdown: drain has already failed the job with its reason
            return {"status_code": 503, "detail": f"{exc.reason}; submit the request again"}
        # 413, not 504: the same request would be cut off again, so a client must not retry it
        return {"status_code": 413, "detail": f"the job exceeded this service's wall-time limit "
                f"of {self.max_job_seconds:g} s (limits.max_job_seconds) and was stopped; "
                "ask for less work (num_samples, or the backend's num_sweeps / num_steps / "
                "burn_in / emulator_sweeps) or split the request"}

    def _finish(self, job: Job, result: bytes | None, error: dict[str, Any] | None) -> None:
        with self.lock:
            if job.status in FINAL:
                return
            job.result, job.error = result, error
            job.status, job.finished_at = ("done" if error is None else "failed"), time.time()
        self._persist(job)
        job.done.set_result(None)

    # --------------------------------------------------------------- deliver / fetch
    def deliver(self, job: Job) -> None:
        """Mark a final job as handed to its client; keep it briefly for idempotent retries."""
        with self.lock:
            if job.delivered_at is None:
                job.delivered_at = time.time()
                if job.idempotency_key is None:
                    self._forget(job)
                else:
                    self.retained[job.id] = len(job.result or b"")
                    self.retained_bytes += self.retained[job.id]
                    while self.retained_bytes > RETAIN_MAX_BYTES:
                        self._forget(self.jobs[next(iter(self.retained))])
        if not job.inline:  # inline jobs are never stored
            self._unpersist(job.id)

    def fetch(self, job_id: str, owner: str) -> Job:
        """The job if `owner` submitted it; ServiceError 404 (unknown/expired) or 410 (fetched)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None and job.owner == owner and not job.inline:
                if job.delivered_at is None:
                    return job
                fetched = True
            else:
                fetched = self.tombstones.get(job_id, (0.0, None))[1] == owner
        if fetched:
            raise ServiceError(410, f"job {job_id} was already fetched; results are delivered "
                               "once")
        raise ServiceError(404, f"no job {job_id} for this key (unknown, or expired after "
                           f"{self.ttl_s:g} s)")

    def find(self, owner: str, idempotency_key: str) -> Job | None:
        """The job `owner` already submitted under this idempotency key, if it is still kept."""
        with self.lock:
            return self.jobs.get(self.idempotent.get((owner, idempotency_key), ""))

    def status_body(self, job: Job) -> tuple[bytes, bool]:
        """A job's JobStatus body and whether it is final (then the caller delivers it).

        The status is read once, before the result: a job that finishes meanwhile shows as
        still running this time and its result comes with the next poll. Read the other way
        round, a job finishing between the two reads showed as "done" with a null result and
        was then marked delivered: its samples were lost."""
        status = job.status
        result = self.result_of(job) if status == "done" else None
        return job.status_json(result, status), status in FINAL

    def result_of(self, job: Job) -> bytes | None:
        """A job's result bytes, from memory or (loaded now) from the store."""
        result = job.result  # read once: _persist may drop it from memory meanwhile
        if result is None and job.stored and self.store is not None:
            result = self.store.job_result(job.id)
        return result

    def _forget(self, job: Job) -> None:
        """Drop a job; fetched-by-id jobs leave a tombstone so a second fetch says 410."""
        self.jobs.pop(job.id, None)
        self.retained_bytes -= self.retained.pop(job.id, 0)
        if job.delivered_at is not None and not job.inline:  # inline ones are never fetched
            self.tombstones[job.id] = (job.delivered_at, job.owner)
        if job.idempotency_key is not None:
            self.idempotent.pop((job.owner, job.idempotency_key), None)

    def expire(self) -> int:
        """Drop unfetched results past the TTL, old tombstones and retained answers."""
        now, gone = time.time(), []
        with self.lock:
            for job in list(self.jobs.values()):
                if job.delivered_at is not None and now - job.delivered_at > RETAIN_DELIVERED_S:
                    self._forget(job)
                elif job.finished_at is not None and now - job.finished_at > self.ttl_s:
                    self._forget(job)
                    gone.append(job.id)
            for job_id, (when, _) in list(self.tombstones.items()):
                if now - when > self.ttl_s:
                    del self.tombstones[job_id]
        if self.store is not None:
            self.store.delete_jobs(gone)  # one transaction for all of them
        return len(gone)

    # ---------------------------------------------------------------------- shutdown
    def counts(self) -> tuple[int, int]:
        """(queued, running) over all resources."""
        with self.lock:
            running = sum(r.running for r in self.resources.values())
            return sum(r.outstanding for r in self.resources.values()) - running, running

    def drain(self, grace_s: float) -> None:
        """Admit nothing more; let work finish for `grace_s`, then fail what is left, cleanly,
        and tell running work to stop at its next `qvae.cancel` check. Calling it again (the
        signal handler and the app's shutdown both do) waits for the first call's deadline."""
        with self.lock:
            self.draining = True
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_s
            deadline = self._drain_deadline
        while sum(self.counts()) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            leftover = [j for j in self.jobs.values() if j.status not in FINAL]
            tokens = list(self.tokens.values())
        for job in leftover:
            where = "before it started" if job.status == "queued" else "while it ran"
            self._finish(job, None, {"status_code": 503, "detail": f"the service shut down "
                                     f"{where}; submit the request again"})
        for token in tokens:
            token.cancel("the service shut down while the job ran")
        for res in self.resources.values():
            res.executor.shutdown(wait=False, cancel_futures=True)

    def stuck_workers(self) -> int:
        """Jobs still running after `drain` (their threads ignore or have not reached a
        cancellation check, e.g. inside one long native call)."""
        with self.lock:
            return sum(r.running for r in self.resources.values())

    # --------------------------------------------------------------------- persistence
    def _persist(self, job: Job) -> None:
        """Write a fetch-by-id job's index row; a final result goes to the store and leaves
        memory (unfetched results cost disk, not resident memory)."""
        if self.store is None or job.inline:
            return
        result = job.result if job.status == "done" else None
        record = JobRecord(job.id, job.owner, job.backend, job.resource, job.idempotency_key,
                           job.status, job.submitted_at, job.started_at, job.finished_at,
                           job.error, len(result or b""))
        self.store.put_job(record, result)
        if result is not None:
            job.stored = True  # before dropping `result`: see result_of
            job.result = None

    def _unpersist(self, job_id: str) -> None:
        if self.store is not None:
            self.store.delete_jobs([job_id])

    def _load(self) -> None:
        """Jobs a previous process left: results stay fetchable; unfinished ones failed. Reads
        the index only, in a few statements, whatever the number of stored jobs."""
        assert self.store is not None
        now = time.time()
        records = self.store.adopt_jobs({"status_code": 503, "detail": "the service stopped "
                                         "before this job finished; submit the request again"},
                                        now)
        expired = {r.id for r in records if now - (r.finished_at or now) > self.ttl_s}
        self.store.delete_jobs(sorted(expired))
        for r in records:
            if r.id in expired:
                continue
            job = Job(r.id, r.owner, r.backend, r.resource, False, r.idempotency_key,
                      status=r.status, submitted_at=r.submitted_at, started_at=r.started_at,
                      finished_at=r.finished_at, error=r.error, stored=r.size > 0)
            job.done.set_result(None)
            self.jobs[job.id] = job
            if job.idempotency_key is not None:
                self.idempotent[(job.owner, job.idempotency_key)] = job.id
