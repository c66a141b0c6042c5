"""The service's HTTP transport: uvicorn's h11 protocol with a header timeout and a connection cap.

uvicorn bounds keep-alive idleness (`timeout_keep_alive`), header size (h11's
`max_incomplete_event_size`) and requests in flight (`limit_concurrency`), and we set all three;
but it has no timeout on a request's *headers* (a connection that never finishes them is kept
forever: no keep-alive timer runs before the first response) and no cap on open connections
(each holds a file descriptor until the process runs out, after which asyncio cannot accept
/healthz either and logs every failed accept). `GuardedH11Protocol` adds both:

* a connection must deliver complete request headers `header_timeout_s` after it opens or after
  its previous response, or it is closed;
* past `max_connections` open connections, the one that has waited longest without sending a
  full request is closed to admit the new one (an idle or half-open client loses its slot, a
  client whose request is being served never does); if every connection is busy, the new one
  gets a 503 and is closed.

`max_connections` is also capped below the process's open-file limit (`connection_cap`), which
`qvae serve` first raises to its hard limit.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

#: File descriptors kept for everything but connections (job store, QPU client, imports, logs).
FD_RESERVE = 64
#: Listen backlog: asyncio accepts up to this many sockets before any protocol code runs, so
#: the cap leaves that many descriptors free as well.
BACKLOG = 64
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
           b"connection: close\r\nretry-after: 5\r\ncontent-length: 46\r\n\r\n"
           b"too many open connections; retry in 5 seconds\n")

log = logging.getLogger("uvicorn.error")


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as servers do); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. a container that forbids it: keep the soft limit
            pass
    return soft


def connection_cap(configured: int) -> int:
    """`configured`, lowered so connections plus the backlog cannot exhaust descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - FD_RESERVE - BACKLOG))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout and a connection cap (module doc).

    `guarded_protocol` makes a subclass with the two settings as class attributes, since
    uvicorn constructs the protocol itself."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_since = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_one():
            self.transport.write(REFUSED)
            self.transport.close()
            return
        self._arm_header_timer()

    def _awaiting_headers(self) -> bool:
        return (not self.transport.is_closing() and self.conn.their_state is h11.IDLE
                and (self.cycle is None or self.cycle.response_complete))

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for its headers; False if none."""
        idle = [c for c in self.connections if c is not self
                and isinstance(c, GuardedH11Protocol) and c._awaiting_headers()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._waiting_since)
        log.debug("connection cap %d reached: closing the longest-idle connection",
                  self.max_connections)
        victim.transport.close()
        victim._cancel_header_timer()
        return True

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_headers():
            log.debug("closing a connection that sent no complete request headers in %g s",
                      self.header_timeout_s)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers have arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers are due in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def uvicorn_config(app: Any, limits: Any, *, host: str, port: int, **kwargs: Any
                   ) -> uvicorn.Config:
    """uvicorn settings for `limits` (settings.Limits): the guarded h11 protocol, keep-alive,
    header size and concurrency limits, a backlog the connection cap accounts for."""
    cap = connection_cap(limits.max_connections)
    return uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(limits.header_timeout_s, cap),
        timeout_keep_alive=limits.keep_alive_s, limit_concurrency=cap + BACKLOG,
        h11_max_incomplete_event_size=limits.max_header_bytes, backlog=BACKLOG, **kwargs)
