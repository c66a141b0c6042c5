"""Cooperative cancellation: a deadline (and a stop flag) for the work running in this context.

A service runs a job under `limit(seconds)`; long loops in the backends (a Gibbs sweep, a
Langevin step, a chunk of enumeration or annealing) call `check()` between units of work, which
raises `Cancelled` once the deadline has passed or someone called `Token.cancel`. Outside any
`limit` (training, tests, a notebook) `check()` is one context-variable lookup and does nothing.

>>> with limit(60.0) as token:
...     check()  # well within the deadline: returns
...     token.cancel("the service shut down")
...     try:
...         check()
...     except Cancelled as exc:
...         print(exc)
the service shut down
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Cancelled(Exception):  # noqa: N818 - not an error of the work itself, a stop order
    """The work was stopped: its wall-time limit passed, or it was cancelled (`reason`).

    Deliberately not a TimeoutError/RuntimeError/ValueError: code that retries or reports those
    (e.g. the QPU client's transient-error retries) must let a stop order through.
    """

    def __init__(self, reason: str, *, timed_out: bool = False):
        super().__init__(reason)
        self.reason, self.timed_out = reason, timed_out


class Token:
    """A deadline on `time.monotonic()` (None: no deadline) plus a thread-safe stop flag."""

    def __init__(self, seconds: float | None = None, what: str = "the work"):
        self.started = time.monotonic()
        self.seconds = seconds
        self.deadline = None if seconds is None else self.started + seconds
        self.what = what
        self._stop = threading.Event()
        self._reason = ""

    def cancel(self, reason: str) -> None:
        """Stop the work at its next `check()`."""
        self._reason = reason
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        if self._stop.is_set():
            raise Cancelled(self._reason)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled(f"{self.what} exceeded its wall-time limit of {self.seconds:g} s "
                            f"and was stopped", timed_out=True)


_current: ContextVar[Token | None] = ContextVar("qvae_cancel_token", default=None)


def check() -> None:
    """Raise `Cancelled` if the work of this context is past its deadline or cancelled."""
    token = _current.get()
    if token is not None:
        token.check()


def current() -> Token | None:
    """The token of this context, if a `limit` is in force."""
    return _current.get()


@contextmanager
def limit(seconds: float | None = None, what: str = "the work", *,
          token: Token | None = None) -> Iterator[Token]:
    """Run the block under a deadline `seconds` from now (or under `token`); yields the token."""
    token = token or Token(seconds, what)
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)
