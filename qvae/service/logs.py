"""Rate-limited logging for the service: a flood of one message cannot fill the disk.

An attack or a fault repeats one log line as fast as the event loop spins (measured: asyncio's
"socket.accept() out of system resource" with its traceback, 55 MB in 6 s once descriptors ran
out). `RateLimit` lets `burst` records of one kind (logger, level, first line of the message)
through per `interval_s` and counts the rest; the first record of that kind in a later window
says how many were suppressed.

>>> import logging
>>> limit = RateLimit(burst=2, interval_s=60)
>>> records = [logging.LogRecord("x", logging.ERROR, "", 0, "boom", None, None) for _ in range(5)]
>>> [limit.filter(r) for r in records], limit.suppressed
([True, True, False, False, False], 3)
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

#: Loggers whose handlers get the filter (the root's catch what propagates, e.g. asyncio's).
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "qvae")
MAX_KINDS = 1024


class RateLimit(logging.Filter):
    def __init__(self, burst: int = 20, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.interval_s, self.clock = burst, interval_s, clock
        self.suppressed = 0  # in total, for tests and metrics
        self._windows: dict[tuple, list] = {}  # kind -> [window start, passed, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200])
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= self.interval_s:
                dropped = window[2] if window is not None else 0
                if window is None and len(self._windows) >= MAX_KINDS:
                    self._expire(now)
                self._windows[kind] = [now, 1, 0]
                if dropped:
                    record.msg = (f"{record.getMessage()} [{dropped} more like this suppressed "
                                  f"in the previous {self.interval_s:g} s]")
                    record.args = None
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            self.suppressed += 1
            return False

    def _expire(self, now: float) -> None:
        """Forget finished windows (their suppressed counts go unreported), or all of them."""
        for kind in [k for k, w in self._windows.items() if now - w[0] >= self.interval_s]:
            del self._windows[kind]
        if len(self._windows) >= MAX_KINDS:
            self._windows.clear()


def install(burst: int, interval_s: float) -> RateLimit:
    """Put one `RateLimit` on the handlers of the service's loggers (and give the root logger a
    stderr handler if it has none, so asyncio's errors pass through the filter rather than
    logging's unfiltered last-resort handler)."""
    limit = RateLimit(burst, interval_s)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            for old in [f for f in handler.filters if isinstance(f, RateLimit)]:
                handler.removeFilter(old)
            handler.addFilter(limit)
    return limit
