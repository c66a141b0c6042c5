"""`remote`: sample on a qvae sampler service (`qvae serve`) over HTTP.

The service runs the `target` backend (gibbs, neal, dwave, ...) where the hardware and the
credentials are. This client sends the RBM and polls jobs. It retries what is safe to retry:
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
import math
import os
import time
import uuid
from typing import Any

import orjson
import torch

from backends.base import Sampler, SampleSet, Timer, energies
from qvae.rbm import RBM

MODES = ("auto", "inline", "job")
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


def _positive(key: str, val: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if not ok or val < 0 or (val == 0 and not allow_zero):
        raise ValueError(f"{key} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {val!r}")
    return float(val)


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI 422: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                         if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


class RemoteSampler(Sampler):
    """Sampling on a qvae sampler service; see the module docstring."""

    name = "remote"
    binary = True  # continuous targets (langevin, mala) also return `.continuous` when asked
    conformance_options = {}  # checked through a live server in test_service

    def __init__(
        self,
        *,
        url: str | None = None,
        target: str = "gibbs",
        options: dict[str, Any] | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.5,
        poll_interval_s: float = 0.1,
        job_timeout_s: float = 3600.0,
        mode: str = "auto",
        return_continuous: bool = False,
    ) -> None:
        url = url if url is not None else os.environ.get("QVAE_SERVICE_URL") or None
        if url is None:
            raise ValueError("backend 'remote' needs the service's URL: pass url=... "
                             "(--set backend.url=http://HOST:8700) or set QVAE_SERVICE_URL")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not isinstance(target, str) or not target.isidentifier() or target == "remote":
            raise ValueError(f"target must be a backend name other than 'remote', got {target!r}")
        options = {} if options is None else options
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ValueError(f"options must be a dict with str keys, got {options!r}")
        try:
            json.dumps(options, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options must be plain JSON values, got {options!r}: {exc}") from None
        api_key = api_key if api_key is not None else os.environ.get("QVAE_API_KEY") or None
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            # a blank one may be quoted; a mistyped key (a YAML int, say) is still a secret
            raise ValueError("api_key must be a non-empty string or None, got "
                             + (repr(api_key) if isinstance(api_key, str)
                                else f"a {type(api_key).__name__}"))
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(return_continuous, bool):
            raise ValueError(f"return_continuous must be a bool, got {return_continuous!r}")
        self.url, self.target, self.options = url.rstrip("/"), target, options
        self.api_key = api_key
        self.timeout_s = _positive("timeout_s", timeout_s)
        self.connect_timeout_s = _positive("connect_timeout_s", connect_timeout_s)
        self.retry_backoff_s = _positive("retry_backoff_s", retry_backoff_s, allow_zero=True)
        self.poll_interval_s = _positive("poll_interval_s", poll_interval_s)
        self.job_timeout_s = _positive("job_timeout_s", job_timeout_s)
        self.max_retries, self.mode, self.return_continuous = max_retries, mode, return_continuous
        self._http: Any = None  # httpx.Client, created on first use
        self._retries = 0

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

    def _delay(self, attempt: int, response: Any = None) -> float:
        """Exponential backoff, or the server's Retry-After (seconds) when it sent one."""
        try:
            return min(max(float(response.headers["retry-after"]), 0.0), MAX_RETRY_AFTER_S)
        except (AttributeError, KeyError, ValueError):
            return min(self.retry_backoff_s * 2**attempt, MAX_BACKOFF_S)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One HTTP call with the retry policy; returns a non-retryable response (any status)."""
        import httpx

        attempt = 0
        while True:
            try:
                response = self._client().request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise RemoteError(self._transport_message(exc, attempt + 1)) from exc
                delay = self._delay(attempt)
            else:
                code = response.status_code
                queue_full = code == 429 and "retry-after" in response.headers
                if code not in RETRY_STATUS and not queue_full:
                    return response
                if attempt >= self.max_retries:
                    raise self._error(response, attempt + 1)
                delay = self._delay(attempt, response)
            attempt += 1
            self._retries += 1
            time.sleep(delay)

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
                return job["result"]
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
        self._retries = 0
        with timer("preprocess"):
            def rows(t: torch.Tensor) -> Any:  # orjson writes float64 arrays ~10× faster
                return t.detach().to("cpu", torch.float64).numpy()

            body: dict[str, Any] = {
                "backend": self.target, "num_samples": num_samples, "options": self.options,
                "rbm": {"weight": rows(rbm.effective_weight()),
                        "visible_bias": rows(rbm.visible_bias),
                        "hidden_bias": rows(rbm.hidden_bias)},
                "mode": self.mode}
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
            out = self._decode(rbm, num_samples, result)
        out.info.update(job_id=job_id, retries=self._retries)
        return out

    def _decode(self, rbm: RBM, num_samples: int, result: dict[str, Any]) -> SampleSet:
        dtype, device, nv = rbm.weight.dtype, rbm.weight.device, rbm.n_visible
        try:
            states = torch.tensor(result["samples"], dtype=dtype)
            variables = result.get("variables")
            if variables is not None and list(variables) != list(range(rbm.n_units)):
                states = states[:, [list(variables).index(i) for i in range(rbm.n_units)]]
            if tuple(states.shape) != (num_samples, rbm.n_units):
                raise ValueError(f"samples have shape {tuple(states.shape)}, expected "
                                 f"{(num_samples, rbm.n_units)}")
            if not torch.all((states == 0) | (states == 1)):
                raise ValueError("samples are not all 0/1")
            continuous = result.get("continuous")
            if continuous is not None:
                continuous = torch.tensor(continuous, dtype=dtype, device=device)
            info = dict(result.get("info") or {})
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RemoteError(f"malformed SampleResult from {self.url}: {exc}") from exc
        states = states.to(device)
        v, h = states[:, :nv], states[:, nv:]
        info["server_timing"] = info.pop("timing", None)
        info.update(backend=self.name, served_by=result.get("served_by"), url=self.url,
                    request_id=result.get("request_id"), target=self.target)
        return SampleSet(v, h, energies(rbm, v, h), info, continuous=continuous)
