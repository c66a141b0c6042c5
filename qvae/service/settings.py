"""Service configuration (`qvae serve --config configs/service.yaml`), validated like run configs.

API keys come from `keys:` in the file and from the `QVAE_API_KEYS` environment variable
(comma-separated); a key is never logged or shown in metrics, only its name.

>>> cfg = ServiceConfig.model_validate({"keys": [{"name": "ci", "key": "secret"}]})
>>> cfg.port, cfg.limits.cpu_workers
(8700, 2)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from qvae.config import ConfigError, Strict, format_errors

ENV_KEYS = "QVAE_API_KEYS"
QPU_BACKENDS = ("dwave",)  # backends that share the one QPU: served one request at a time


class KeyConfig(Strict):
    key: str = Field(..., min_length=8, description="the secret, sent as Authorization: Bearer KEY")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="who holds it (metrics and logs show this, never the key)")
    backends: list[str] = Field(["*"], description="backends this key may use; '*' = all")
    qpu_budget_s: float | None = Field(None, ge=0, description="QPU seconds this key may spend")

    def label(self) -> str:
        return self.name or "key-" + hashlib.sha256(self.key.encode()).hexdigest()[:8]

    def may_use(self, backend: str) -> bool:
        return "*" in self.backends or backend in self.backends


class BackendPolicy(Strict):
    enabled: bool = Field(True, description="serve this backend")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="server-side defaults under the client's options")
    locked: list[str] = Field(default_factory=list,
                              description="options clients may not set (403), e.g. solver")


class Limits(Strict):
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="request body size limit (413)")
    max_num_samples: int = Field(100_000, ge=1, description="num_samples limit (413)")
    max_variables: int = Field(8192, ge=2, description="problem variables limit (413)")
    max_work: int = Field(10**8, ge=1, description="num_samples × variables limit (413)")
    inline_max_work: int = Field(2 * 10**6, ge=0,
                                 description="mode=auto: above this, a job id is returned")
    cpu_workers: int = Field(2, ge=1, le=256, description="CPU backends run this many at once")
    cpu_queue: int = Field(64, ge=0, description="CPU requests waiting beyond the workers (429)")
    qpu_queue: int = Field(16, ge=0, description="QPU requests waiting beyond the one running")
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per sampling call")


class ServiceConfig(Strict):
    """Everything `qvae serve` needs; see `qvae serve --help` and the README."""

    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8700, ge=0, le=65535, description="TCP port (0: any free port)")
    keys: list[KeyConfig] = Field(default_factory=list, description="API keys")
    default_qpu_budget_s: float | None = Field(
        None, ge=0, description=f"QPU budget of keys from ${ENV_KEYS}")
    require_auth: bool = Field(True, description="refuse requests without a valid key")
    metrics_public: bool = Field(True, description="/metrics without a key (for Prometheus)")
    backends: dict[str, BackendPolicy] = Field(
        default_factory=dict, description="per-backend policy; unlisted backends use defaults")
    limits: Limits = Field(default_factory=Limits)
    job_ttl_s: float = Field(3600, gt=0, description="unfetched results are dropped after this")
    jobs_dir: Path | None = Field(None, description="persist job results here (survive restarts)")
    ledger_path: Path | None = Field(None, description="persist QPU seconds per key here")
    shutdown_grace_s: float = Field(30, ge=0, description="on shutdown, wait this long for work")

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, policies: dict[str, BackendPolicy]) -> dict[str, BackendPolicy]:
        from backends.registry import option_names, registered

        for name, policy in policies.items():
            if name not in registered() or name == "remote":
                raise ValueError(f"unknown backend {name!r}; choose from "
                                 f"{[n for n in registered() if n != 'remote']}")
            bad = sorted((set(policy.options) | set(policy.locked)) - set(option_names(name)))
            if bad:
                raise ValueError(f"backends.{name}: unknown option(s) {bad}; valid: "
                                 f"{option_names(name)}")
        return policies

    @model_validator(mode="after")
    def _unique_keys(self) -> ServiceConfig:
        labels = [k.label() for k in self.keys]
        if len(set(labels)) != len(labels) or len({k.key for k in self.keys}) != len(self.keys):
            raise ValueError("keys: names and keys must be unique")
        return self

    def policy(self, backend: str) -> BackendPolicy:
        return self.backends.get(backend, BackendPolicy())

    def served_backends(self) -> list[str]:
        from backends.registry import registered

        return [n for n in registered() if n != "remote" and self.policy(n).enabled]

    def all_keys(self) -> list[KeyConfig]:
        """Keys from the file plus those in $QVAE_API_KEYS (all backends, default budget)."""
        keys = list(self.keys)
        known = {k.key for k in keys}
        for raw in os.environ.get(ENV_KEYS, "").split(","):
            raw = raw.strip()
            if raw and raw not in known:
                known.add(raw)
                keys.append(KeyConfig(key=raw, qpu_budget_s=self.default_qpu_budget_s))
        return keys


def load_service_config(path: str | Path | None = None, overrides: list[str] | None = None,
                        ) -> ServiceConfig:
    """Read YAML (defaults when path is None), apply `key=value` overrides, validate."""
    from qvae.config import apply_overrides, read_yaml

    raw = read_yaml(path, "service config")
    try:
        return ServiceConfig.model_validate(apply_overrides(raw, list(overrides or [])))
    except ValidationError as err:
        raise ConfigError(format_errors(err).replace("invalid config", "invalid service config"))\
            from None
