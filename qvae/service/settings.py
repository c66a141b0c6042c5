"""Service configuration (`qvae serve --config configs/service.yaml`), validated like run configs.

API keys come from `keys:` in the file and from the `QVAE_API_KEYS` environment variable
(comma-separated); a key is never logged or shown in metrics, only its name.

>>> cfg = ServiceConfig.model_validate({"keys": [{"name": "ci", "key": "secret-key"}]})
>>> cfg.port, cfg.limits.cpu_workers
(8700, 2)
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from qvae.config import ConfigError, Strict, format_errors

ENV_KEYS = "QVAE_API_KEYS"
MIN_KEY_LENGTH = 8


class KeyConfig(Strict):
    key: str = Field(..., min_length=MIN_KEY_LENGTH,
                     description="the secret, sent as Authorization: Bearer KEY")
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
    max_result_values: int = Field(10**8, ge=1,
                                   description="num_samples × variables limit (413)")
    max_couplings: int = Field(
        2**18, ge=1, description="couplings a `bm` or `bqm` problem lists (413): building one "
        "(its graph colouring) costs ~10 µs a coupling at admission; QPU graphs have ~4·10^4")
    # Work limits: each backend's work model (`Sampler.work`) prices a request before it is
    # queued; a request over any of these gets 413 naming the option, its value and the limit.
    max_work: float = Field(
        2e12, ge=1, description="CPU work of one request in update-equivalents (chains × sweeps "
        "× (units + couplings), burn-in included, weighted per backend; ~10^10 per second on "
        "one core), 413")
    max_state_bytes: int = Field(2 * 2**30, ge=2**20, description="memory of one request's "
                                 "chains, buffers and samples (413)")
    max_enumerated_states: int = Field(2**22, ge=2, description="states the exact backend may "
                                       "enumerate for one request (413)")
    max_request_qpu_s: float = Field(30.0, gt=0, description="estimated QPU access time of one "
                                     "request, calibration included (413)")
    max_job_seconds: float = Field(
        600.0, gt=0, description="wall-time limit of one job: a job still running after it is "
        "stopped (between sweeps or steps) and answered 413; declared waits such as "
        "embedding_timeout must fit under it")
    # Transport: the server's own defences against slow or idle clients.
    max_connections: int = Field(
        1000, ge=8, description="open connections at most (capped below the open-file limit); "
        "beyond it the oldest connection that has not sent a full request is dropped")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send complete "
                                    "request headers within this, or it is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within "
                                  "this after its headers, or the request gets 408")
    keep_alive_s: int = Field(5, ge=1, le=300, description="idle keep-alive connections are "
                              "closed after this")
    max_header_bytes: int = Field(16384, ge=1024, le=2**20, description="request line + "
                                  "headers at most (h11's max_incomplete_event_size)")
    log_burst: int = Field(20, ge=1, description="log lines of one kind per log_interval_s; "
                           "repeats beyond are counted, not written")
    log_interval_s: float = Field(60.0, gt=0, description="window of log_burst")
    inline_max_work: int = Field(2 * 10**6, ge=0,
                                 description="mode=auto: above this, a job id is returned")
    cpu_workers: int = Field(2, ge=1, le=256, description="CPU backends run this many at once")
    cpu_queue: int = Field(64, ge=0, description="CPU requests waiting beyond the workers (429)")
    qpu_queue: int = Field(16, ge=0, description="QPU requests waiting beyond the one running")
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per sampling call")
    max_stored_result_bytes: int = Field(
        2**30, ge=2**20, le=2**40, description="job results stored and not yet fetched, plus "
        "those of admitted jobs (estimated), stay under this; beyond it a new job gets 429")


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
    dimod_samplers: list[str] = Field(
        default_factory=list, description="import paths of the dimod samplers the `dimod` "
        "backend may wrap (e.g. dwave.samplers.SimulatedAnnealingSampler); empty: `dimod` is "
        "not served, since its `sampler` option names code to import")
    limits: Limits = Field(default_factory=Limits)
    job_ttl_s: float = Field(3600, gt=0, description="unfetched results are dropped after this")
    state_db: Path | None = Field(
        None, description="SQLite file of the QPU ledger, reservations and job index: it survives "
        "restarts, and processes sharing it share one budget (unset: kept in memory)")
    jobs_dir: Path | None = Field(None, description="replaced by state_db (refused if set)")
    ledger_path: Path | None = Field(
        None, description="an old JSON QPU ledger to import into state_db once (then renamed "
        "*.imported)")
    shutdown_grace_s: float = Field(30, ge=0, description="on shutdown, wait this long for work")

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, policies: dict[str, BackendPolicy]) -> dict[str, BackendPolicy]:
        """Each policy's options checked by its backend's `Options` model (names and values)."""
        from backends.options import OptionError
        from backends.registry import option_names, parse_options, servable

        for name, policy in policies.items():
            if name not in servable():
                raise ValueError(f"unknown backend {name!r}; choose from {servable()}")
            bad = sorted(set(policy.locked) - set(option_names(name)))
            if bad:
                raise ValueError(f"backends.{name}.locked: unknown option(s) {bad}; valid: "
                                 f"{option_names(name)}")
            try:
                parse_options(name, policy.options)
            except OptionError as exc:
                field = f"backends.{name}.options" + (f".{exc.option}" if exc.option else "")
                raise PydanticCustomError("backend_option", "{message}",
                                          {"message": str(exc), "field": field}) from None
        return policies

    @field_validator("jobs_dir")
    @classmethod
    def _no_jobs_dir(cls, value: Path | None) -> Path | None:
        if value is not None:
            raise ValueError(f"jobs_dir is replaced by state_db (one SQLite file for the QPU "
                             f"ledger and the job index): remove jobs_dir and set state_db: FILE; "
                             f"results left in {value} are not carried over (fetch them with the "
                             "previous qvae first, or delete the directory)")
        return value

    @model_validator(mode="after")
    def _ledger_needs_state_db(self) -> ServiceConfig:
        if self.ledger_path is not None and self.state_db is None:
            raise ValueError(f"ledger_path ({self.ledger_path}) is only read to import an old "
                             "JSON ledger into state_db: set state_db: FILE as well")
        return self

    @model_validator(mode="after")
    def _unique_keys(self) -> ServiceConfig:
        labels = [k.label() for k in self.keys]
        if len(set(labels)) != len(labels) or len({k.key for k in self.keys}) != len(self.keys):
            raise ValueError("keys: names and keys must be unique")
        return self

    def policy(self, backend: str) -> BackendPolicy:
        return self.backends.get(backend, BackendPolicy())

    def served_backends(self) -> list[str]:
        from backends.registry import servable

        return [n for n in servable() if self.policy(n).enabled
                and (n != "dimod" or self.dimod_samplers)]

    def all_keys(self) -> list[KeyConfig]:
        """Keys from the file plus those in $QVAE_API_KEYS (all backends, default budget)."""
        keys = list(self.keys)
        known = {k.key for k in keys}
        for number, raw in enumerate(os.environ.get(ENV_KEYS, "").split(","), 1):
            raw = raw.strip()
            # checked here, not by KeyConfig: pydantic's error would quote the secret back
            if raw and len(raw) < MIN_KEY_LENGTH:
                raise ValueError(f"${ENV_KEYS}: entry {number} is {len(raw)} characters long; a "
                                 f"key needs at least {MIN_KEY_LENGTH} (make one with `openssl "
                                 "rand -hex 16`)")
            if raw and raw not in known:
                known.add(raw)
                keys.append(KeyConfig(key=raw, qpu_budget_s=self.default_qpu_budget_s))
        return keys


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and `localhost`."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # any other host name may resolve beyond this machine
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_bind(config: ServiceConfig, host: str, source: str) -> None:
    """Refuse to serve without keys on an address other machines can reach. `source` says where
    `host` came from (`--host` or the config's `host:`), so the message names what to change."""
    if not config.require_auth and not is_loopback(host):
        raise ValueError(f"require_auth: false is only allowed on a loopback address (127.0.0.1, "
                         f"::1, localhost), not {source} {host}: bind to 127.0.0.1, or remove "
                         f"require_auth: false and give keys (keys: or ${ENV_KEYS})")


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
