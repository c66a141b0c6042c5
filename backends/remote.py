"""`remote`: sample on a qvae sampler service (`qvae serve`) over HTTP.

The service runs the `target` backend (gibbs, neal, dwave, ...) where the hardware and the
credentials are. This client sends the model (an RBM, or a BoltzmannMachine on any graph) and
the clamp, if any, and polls jobs. It retries what is safe to retry:
connection errors, timeouts, a full queue (429 with Retry-After) and 502/503/504. Every attempt
of one `sample()` call carries the same Idempotency-Key, so a retried POST never runs (or bills
the QPU) twice. Energies are recomputed locally. Example, with `qvae serve` running::

    import backends, qvae
    sampler = backends.get_sampler("remote", url="http://127.0.0.1:8700", target="neal",
                                   options={"num_sweeps": 500}, max_retries=5)
    out = sampler.sample(qvae.RBM(6, 4, seed=0), num_samples=100, seed=1)
    print(out.info["served_by"], out.info["server_timing"]["sample_s"], out.info["retries"])

In a config: `--set backend.name=remote --set backend.target=dwave --set backend.url=URL` (or set
QVAE_SERVICE_URL), with client settings under `backend.remote` (timeout_s, max_retries, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import orjson
import torch
from pydantic import SecretStr, field_validator

from backends.base import BackendOptions, Sampler, SampleSet, Timer, energies
from backends.options import Capabilities, Field
from backends.retry import RetryableResult, call_with_retries
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM

RETRY_STATUS = (502, 503, 504)
SEED_LIMIT = 2**63  # the service takes seeds below 2**63; larger ones are reduced modulo it
MAX_BACKOFF_S, MAX_RETRY_AFTER_S, MAX_POLL_S = 10.0, 30.0, 2.0
START_HINT = (
    "Start it with `qvae serve --config configs/service.yaml`, or point to it with "
    "--set backend.url=URL"
)


class RemoteError(RuntimeError):
    """The service could not be reached or refused the request. `status_code` is the HTTP status
    (None when no response came back); `detail` is the server's `detail`, verbatim."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status_code, self.detail = status_code, detail


#: Options read from the environment when not given (a config or a call may leave them out).
ENV = {"url": "QVAE_SERVICE_URL", "api_key": "QVAE_API_KEY"}


