"""ASGI middleware: the request-body size limit (413), its read timeout (408), per-request metrics.

Pure ASGI (no BaseHTTPMiddleware) so it adds microseconds, not a task per request. The body limit
is enforced on the declared Content-Length *and* on the bytes actually received, so a chunked
upload cannot slip past it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.exceptions import HTTPException

from qvae.service.metrics import Metrics

KNOWN = ("/v1/sample", "/v1/backends", "/healthz", "/metrics", "/openapi.json", "/docs")


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI answers it as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over this service's limit of {limit} bytes; send "
                         "fewer samples or a smaller problem")


class BodyTimeout(HTTPException):
    """The body did not arrive in time (a slow or stalled upload holding a connection)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s of its "
                         "headers; send it at once", headers={"Connection": "close"})


def endpoint_of(path: str) -> str:
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{job_id}"
    return path if path in KNOWN else "other"


class Guard:
    def __init__(self, app: Any, max_body_bytes: int, metrics: Metrics,
                 body_timeout_s: float | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.body_timeout_s = body_timeout_s

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": BodyTooLarge(self.max_body_bytes).detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        started = [False]
        scope.setdefault("state", {})

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and \
                    int(declared) > self.max_body_bytes:
                status[0] = 413
                await self._reject(send)
                return
            received, complete = [0], [False]
            timeout = self.body_timeout_s
            deadline = None if timeout is None else time.monotonic() + timeout

            async def receive_limited() -> dict:
                if complete[0] or deadline is None:
                    message = await receive()  # after the body: waits for a disconnect
                else:
                    try:
                        message = await asyncio.wait_for(
                            receive(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        raise BodyTimeout(timeout) from None
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_body_bytes:
                        raise BodyTooLarge(self.max_body_bytes)
                    complete[0] = not message.get("more_body", False)
                return message

            try:
                await self.app(scope, receive_limited, send_tracked)
            except BodyTooLarge:
                if started[0]:
                    raise
                status[0] = 413
                await self._reject(send)
        finally:
            endpoint = endpoint_of(scope["path"])
            # the body's backend name is the client's: only a name the server knows is a label
            backend = self.metrics.backend_label(str(scope["state"].get("backend", "")))
            self.metrics.requests.labels(endpoint, backend, str(status[0])).inc()
            self.metrics.latency.labels(endpoint, backend).observe(time.perf_counter() - start)
