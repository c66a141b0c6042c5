"""The service's durable state: QPU ledgers, QPU reservations and the job index with results.

`Store` is the interface the service uses; `SQLiteStore` is the embedded default (the standard
library's sqlite3, WAL mode). Several `qvae serve` processes on one host pointing at the same
file share one budget: a reservation is one `BEGIN IMMEDIATE` transaction, so two processes (or
two threads) can never both take the last QPU second. Replicas on several hosts need a server
database: implement `Store` over it (reservations then need leases instead of the pid check in
`release_dead`) and pass it to `create_app`'s `Service`.

Accounts are plain names: "key:<label>" for a key's `qpu_budget_s`, "server" for the service's
`qpu_time_budget_s`. Seconds charged are the QPU access time the solver reported.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SERVER = "server"
# BEGIN IMMEDIATE waits this long for another process's write transaction (they are milliseconds
# long; results of up to max_body-sized jobs are the longest writes)
BUSY_TIMEOUT_MS = 30_000


SCHEMA = (
    "CREATE TABLE ledger (account TEXT PRIMARY KEY, used_s REAL NOT NULL)",
    "CREATE TABLE reservations (id TEXT NOT NULL, account TEXT NOT NULL, seconds REAL NOT NULL, "
    "holder TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (id, account))",
    "CREATE INDEX reservations_account ON reservations (account)",
    "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, backend TEXT NOT NULL, "
    "resource TEXT NOT NULL, idempotency_key TEXT, status TEXT NOT NULL, submitted_at REAL NOT "
    "NULL, started_at REAL, finished_at REAL, error TEXT, size INTEGER NOT NULL DEFAULT 0, "
    "holder TEXT NOT NULL)",
    # results apart from the index, so reading the index never touches result pages
    "CREATE TABLE results (id TEXT PRIMARY KEY, body BLOB NOT NULL)",
)


def key_account(label: str) -> str:
    return f"key:{label}"


class StoreError(RuntimeError):
    """The state database cannot be used; the message names the file and what to do."""


class BudgetRefused(Exception):
    """used + reserved + estimate would exceed `limit_s` of `account`."""

    def __init__(self, account: str, used_s: float, reserved_s: float, estimate_s: float,
                 limit_s: float):
        super().__init__(account)
        self.account, self.used_s, self.reserved_s = account, used_s, reserved_s
        self.estimate_s, self.limit_s = estimate_s, limit_s


@dataclass
class JobRecord:
    """One row of the job index (the result bytes live apart and load only on fetch)."""

    id: str
    owner: str
    backend: str
    resource: str
    idempotency_key: str | None
    status: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    error: dict[str, Any] | None
    size: int  # bytes of the stored result (0: none)


class Store(ABC):
    """What the service keeps across restarts and shares between its processes."""

    # ---------------------------------------------------------------- QPU ledger
    @abstractmethod
    def used(self, account: str) -> float:
        """QPU seconds charged to `account` so far."""

    @abstractmethod
    def reserved(self, account: str) -> float:
        """QPU seconds held by open reservations against `account`."""

    @abstractmethod
    def reserve(self, rid: str, limits: dict[str, float | None], seconds: float) -> None:
        """Atomically hold `seconds` against every account in `limits` (None: no limit), or
        raise BudgetRefused naming the first account whose used + reserved + seconds > limit."""

    @abstractmethod
    def admit_call(self, rid: str, limits: dict[str, float | None], seconds: float) -> None:
        """Just before one QPU call of reservation `rid`: raise BudgetRefused if used + others'
        reservations + `seconds` > limit; else raise `rid`'s hold to at least `seconds`."""

    @abstractmethod
    def charge(self, rid: str | None, accounts: list[str], seconds: float,
               estimated_s: float = 0.0) -> None:
        """Add `seconds` to each account; lower `rid`'s hold by the call's `estimated_s`."""

    @abstractmethod
    def release(self, rid: str) -> None:
        """Drop what is left of a reservation (idempotent)."""

    @abstractmethod
    def release_dead(self) -> int:
        """Drop reservations of processes that no longer run (crashed); return how many."""

    @abstractmethod
    def add_used(self, seconds: dict[str, float]) -> None:
        """Add spent seconds per account in one transaction (importing an old ledger)."""

    # ------------------------------------------------------------------ job index
    @abstractmethod
    def put_job(self, record: JobRecord, result: bytes | None = None) -> None:
        """Insert or replace a job's index row (and its result bytes when given)."""

    @abstractmethod
    def job_result(self, job_id: str) -> bytes | None:
        """The stored result bytes of a job (None when there are none)."""

    @abstractmethod
    def delete_jobs(self, job_ids: list[str]) -> None:
        """Forget jobs and their results."""

    @abstractmethod
    def adopt_jobs(self, error: dict[str, Any], now: float) -> list[JobRecord]:
        """At startup: take over the jobs of processes that no longer run (a restart's
        predecessor), failing their unfinished ones with `error`, and return this process's
        index rows, without result bytes. Jobs of live processes sharing the store stay theirs."""

    @abstractmethod
    def result_bytes(self) -> int:
        """Bytes of results stored and not yet fetched, over every process."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


class SQLiteStore(Store):
    """The embedded default: one SQLite file (or memory when `path` is None), WAL mode.

    One connection behind a lock serves every thread of a process; other processes coordinate
    through SQLite's file locks (`busy_timeout`). Commits are durable against a crash of the
    process (WAL, synchronous=NORMAL), not against power loss of the host.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.RLock()
        where = ":memory:" if path is None else str(path)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(where, timeout=BUSY_TIMEOUT_MS / 1000,
                                      isolation_level=None, check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path is not None:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(self._unreadable(exc)) from None

    def _unreadable(self, exc: BaseException) -> str:
        return (f"the service database {self.path} is unreadable ({exc}): move it aside and "
                "start again (a fresh file is created; QPU seconds spent and unfetched results "
                "in it are lost), or restore it from a backup")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise StoreError(f"the service database {self.path} has schema version {version}; "
                             f"this qvae reads version {SCHEMA_VERSION}: use the qvae that wrote "
                             "it, or point state_db at a new file")
        with self._write() as db:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{self.path} is an SQLite database of something else (it has "
                                 "tables but no qvae schema): point state_db at a new file")
            for statement in SCHEMA:  # not executescript: it would commit half-way
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), so read-check-write is atomic
        against other threads (the lock) and other processes (SQLite's reserved lock)."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise StoreError(self._unreadable(exc)) from None
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise StoreError(self._unreadable(exc)) from None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            try:
                return self.db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(self._unreadable(exc)) from None

    # ---------------------------------------------------------------- QPU ledger
    @staticmethod
    def _used(db: sqlite3.Connection, account: str) -> float:
        row = db.execute("SELECT used_s FROM ledger WHERE account = ?", (account,)).fetchone()
        return 0.0 if row is None else float(row[0])

    @staticmethod
    def _held(db: sqlite3.Connection, account: str, exclude: str = "") -> float:
        return float(db.execute("SELECT coalesce(sum(seconds), 0) FROM reservations WHERE "
                                "account = ? AND id != ?", (account, exclude)).fetchone()[0])

    def used(self, account: str) -> float:
        rows = self._read("SELECT used_s FROM ledger WHERE account = ?", (account,))
        return float(rows[0][0]) if rows else 0.0

    def reserved(self, account: str) -> float:
        return float(self._read("SELECT coalesce(sum(seconds), 0) FROM reservations WHERE "
                                "account = ?", (account,))[0][0])

    def _check(self, db: sqlite3.Connection, rid: str, limits: dict[str, float | None],
               seconds: float) -> None:
        for account, limit in limits.items():
            if limit is None:
                continue
            used, held = self._used(db, account), self._held(db, account, exclude=rid)
            if used + held + seconds > limit:
                raise BudgetRefused(account, used, held, seconds, limit)

    def reserve(self, rid: str, limits: dict[str, float | None], seconds: float) -> None:
        with self._write() as db:
            self._check(db, rid, limits, seconds)
            now = time.time()
            db.executemany("INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?)",
                           [(rid, a, seconds, self.holder, now) for a in limits])

    def admit_call(self, rid: str, limits: dict[str, float | None], seconds: float) -> None:
        with self._write() as db:
            self._check(db, rid, limits, seconds)
            now = time.time()
            for account in limits:
                db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?) ON CONFLICT (id, "
                           "account) DO UPDATE SET seconds = max(seconds, excluded.seconds)",
                           (rid, account, seconds, self.holder, now))

    def charge(self, rid: str | None, accounts: list[str], seconds: float,
               estimated_s: float = 0.0) -> None:
        with self._write() as db:
            for account in accounts:
                db.execute("INSERT INTO ledger VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET "
                           "used_s = used_s + excluded.used_s", (account, seconds))
            if rid is not None:
                db.execute("UPDATE reservations SET seconds = max(0, seconds - ?) WHERE id = ?",
                           (estimated_s, rid))

    def release(self, rid: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM reservations WHERE id = ?", (rid,))

    @staticmethod
    def _dead(db: sqlite3.Connection, table: str) -> list[str]:
        """Holders in `table` that are processes of this host which no longer run."""
        host, dead = socket.gethostname(), []
        for (holder,) in db.execute(f"SELECT DISTINCT holder FROM {table}").fetchall():
            name, _, pid = holder.rpartition(":")
            if name == host and pid.isdigit() and not _alive(int(pid)):
                dead.append(holder)
        return dead

    def release_dead(self) -> int:
        with self._write() as db:
            return sum(db.execute("DELETE FROM reservations WHERE holder = ?", (h,)).rowcount
                       for h in self._dead(db, "reservations"))

    def add_used(self, seconds: dict[str, float]) -> None:
        with self._write() as db:
            for account, value in seconds.items():
                db.execute("INSERT INTO ledger VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET "
                           "used_s = used_s + excluded.used_s", (account, float(value)))

    # ------------------------------------------------------------------ job index
    def put_job(self, record: JobRecord, result: bytes | None = None) -> None:
        error = None if record.error is None else json.dumps(record.error)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.id, record.owner, record.backend, record.resource,
                        record.idempotency_key, record.status, record.submitted_at,
                        record.started_at, record.finished_at, error, record.size,
                        self.holder))
            if result is not None:
                db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (record.id, result))

    def job_result(self, job_id: str) -> bytes | None:
        rows = self._read("SELECT body FROM results WHERE id = ?", (job_id,))
        return bytes(rows[0][0]) if rows else None

    def delete_jobs(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._write() as db:
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
            db.executemany("DELETE FROM results WHERE id = ?", [(i,) for i in job_ids])

    def adopt_jobs(self, error: dict[str, Any], now: float) -> list[JobRecord]:
        with self._write() as db:
            for holder in self._dead(db, "jobs"):
                db.execute("UPDATE jobs SET holder = ? WHERE holder = ?", (self.holder, holder))
            db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE "
                       "holder = ? AND status NOT IN ('done', 'failed')",
                       (now, json.dumps(error), self.holder))
            rows = db.execute("SELECT id, owner, backend, resource, idempotency_key, status, "
                              "submitted_at, started_at, finished_at, error, size FROM jobs "
                              "WHERE holder = ?", (self.holder,)).fetchall()
        out = []
        for row in rows:
            try:
                error_of = None if row[9] is None else json.loads(row[9])
            except ValueError as exc:
                raise StoreError(self._unreadable(f"job {row[0]}: {exc}")) from None
            out.append(JobRecord(*row[:9], error_of, int(row[10])))  # type: ignore[arg-type]
        return out

    def result_bytes(self) -> int:
        return int(self._read("SELECT coalesce(sum(size), 0) FROM jobs")[0][0])

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
