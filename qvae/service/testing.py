"""A real service on a free loopback port, for tests (yours and ours).

>>> from qvae.service.testing import running_service
>>> with running_service({"keys": [{"name": "t", "key": "test-key-1"}]}) as url:
...     import httpx
...     httpx.get(url + "/healthz").json()["status"]
'ok'
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from qvae.service.app import create_app
from qvae.service.settings import ServiceConfig
from qvae.service.transport import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(config: ServiceConfig | dict[str, Any], *, startup_timeout_s: float = 30.0
                    ) -> Iterator[str]:
    """Start uvicorn with the app in a thread; yield its base URL; shut it down gracefully."""
    if isinstance(config, dict):
        config = ServiceConfig.model_validate(config)
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config.limits, host="127.0.0.1",
                                           port=free_port(), log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="qvae-test-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test service did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=config.shutdown_grace_s + 30)
