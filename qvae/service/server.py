"""Run the service under uvicorn: `qvae serve --config configs/service.yaml [--host H --port P]`.

On SIGINT/SIGTERM uvicorn stops accepting connections and lets open requests finish (up to
`shutdown_grace_s`); then the app drains its queues: queued and running jobs get that long to
finish, and whatever is left is failed with a clear 503 so no client waits forever.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from qvae.service.app import create_app
from qvae.service.settings import ServiceConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(uvicorn.Server):
    """Starts draining the job queues the moment a stop signal arrives (so requests waiting on
    queued work are answered within the grace period, not cut off), and exits 0 after a clean
    stop: uvicorn itself would re-raise the signal and end "killed by SIGTERM"."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            threading.Thread(target=self.drain, name="qvae-drain", daemon=True).start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(config: ServiceConfig, *, host: str | None = None, port: int | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted. Blocks."""
    host = host or config.host
    port = config.port if port is None else port
    app = create_app(config)
    service = app.state.service
    if host not in LOOPBACK:
        print(f"qvae serve: listening on {host}, beyond this machine. API keys travel in clear "
              "text: put the service behind a TLS proxy (see the README) or a private network.",
              file=sys.stderr)
    print(f"qvae serve: http://{host}:{port}  ({len(service.keys)} API key(s); backends "
          f"{', '.join(config.served_backends())}; docs at /docs; Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    _Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
        timeout_graceful_shutdown=config.shutdown_grace_s + 5,
    ), drain=lambda: service.scheduler.drain(config.shutdown_grace_s)).run()
