"""Bounded work queues and the job table of the sampler service.

Every request becomes a `Job` on one *resource*: "qpu" (one worker: the QPU is one machine) or
"cpu" (a pool). A resource admits at most `workers + queue` jobs; beyond that `submit` raises
`QueueFull` with a Retry-After estimate, so load turns into 429s instead of an unbounded pile.

A job ends exactly once (done or failed) and is delivered once: inline requests get it in their
response, others fetch it by id, after which only a tombstone remains (410). With `jobs_dir` set,
job states are written atomically, so results survive a restart and a job cut off by a crash is
reported as failed rather than lost.
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
from pathlib import Path
from typing import Any

from qvae.atomic import write_bytes_atomic

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

    def status_json(self) -> bytes:
        """The JobStatus body; the (possibly large) result is spliced in already encoded."""
        head = {"job_id": self.id, "status": self.status, "error": self.error,
                "submitted_at": self.submitted_at, "started_at": self.started_at,
                "finished_at": self.finished_at}
        body = json.dumps(head, separators=(",", ":")).encode()
        result = self.result if self.status == "done" and self.result is not None else b"null"
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
                 jobs_dir: Path | None = None, initializer: Callable[[], Any] | None = None):
        """`resources`: name -> (workers, queue); `initializer` runs once in each worker."""
        self.resources = {n: Resource(n, w, q, initializer) for n, (w, q) in resources.items()}
        self.ttl_s, self.jobs_dir = ttl_s, jobs_dir
        self.jobs: dict[str, Job] = {}
        self.tombstones: dict[str, tuple[float, str]] = {}  # fetched job id -> (when, owner)
        self.idempotent: dict[tuple[str, str], str] = {}
        self.retained: OrderedDict[str, int] = OrderedDict()  # delivered id -> result bytes
        self.retained_bytes = 0
        self.lock = threading.Lock()
        self.draining = False
        if jobs_dir is not None:
            jobs_dir.mkdir(parents=True, exist_ok=True)
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
        try:
            result, error = work(job), None
        except ServiceError as exc:
            result, error = None, {"status_code": exc.status_code, "detail": exc.detail}
        except Exception as exc:  # noqa: BLE001 - reported to the client, never swallowed
            result, error = None, {"status_code": 500, "detail": f"{type(exc).__name__}: {exc}"}
        with self.lock:
            res.running -= 1
            res.outstanding -= 1
            took = time.time() - job.started_at
            res.mean_seconds += 0.2 * (took - res.mean_seconds)
        self._finish(job, result, error)

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
        now, dropped = time.time(), 0
        with self.lock:
            for job in list(self.jobs.values()):
                if job.delivered_at is not None and now - job.delivered_at > RETAIN_DELIVERED_S:
                    self._forget(job)
                elif job.finished_at is not None and now - job.finished_at > self.ttl_s:
                    self._forget(job)
                    self._unpersist(job.id)
                    dropped += 1
            for job_id, (when, _) in list(self.tombstones.items()):
                if now - when > self.ttl_s:
                    del self.tombstones[job_id]
        return dropped

    # ---------------------------------------------------------------------- shutdown
    def counts(self) -> tuple[int, int]:
        """(queued, running) over all resources."""
        with self.lock:
            running = sum(r.running for r in self.resources.values())
            return sum(r.outstanding for r in self.resources.values()) - running, running

    def drain(self, grace_s: float) -> None:
        """Admit nothing more; let work finish for `grace_s`, then fail what is left, cleanly."""
        with self.lock:
            self.draining = True
        deadline = time.monotonic() + grace_s
        while sum(self.counts()) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            leftover = [j for j in self.jobs.values() if j.status not in FINAL]
        for job in leftover:
            where = "before it started" if job.status == "queued" else "while it ran"
            self._finish(job, None, {"status_code": 503, "detail": f"the service shut down "
                                     f"{where}; submit the request again"})
        for res in self.resources.values():
            res.executor.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------------- persistence
    def _path(self, job_id: str) -> Path:
        assert self.jobs_dir is not None
        return self.jobs_dir / f"{job_id}.json"

    def _persist(self, job: Job) -> None:
        if self.jobs_dir is None or job.inline:
            return
        meta = {"owner": job.owner, "backend": job.backend, "resource": job.resource,
                "idempotency_key": job.idempotency_key}
        body = job.status_json()[:-1] + b',"meta":' + json.dumps(meta).encode() + b"}"
        write_bytes_atomic(self._path(job.id), body)

    def _unpersist(self, job_id: str) -> None:
        if self.jobs_dir is not None:
            self._path(job_id).unlink(missing_ok=True)

    def _load(self) -> None:
        """Jobs a previous process left: results stay fetchable; unfinished ones failed."""
        assert self.jobs_dir is not None
        now = time.time()
        for path in sorted(self.jobs_dir.glob("*.json")):
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            meta = saved["meta"]
            job = Job(saved["job_id"], meta["owner"], meta["backend"], meta["resource"], False,
                      meta.get("idempotency_key"), submitted_at=saved["submitted_at"],
                      started_at=saved["started_at"], finished_at=saved["finished_at"])
            if saved["status"] in FINAL:
                job.status, job.error = saved["status"], saved["error"]
                result = saved.get("result")
                job.result = None if result is None else json.dumps(
                    result, separators=(",", ":")).encode()
            else:
                job.status, job.finished_at = "failed", now
                job.error = {"status_code": 503, "detail": "the service stopped before this "
                             "job finished; submit the request again"}
            if now - job.finished_at > self.ttl_s:
                path.unlink(missing_ok=True)
                continue
            job.done.set_result(None)
            self.jobs[job.id] = job
            if job.idempotency_key is not None:
                self.idempotent[(job.owner, job.idempotency_key)] = job.id
            self._persist(job)
