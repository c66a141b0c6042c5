"""Run the service under uvicorn: `qvae serve --config configs/service.yaml [--host H --port P]`.

On SIGINT/SIGTERM uvicorn stops accepting connections and lets open requests finish (up to
`shutdown_grace_s`); then the app drains its queues: queued and running jobs get that long to
finish, and whatever is left is failed with a clear 503 so no client waits forever. Running
jobs are told to stop at their next cancellation check; one stuck in a long native call cannot
be, so the process then exits without waiting for its thread (`os._exit`): SIGTERM always ends
the process about `shutdown_grace_s` after it arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from qvae.service import logs
from qvae.service.app import create_app
from qvae.service.settings import ServiceConfig, check_bind, is_loopback
from qvae.service.transport import raise_open_file_limit, uvicorn_config

#: After a stop signal, a process still alive this long past shutdown_grace_s is ended hard.
WATCHDOG_MARGIN_S = 30.0


class _Server(uvicorn.Server):
    """Starts draining the job queues the moment a stop signal arrives (so requests waiting on
    queued work are answered within the grace period, not cut off), and exits 0 after a clean
    stop: uvicorn itself would re-raise the signal and end "killed by SIGTERM"."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None], grace_s: float):
        super().__init__(config)
        self.drain, self.grace_s = drain, grace_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            threading.Thread(target=self.drain, name="qvae-drain", daemon=True).start()
            watchdog = threading.Timer(self.grace_s + WATCHDOG_MARGIN_S, _hard_exit,
                                       ("the shutdown did not finish in time", 1))
            watchdog.daemon = True
            watchdog.start()
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
    check_bind(config, host or config.host, "--host" if host else "host:")
    host = host or config.host
    port = config.port if port is None else port
    app = create_app(config)
    service = app.state.service
    if not is_loopback(host):
        print(f"qvae serve: listening on {host}, beyond this machine. API keys travel in clear "
              "text: put the service behind a TLS proxy (see the README) or a private network.",
              file=sys.stderr)
    print(f"qvae serve: http://{host}:{port}  ({len(service.keys)} API key(s); backends "
          f"{', '.join(config.served_backends())}; docs at /docs; Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    raise_open_file_limit()
    lim = config.limits
    uv_config = uvicorn_config(
        app, lim, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
        timeout_graceful_shutdown=config.shutdown_grace_s + 5)
    logs.install(lim.log_burst, lim.log_interval_s)  # after uvicorn configured its loggers
    _Server(uv_config,
            drain=lambda: service.scheduler.drain(config.shutdown_grace_s),
            grace_s=config.shutdown_grace_s).run()
    stuck = service.scheduler.stuck_workers()
    if stuck:  # the interpreter would join their threads at exit, i.e. wait for the work
        _hard_exit(f"{stuck} job(s) still running after shutdown_grace_s="
                   f"{config.shutdown_grace_s:g} s were failed (503) and abandoned", 0)


def _hard_exit(why: str, code: int) -> None:
    """Leave now, without joining worker threads (flushing what was logged first)."""
    print(f"qvae serve: {why}; exiting", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(code)
