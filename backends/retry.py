"""One retry policy for calls to remote services (the D-Wave solver, a qvae sampler service).

`call_with_retries(fn, ...)` runs `fn()` up to `max_retries + 1` times. An exception that
`retryable` accepts is retried after an exponential back-off (`backoff_s · 2^attempt`, at most
`max_backoff_s`, or the wait the service asked for through `delay_hint`); any other exception
passes through at once; the last retryable one is re-raised when the attempts run out, so the
caller knows that it was raised on attempt `max_retries + 1`. A result that should be retried
(an HTTP 503, say) is raised by `fn` as `RetryableResult(value)`.

>>> tries = []
>>> def flaky():
...     tries.append(1)
...     if len(tries) < 3:
...         raise TimeoutError("busy")
...     return "ok"
>>> call_with_retries(flaky, max_retries=3, backoff_s=0.5,
...                   retryable=lambda e: isinstance(e, TimeoutError), sleep=print)
0.5
1.0
'ok'
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["RetryableResult", "call_with_retries"]

T = TypeVar("T")


class RetryableResult(Exception):  # noqa: N818 - a result, not an error, until retries run out
    """Raised by the retried function for a result that asks for another attempt (e.g. an HTTP
    503 response); re-raised when the attempts run out, with the result in `value`."""

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self.value = value


def call_with_retries(
    fn: Callable[[], T],
    *,
    max_retries: int,
    backoff_s: float,
    retryable: Callable[[Exception], bool],
    max_backoff_s: float = math.inf,
    delay_hint: Callable[[Exception], float | None] | None = None,
    on_retry: Callable[[Exception], None] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """`fn()`, retried on the exceptions `retryable` accepts (see the module doc).

    `delay_hint(exc)` may return the wait a service asked for (e.g. Retry-After), used instead
    of the back-off; `on_retry(exc)` is told about each retry before its wait (counters);
    `sleep` is `time.sleep` unless a test injects one.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retryable(exc) or attempt >= max_retries:
                raise
            hinted = delay_hint(exc) if delay_hint is not None else None
            delay = hinted if hinted is not None else min(backoff_s * 2**attempt, max_backoff_s)
            attempt += 1
            if on_retry is not None:
                on_retry(exc)
            sleep(delay)
