"""API keys and the per-key QPU-time ledger (persisted atomically when a path is given)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from qvae.atomic import write_bytes_atomic
from qvae.service.settings import KeyConfig


class Keys:
    """Look keys up by secret; `None` means no such key."""

    def __init__(self, keys: list[KeyConfig]):
        self.by_secret = {k.key: k for k in keys}

    def __len__(self) -> int:
        return len(self.by_secret)

    def get(self, secret: str) -> KeyConfig | None:
        return self.by_secret.get(secret)


class Ledger:
    """QPU seconds spent per key name; survives restarts when `path` is set."""

    def __init__(self, path: Path | None = None):
        self.path, self.lock = path, threading.Lock()
        self.spent: dict[str, float] = {}
        if path is not None and path.is_file():
            self.spent = {k: float(v) for k, v in json.loads(path.read_text()).items()}

    def used(self, name: str) -> float:
        with self.lock:
            return self.spent.get(name, 0.0)

    def charge(self, name: str, seconds: float) -> None:
        if seconds <= 0:
            return
        with self.lock:
            self.spent[name] = self.spent.get(name, 0.0) + seconds
            if self.path is not None:
                write_bytes_atomic(self.path, json.dumps(self.spent, indent=1,
                                                         sort_keys=True).encode())