class RemoteOptions(BackendOptions):
    url: str | None = Field(None, description="base URL of the qvae service, http(s)://HOST:PORT "
                            "(None: $QVAE_SERVICE_URL)")
    target: str = Field("gibbs", description="the backend the service samples with (any "
                        "backend a service serves, e.g. dwave); its options go in `options`")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the target's options, checked here by the target's "
        "own options (plain JSON values) and sent to the service")
    api_key: SecretStr | None = Field(
        None, json_schema_extra={"secret": True}, description="API key sent as a Bearer token "
        "(None: $QVAE_API_KEY; prefer the variable: a config is saved with every run)")
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one HTTP "
                             "answer; raise it, or use mode=job, for long inline runs")
    connect_timeout_s: float = Field(5.0, gt=0,
                                     description="seconds to wait for a connection")
    max_retries: int = Field(3, ge=0, description="retries of a call that failed in "
                             "transit or got 429 (queue full) / 502 / 503 / 504; 0: none")
    retry_backoff_s: float = Field(0.5, ge=0, description="first wait between retries "
                                   "(doubling, at most 10 s; a Retry-After header wins)")
    poll_interval_s: float = Field(0.1, gt=0, description="first wait between polls "
                                   "of a job (growing 1.5× up to 2 s)")
    job_timeout_s: float = Field(3600.0, gt=0, description="give up on a job "
                                 "that has not finished after this many seconds")
    mode: Literal["auto", "inline", "job"] = Field(
        "auto", description="inline: answer in the reply; job: poll a job id; auto: the "
        "service decides by the request's size")
    return_continuous: bool = Field(False, description="also return the continuous state of "
                                    "continuous targets (langevin, mala)")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url

    @field_validator("target")
    @classmethod
    def _servable(cls, target: str) -> str:
        from backends.registry import servable

        if target not in servable():
            raise ValueError(f"must be a backend a qvae service serves, one of {servable()}")
        return target

    @field_validator("options")
    @classmethod
    def _json(cls, options: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(options, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON values ({exc})") from None
        return options

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("must be a non-empty string or None")
        return key


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI 422: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                         if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


class RemoteSampler(Sampler):
    """Sampling on a qvae sampler service; see the module docstring."""

    name = "remote"
    Options = RemoteOptions
    #: binary: continuous targets (langevin, mala) also return `.continuous` when asked.
    capabilities = Capabilities(resource="network", output="binary", servable=False,
                                any_graph=True)
    conformance_options = {}  # checked through a live server in test_service

    def __init__(self, **options: Any) -> None:
        env = {k: os.environ[v] for k, v in ENV.items()
               if options.get(k) is None and os.environ.get(v)}
        super().__init__(**{**options, **env})
        o = self.options
        if o.url is None:
            raise ValueError("backend 'remote' needs the service's URL: pass url=... "
                             "(--set backend.url=http://HOST:8700) or set QVAE_SERVICE_URL")
        self.url, self.target, self.target_options = o.url.rstrip("/"), o.target, o.options
        self.api_key = o.api_key.get_secret_value() if o.api_key is not None else None
        self.timeout_s, self.connect_timeout_s = o.timeout_s, o.connect_timeout_s
        self.max_retries, self.retry_backoff_s = o.max_retries, o.retry_backoff_s
        self.poll_interval_s, self.job_timeout_s = o.poll_interval_s, o.job_timeout_s
        self.mode, self.return_continuous = o.mode, o.return_continuous
        self._http: Any = None  # httpx.Client, created on first use
        self._retries = 0

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | BackendOptions) -> BackendOptions:
        """The client's options checked by `RemoteOptions`, and the target's options by the
        target's own model (an `OptionError` naming that backend and option)."""
        from backends import registry

        o = super().parse_options(options)
        registry.parse_options(o.target, o.options)
        return o

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:  # never contacts the network: `qvae backends` calls this
            import httpx  # noqa: F401
        except ImportError as exc:
            return False, f"needs httpx ({exc}): pip install httpx"
        return True, ""

    # ------------------------------------------------------------------------ HTTP
    def _client(self) -> Any:
        if self._http is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
            self._http = httpx.Client(timeout=timeout, headers=headers)
        return self._http

    def close(self) -> None:
        """Close the HTTP connection pool (a later `sample()` opens a new one)."""
        http, self._http = getattr(self, "_http", None), None
        if http is not None:
            http.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to do
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_http": None}

    @staticmethod
    def _retry_after(exc: Exception) -> float | None:
        """The server's Retry-After (seconds) of a retryable response, when it sent one."""
        try:
            response = exc.value  # type: ignore[attr-defined]  # a RetryableResult
            return min(max(float(response.headers["retry-after"]), 0.0), MAX_RETRY_AFTER_S)
        except (AttributeError, KeyError, ValueError):
            return None  # exponential backoff

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One HTTP call with the retry policy; returns a non-retryable response (any status)."""
        import httpx

        def attempt() -> Any:
            response = self._client().request(method, self.url + path, **kwargs)
            code = response.status_code
            if code in RETRY_STATUS or (code == 429 and "retry-after" in response.headers):
                raise RetryableResult(response)
            return response

        def count(_: Exception) -> None:
            self._retries += 1

        try:
            return call_with_retries(
                attempt, max_retries=self.max_retries, backoff_s=self.retry_backoff_s,
                max_backoff_s=MAX_BACKOFF_S, delay_hint=self._retry_after, on_retry=count,
                retryable=lambda e: isinstance(e, (httpx.TransportError, RetryableResult)))
        except httpx.TransportError as exc:
            raise RemoteError(self._transport_message(exc, self.max_retries + 1)) from exc
        except RetryableResult as exc:
            raise self._error(exc.value, self.max_retries + 1) from None

    def _transport_message(self, exc: Exception, attempts: int) -> str:
        import httpx

        what = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return (f"the qvae service at {self.url} did not answer within timeout_s="
                    f"{self.timeout_s} s after {attempts} attempts ({what}); raise "
                    "backend.remote.timeout_s, or use backend.remote.mode=job for long runs")
        return (f"cannot reach the qvae service at {self.url} after {attempts} attempts "
                f"({what}); is `qvae serve` running there? {START_HINT}")

    def _error(self, response: Any, attempts: int = 1) -> RemoteError:
        code = response.status_code
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text[:500]
        said = _detail_text(detail)
        where = f"{response.request.method} {response.request.url}"
        if code == 401:
            key = "the key sent" if self.api_key else "no key was sent"
            msg = (f"the service rejected the API key (401; {key}): set QVAE_API_KEY or "
                   f"backend.remote.api_key to a key the service accepts. Server: {said}")
        elif code in (403, 413, 422):
            msg = f"the service refused the request ({code}, {where}): {said}"
        elif code == 429:
            msg = (f"the service refused the request (429) after {attempts} attempt(s): {said}"
                   + ("; try later or raise backend.remote.max_retries"
                      if "retry-after" in response.headers else ""))
        elif code in RETRY_STATUS:
            msg = (f"the qvae service at {self.url} is unavailable ({code}) after {attempts} "
                   f"attempts: {said}; try later or raise backend.remote.max_retries")
        elif code == 404 and response.request.url.path.endswith("/v1/sample"):
            msg = (f"{where} not found (404): is backend.url ({self.url}) the base URL of a "
                   f"qvae service? {START_HINT}")
        else:
            msg = f"unexpected response {code} from {where}: {said}"
        return RemoteError(msg, status_code=code, detail=detail)

    def _wait_for_job(self, job_id: str) -> dict[str, Any]:
        deadline, interval = time.monotonic() + self.job_timeout_s, self.poll_interval_s
        while True:
            response = self._request("GET", f"/v1/jobs/{job_id}")
            if response.status_code != 200:
                raise self._error(response)
            job = response.json()
            if job.get("status") == "done":
                result = job.get("result")
                if not isinstance(result, dict):
                    # a service before the status-first poll could lose a result this way
                    raise RemoteError(
                        f"job {job_id} on {self.url} is reported done without its result "
                        f"(got {type(result).__name__}); sample again, and update the service "
                        f"if this repeats")
                return result
            if job.get("status") == "failed":
                err = job.get("error") or {}
                raise RemoteError(
                    f"job {job_id} failed on the service ({err.get('status_code')}): "
                    f"{_detail_text(err.get('detail'))}",
                    status_code=err.get("status_code"), detail=err.get("detail"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"job {job_id} on {self.url} did not finish within "
                                  f"job_timeout_s={self.job_timeout_s} s (status "
                                  f"{job.get('status')!r}); raise backend.remote.job_timeout_s")
            time.sleep(min(interval, left))
            interval = min(interval * 1.5, max(MAX_POLL_S, self.poll_interval_s))

    def ping(self) -> dict[str, Any]:
        """GET /healthz once (no retries): the service's health dict; RemoteError if down."""
        import httpx

        try:
            response = self._client().get(self.url + "/healthz")
        except httpx.TransportError as exc:
            raise RemoteError(self._transport_message(exc, 1)) from exc
        if response.status_code not in (200, 503):
            raise self._error(response)
        return response.json()

    # ---------------------------------------------------------------------- sample
    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        return self._remote(rbm, num_samples, None, seed=seed, timer=timer)

    def _sample_bm(self, bm: BoltzmannMachine, num_samples: int, *, seed: int | None,
                   timer: Timer) -> SampleSet:
        """The whole BoltzmannMachine goes to the service as a `bm` payload, whatever its graph:
        the server's `target` decides how to sample it (block Gibbs, the QPU natively, ...) or
        refuses it (a RemoteError with the server's 422). Not the base's local reduction to an
        RBM, which would hide the graph (and a QPU-native model's qubit labels) from the
        server."""
        return self._remote(bm, num_samples, None, seed=seed, timer=timer)

    def _sample_clamped(self, model: RBM | BoltzmannMachine, num_samples: int,
                        clamp: dict[int, int], *, seed: int | None,
                        timer: Timer) -> SampleSet:
        """The full model and the clamp go to the service, which conditions and samples (the
        base's default would fold the clamp in here and send the reduced model): one request,
        the server's own conditional sampler, and samples and energies under the full model
        whose clamped units are checked to hold their values."""
        return self._remote(model, num_samples, clamp, seed=seed, timer=timer)

    @staticmethod
    def _bm_payload(bm: BoltzmannMachine) -> dict[str, Any]:
        """A `bm` payload: unit-index edges, its own colour classes as `parts` (so the server's
        block Gibbs visits the same classes in the same order), and its labels when JSON can
        carry them exactly (ints, strings: a QPU-native model's qubits), else none."""
        def rows(t: torch.Tensor) -> Any:
            return t.detach().to("cpu", torch.float64).numpy()

        payload: dict[str, Any] = {
            "bias": rows(bm.bias), "coupling": rows(bm.coupling),
            "edges": bm.edges.cpu().numpy().astype(np.int64),
            "parts": [c.cpu().numpy().astype(np.int64) for c in bm.colour_classes]}
        labels = [int(v) if isinstance(v, (int, np.integer)) else v for v in bm.variables]
        if all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
               for v in labels):
            payload["variables"] = labels
        return payload

    def _remote(self, model: RBM | BoltzmannMachine, num_samples: int,
                clamp: dict[int, int] | None, *, seed: int | None, timer: Timer) -> SampleSet:
        self._retries = 0
        with timer("preprocess"):
            def rows(t: torch.Tensor) -> Any:  # orjson writes float64 arrays ~10× faster
                return t.detach().to("cpu", torch.float64).numpy()

            body: dict[str, Any] = {
                "backend": self.target, "num_samples": num_samples,
                "options": self.target_options, "mode": self.mode}
            if isinstance(model, RBM):
                body["rbm"] = {"weight": rows(model.effective_weight()),
                               "visible_bias": rows(model.visible_bias),
                               "hidden_bias": rows(model.hidden_bias)}
            else:
                body["bm"] = self._bm_payload(model)
            if clamp:
                body["clamp"] = {str(k): int(v) for k, v in clamp.items()}
            if seed is not None:
                body["seed"] = seed % SEED_LIMIT
            if self.return_continuous:
                body["return_continuous"] = True
            content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
            headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        with timer("sample"):
            response = self._request("POST", "/v1/sample", content=content, headers=headers)
            if response.status_code == 202:
                try:
                    job_id = str(response.json()["job_id"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise RemoteError(f"malformed 202 reply from {self.url}: {exc!r}") from exc
                result = self._wait_for_job(job_id)
            elif response.status_code == 200:
                job_id, result = None, orjson.loads(response.content)
            else:
                raise self._error(response)
        with timer("postprocess"):
            out = self._decode(model, num_samples, result, clamp)
        out.info.update(job_id=job_id, retries=self._retries)
        return out

    def _decode(self, model: RBM | BoltzmannMachine, num_samples: int, result: dict[str, Any],
                clamp: dict[int, int] | None = None) -> SampleSet:
        layered = isinstance(model, RBM)
        param = model.weight if layered else model.bias
        dtype, device, n = param.dtype, param.device, model.n_units
        try:
            states = torch.tensor(result["samples"], dtype=dtype)
            variables = result.get("variables")
            if layered and variables is not None and list(variables) != list(range(n)):
                states = states[:, [list(variables).index(i) for i in range(n)]]
            if tuple(states.shape) != (num_samples, n):
                raise ValueError(f"samples have shape {tuple(states.shape)}, expected "
                                 f"{(num_samples, n)}")
            if not torch.all((states == 0) | (states == 1)):
                raise ValueError("samples are not all 0/1")
            for unit, value in (clamp or {}).items():
                if not bool(torch.all(states[:, unit] == value)):
                    raise ValueError(f"clamped unit {unit} does not hold its value {value}")
            continuous = result.get("continuous")
            if continuous is not None:
                continuous = torch.tensor(continuous, dtype=dtype, device=device)
            info = dict(result.get("info") or {})
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RemoteError(f"malformed SampleResult from {self.url}: {exc}") from exc
        states = states.to(device)
        info["server_timing"] = info.pop("timing", None)
        info.update(backend=self.name, served_by=result.get("served_by"), url=self.url,
                    request_id=result.get("request_id"), target=self.target)
        if not layered:  # columns in unit order, as sent; energies under the full model
            return SampleSet.of_states(states, model.sample_energy(states), info, continuous)
        v, h = states[:, :model.n_visible], states[:, model.n_visible:]
        return SampleSet(v, h, energies(model, v, h), info, continuous=continuous)
