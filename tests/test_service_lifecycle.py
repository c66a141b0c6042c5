"""The service as a process: graceful shutdown with work in flight, results across a restart;
and a bounded schemathesis fuzz of its OpenAPI schema against a live server."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from backends.testing import random_rbm
from qvae.service.testing import free_port, running_service

KEY = "lifecycle-key-0001"
HEADERS = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]


def slow_body(seed: int, mode: str) -> dict:
    rbm = random_rbm(30, 30, seed=seed)
    return {"backend": "gibbs", "num_samples": 1000, "seed": seed, "mode": mode,
            "options": {"num_sweeps": 2000, "burn_in": 2000},  # ~1 s each
            "rbm": {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                    "hidden_bias": rbm.hidden_bias.tolist()}}


def start(config_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qvae", "serve", "--config", str(config_path),
                             "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QVAE_API_KEYS": KEY})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"service did not start: {proc.stderr.read()}")


def wait_for_load(url: str, outstanding: int) -> None:
    deadline = time.monotonic() + 120
    while sum(httpx.get(f"{url}/healthz").json()[k] for k in ("queued", "running")) \
            != outstanding:
        assert time.monotonic() < deadline, "the service never reached the expected load"
        time.sleep(0.01)


@pytest.mark.parametrize("grace", [0.0, 60.0])
def test_shutdown_with_jobs_in_flight_loses_nothing(tmp_path, grace):
    """SIGTERM with 2 inline requests and 2 jobs in flight on one worker, 2 jobs already done.

    With a grace period long enough, everything in flight finishes; with none, it is failed
    cleanly (inline callers get a 503 naming what happened). Either way the process exits 0,
    and after a restart every job is fetchable exactly once from the state database."""
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({
        "state_db": str(tmp_path / "state.sqlite"), "shutdown_grace_s": grace,
        "limits": {"cpu_workers": 1, "cpu_queue": 16}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(config, port)

    def submit_job(seed: int) -> str:
        r = httpx.post(f"{url}/v1/sample", json=slow_body(seed, "job"), headers=HEADERS)
        assert r.status_code == 202
        return r.json()["job_id"]

    finished = [submit_job(s) for s in (10, 11)]
    wait_for_load(url, 0)
    inline: list[httpx.Response | Exception] = []

    def call_inline(seed: int) -> None:
        try:
            inline.append(httpx.post(f"{url}/v1/sample", json=slow_body(seed, "inline"),
                                     headers=HEADERS, timeout=120))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            inline.append(exc)

    threads = [threading.Thread(target=call_inline, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    wait_for_load(url, 2)
    in_flight = [submit_job(s) for s in (12, 13)]
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert len(inline) == 2
    for r in inline:
        assert isinstance(r, httpx.Response), r
        if grace:
            assert r.status_code == 200 and len(r.json()["samples"]) == 1000
        else:
            assert r.status_code == 503 and r.headers["retry-after"]
            assert "shut down" in r.json()["detail"]

    proc = start(config, port)
    try:
        for job in finished + in_flight:
            r = httpx.get(f"{url}/v1/jobs/{job}", headers=HEADERS)
            assert r.status_code == 200, r.text
            body = r.json()
            if job in finished or grace:
                assert body["status"] == "done" and len(body["result"]["samples"]) == 1000
            else:
                assert body["status"] == "failed" and body["error"]["status_code"] == 503
                assert "submit the request again" in body["error"]["detail"]
            assert httpx.get(f"{url}/v1/jobs/{job}", headers=HEADERS).status_code == 410
        import sqlite3  # delivered: nothing left behind in the job index

        with sqlite3.connect(tmp_path / "state.sqlite") as db:
            assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_draining_service_refuses_new_work_with_503():
    from qvae.service.app import create_app
    from qvae.service.settings import ServiceConfig

    app = create_app(ServiceConfig(keys=[{"key": KEY}]))
    scheduler = app.state.service.scheduler
    scheduler.drain(0)
    with pytest.raises(Exception) as info:
        scheduler.submit("x", "gibbs", "cpu", lambda job: b"{}", inline=True)
    assert info.value.status_code == 503 and info.value.headers["Retry-After"]


# ---------------------------------------------------------------------- schema fuzzing
# Driven through schemathesis' Python API (operation strategies under Hypothesis' own @given), not
# its pytest plugin: the plugin rewrites pytest internals (`Function._nodeid`) that pytest 9.2
# removed, so it is disabled in pyproject.toml (`-p no:schemathesis`).
# only `exact` with a small enumeration limit: fuzzed requests cannot ask for hours of work
FUZZ_CONFIG = {"keys": [{"key": KEY}], "limits": {"max_variables": 24, "max_num_samples": 2000},
               "backends": {name: {"enabled": False} for name in
                            ("gibbs", "neal", "dwave", "langevin", "mala")}
               | {"exact": {"options": {"max_states": 4096}, "locked": ["max_states"]}}}


def fuzzed_operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation, read from the app itself at collection."""
    from qvae.service.app import create_app
    from qvae.service.settings import ServiceConfig

    paths = create_app(ServiceConfig.model_validate(FUZZ_CONFIG)).openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


@pytest.fixture(scope="module")
def live_service():
    with running_service(FUZZ_CONFIG) as url:
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.mark.parametrize(("method", "path"), fuzzed_operations())
def test_openapi_fuzz(live_service, method, path):
    """No 5xx; status codes, headers and bodies as documented. Schema-valid bodies may still be
    refused (422 naming the field, 413): the schema cannot say that `weight` needs as many rows
    as `visible_bias` has entries, or what this deployment's limits are, so the check that every
    schema-valid request succeeds is the one left out. The schema's own examples are drawn too."""
    url, schema = live_service
    operation = schema[path][method]
    cases = st.one_of(operation.as_strategy(), *schema.get_strategies_from_examples(operation))
    calls = []

    @given(case=cases)
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(case):
        calls.append(case.call_and_validate(base_url=url, headers=HEADERS,
                                            excluded_checks=[positive_data_acceptance]))

    fuzz()
    assert calls, f"no request was generated for {method} {path}"
