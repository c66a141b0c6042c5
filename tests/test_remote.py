"""The `remote` backend's client side and its config wiring, without the qvae service.

The HTTP behaviour (retries, jobs, errors) is checked against a scripted stdlib HTTP server on a
thread; tests against the real service live in tests/test_service*.py.
"""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

import backends
from backends.remote import RemoteError, RemoteSampler
from backends.testing import random_rbm
from qvae.config import BackendConfig, ConfigError, load_config, sampler_options
from qvae.rbm import RBM


# ------------------------------------------------------------------ a scripted server
class Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        req = {"method": self.command, "path": self.path, "headers": dict(self.headers),
               "body": body}
        self.server.log.append(req)
        script = self.server.script
        status, headers, payload = script.pop(0)(self.server, req) if script else (500, {}, {})
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.script, srv.log = [], []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def sample_result(req: dict, **extra) -> dict:
    """A SampleResult with exact samples of the RBM POSTed in `req`."""
    req = req["body"]
    spec = req["rbm"]
    weight = torch.tensor(spec["weight"], dtype=torch.float64)
    rbm = RBM(*weight.shape, init_std=0.0, dtype=torch.float64)
    with torch.no_grad():
        rbm.weight.copy_(weight)
        rbm.visible_bias.copy_(torch.tensor(spec["visible_bias"]))
        rbm.hidden_bias.copy_(torch.tensor(spec["hidden_bias"]))
    out = backends.get_sampler("exact").sample(rbm, req["num_samples"], seed=req.get("seed"))
    timing = {"preprocess_s": 0.0, "sample_s": 0.01, "postprocess_s": 0.0, "total_s": 0.01}
    return {"request_id": "req-1", "backend": req["backend"], "served_by": req["backend"],
            "vartype": "BINARY", "variables": list(range(rbm.n_units)),
            "num_visible": rbm.n_visible, "samples": out.states.long().tolist(),
            "energies": out.energy.tolist(), "continuous": None,
            "info": {"timing": timing, "served_by": req["backend"], "queue_wait_s": 0.0}, **extra}


def ok(srv, req):
    return 200, {}, sample_result(req)


def reply(status, payload, headers=None):
    return lambda srv, req: (status, headers or {}, payload)


def job(status, **fields):
    def respond(srv, req):
        post = next(r for r in reversed(srv.log) if r["method"] == "POST")
        result = sample_result(post) if status == "done" else None
        return 200, {}, {"job_id": "j1", "status": status, "result": result, "error": None,
                         **fields}
    return respond


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("QVAE_SERVICE_URL", raising=False)
    monkeypatch.delenv("QVAE_API_KEY", raising=False)


# ------------------------------------------------------------------ construction
def test_registered_available_and_options():
    assert "remote" in backends.registered()
    assert backends.availability()["remote"] == (True, "")
    assert isinstance(backends.get_sampler("remote", url="http://h:1"), RemoteSampler)


@pytest.mark.parametrize("options, match", [
    ({"url": "ftp://h"}, "ftp://h"),
    ({"target": "remote"}, "'remote'"),
    ({"target": 3}, "3"),
    ({"options": [1]}, r"\[1\]"),
    ({"options": {"beta": math.nan}}, "nan"),
    ({"api_key": ""}, "''"),
    ({"timeout_s": 0}, "timeout_s.*0"),
    ({"connect_timeout_s": -1.0}, "connect_timeout_s.*-1.0"),
    ({"max_retries": -1}, "max_retries.*-1"),
    ({"max_retries": 1.5}, "max_retries.*1.5"),
    ({"retry_backoff_s": math.inf}, "retry_backoff_s.*inf"),
    ({"poll_interval_s": "fast"}, "poll_interval_s.*'fast'"),
    ({"job_timeout_s": True}, "job_timeout_s.*True"),
    ({"mode": "batch"}, "mode.*'batch'"),
    ({"return_continuous": "yes"}, "return_continuous.*'yes'"),
])
def test_bad_options_name_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        RemoteSampler(**{"url": "http://127.0.0.1:8700", **options})


def test_url_and_key_from_env(monkeypatch):
    with pytest.raises(ValueError, match="pass url=.*QVAE_SERVICE_URL"):
        RemoteSampler()
    monkeypatch.setenv("QVAE_SERVICE_URL", "http://svc:8700/")
    monkeypatch.setenv("QVAE_API_KEY", "k1")
    sampler = RemoteSampler(target="neal")
    assert (sampler.url, sampler.api_key, sampler.target) == ("http://svc:8700", "k1", "neal")


# ------------------------------------------------------------------ transport errors
def test_service_down_fails_after_bounded_retries(monkeypatch):
    calls = []
    real = httpx.Client.request
    monkeypatch.setattr(httpx.Client, "request",
                        lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    url = f"http://127.0.0.1:{free_port()}"
    sampler = RemoteSampler(url=url, max_retries=2, retry_backoff_s=0.01, connect_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="is `qvae serve` running") as err:
        sampler.sample(random_rbm(3, 2), 4)
    assert time.monotonic() - start < 3
    assert len(calls) == 3
    assert url in str(err.value) and "after 3 attempts" in str(err.value)
    assert "ConnectError" in str(err.value) and "configs/service.yaml" in str(err.value)
    assert err.value.status_code is None


def test_read_timeout_is_retried_then_explained(server):
    def slow(srv, req):
        time.sleep(0.5)
        return ok(srv, req)
    server.script = [slow, slow]
    sampler = RemoteSampler(url=server.url, timeout_s=0.1, max_retries=1, retry_backoff_s=0.01)
    with pytest.raises(RemoteError, match="did not answer within timeout_s=0.1"):
        sampler.sample(random_rbm(3, 2), 4)
    assert len(server.log) == 2


# ------------------------------------------------------------------ responses
def test_inline_result_request_and_info(server):
    server.script = [ok, ok]
    rbm = random_rbm(4, 3, seed=5)
    sampler = RemoteSampler(url=server.url, target="neal", options={"num_sweeps": 7},
                            api_key="secret", mode="inline")
    out = sampler.sample(rbm, 50, seed=11)
    req = server.log[0]
    assert (req["method"], req["path"]) == ("POST", "/v1/sample")
    assert req["headers"]["Authorization"] == "Bearer secret"
    assert len(req["headers"]["Idempotency-Key"]) == 32
    body = req["body"]
    assert {k: body[k] for k in ("backend", "num_samples", "options", "seed", "mode")} == {
        "backend": "neal", "num_samples": 50, "options": {"num_sweeps": 7}, "seed": 11,
        "mode": "inline"}
    assert torch.equal(torch.tensor(body["rbm"]["weight"]), rbm.weight.detach().double())
    assert out.visible.shape == (50, 4) and out.hidden.shape == (50, 3)
    assert out.visible.dtype == rbm.weight.dtype and out.continuous is None
    assert torch.allclose(out.energy, rbm.energy(out.visible, out.hidden).detach())
    info = out.info
    assert info["server_timing"]["sample_s"] == 0.01 and "total_s" in info["timing"]
    assert (info["served_by"], info["request_id"], info["target"]) == ("neal", "req-1", "neal")
    assert (info["url"], info["retries"], info["backend"]) == (server.url, 0, "remote")
    sampler.sample(rbm, 5)
    assert "seed" not in server.log[1]["body"]
    assert server.log[1]["headers"]["Idempotency-Key"] != req["headers"]["Idempotency-Key"]


def test_503_with_retry_after_is_retried_with_the_same_idempotency_key(server):
    server.script = [reply(503, {"detail": "draining"}, {"Retry-After": "0"}), ok]
    out = RemoteSampler(url=server.url, retry_backoff_s=0.01).sample(random_rbm(3, 2), 8, seed=1)
    assert out.info["retries"] == 1 and len(out) == 8
    keys = {r["headers"]["Idempotency-Key"] for r in server.log}
    assert len(server.log) == 2 and len(keys) == 1


def test_429_without_retry_after_fails_at_once_with_the_detail(server):
    detail = "QPU-time budget exhausted for this key (12.0 s of 12.0 s)"
    server.script = [reply(429, {"detail": detail}), ok]
    with pytest.raises(RemoteError, match=r"\(429\).*budget exhausted") as err:
        RemoteSampler(url=server.url, retry_backoff_s=0.01).sample(random_rbm(3, 2), 4)
    assert len(server.log) == 1
    assert (err.value.status_code, err.value.detail) == (429, detail)


def test_queue_full_retries_are_bounded(server):
    server.script = [reply(429, {"detail": "queue full"}, {"Retry-After": "0"})] * 3
    sampler = RemoteSampler(url=server.url, max_retries=1, retry_backoff_s=0.01)
    with pytest.raises(RemoteError, match="queue full") as err:
        sampler.sample(random_rbm(3, 2), 4)
    assert len(server.log) == 2 and err.value.status_code == 429


@pytest.mark.parametrize("status, detail, match", [
    (401, "invalid API key", "QVAE_API_KEY"),
    (403, "key may not use backend 'dwave'", r"\(403.*may not use backend 'dwave'"),
    (413, "num_samples 10000000 over the limit 100000", "over the limit 100000"),
    (422, [{"loc": ["body", "options", "bogus"], "msg": "unknown option", "type": "x"}],
     r"body\.options\.bogus: unknown option"),
    (404, "Not Found", "base URL of a qvae service"),
])
def test_client_errors_are_not_retried(server, status, detail, match):
    server.script = [reply(status, {"detail": detail}), ok]
    with pytest.raises(RemoteError, match=match) as err:
        RemoteSampler(url=server.url, retry_backoff_s=0.01).sample(random_rbm(3, 2), 4)
    assert len(server.log) == 1
    assert (err.value.status_code, err.value.detail) == (status, detail)


def test_job_is_polled_until_done(server):
    accepted = reply(202, {"job_id": "j1", "status": "queued", "location": "/v1/jobs/j1"},
                     {"Location": "/v1/jobs/j1"})
    server.script = [accepted, job("queued"), job("running"), job("done")]
    rbm = random_rbm(4, 3)
    sampler = RemoteSampler(url=server.url, mode="job", poll_interval_s=0.01)
    out = sampler.sample(rbm, 20, seed=3)
    assert [r["path"] for r in server.log] == ["/v1/sample"] + ["/v1/jobs/j1"] * 3
    assert out.info["job_id"] == "j1" and len(out) == 20
    assert torch.allclose(out.energy, rbm.energy(out.visible, out.hidden).detach())


def test_failed_and_slow_jobs_raise(server):
    accepted = reply(202, {"job_id": "j1", "status": "queued"})
    error = {"status_code": 502, "detail": "solver went away"}
    server.script = [accepted, job("failed", error=error)]
    sampler = RemoteSampler(url=server.url, poll_interval_s=0.01, job_timeout_s=0.2)
    with pytest.raises(RemoteError, match="job j1 failed.*solver went away") as err:
        sampler.sample(random_rbm(3, 2), 4)
    assert err.value.status_code == 502
    server.script = [accepted] + [job("running")] * 100
    with pytest.raises(RemoteError, match="job_timeout_s=0.2"):
        sampler.sample(random_rbm(3, 2), 4)


def test_a_job_done_without_its_result_says_so(server):
    def done_without_result(srv, req):
        return 200, {}, {"job_id": "j1", "status": "done", "result": None, "error": None}

    server.script = [reply(202, {"job_id": "j1", "status": "queued"}), done_without_result]
    sampler = RemoteSampler(url=server.url, poll_interval_s=0.01)
    with pytest.raises(RemoteError, match="job j1 .* done without its result .*NoneType"):
        sampler.sample(random_rbm(3, 2), 4)


def test_malformed_result_and_continuous(server):
    def short(srv, req):
        return 200, {}, {**sample_result(req), "samples": [[0, 1]]}

    def with_continuous(srv, req):
        result = sample_result(req)
        return 200, {}, {**result, "continuous": [[0.25] * 5] * req["body"]["num_samples"]}

    server.script = [short, with_continuous]
    sampler = RemoteSampler(url=server.url, target="mala", return_continuous=True)
    with pytest.raises(RemoteError, match="malformed SampleResult"):
        sampler.sample(random_rbm(3, 2), 4)
    out = sampler.sample(random_rbm(3, 2), 4)
    assert server.log[1]["body"]["return_continuous"] is True
    assert out.continuous.shape == (4, 5) and out.continuous.dtype == torch.float32


def test_same_seed_same_samples_and_ping(server):
    server.script = [ok, ok, reply(200, {"status": "ok"})]
    sampler = RemoteSampler(url=server.url)
    rbm = random_rbm(4, 3)
    a, b = sampler.sample(rbm, 30, seed=9), sampler.sample(rbm, 30, seed=9)
    assert torch.equal(a.states, b.states)
    assert sampler.ping() == {"status": "ok"}
    sampler.close()
    with pytest.raises(RemoteError, match="is `qvae serve` running"):
        RemoteSampler(url=f"http://127.0.0.1:{free_port()}").ping()


# ------------------------------------------------------------------ config wiring
def test_config_remote_needs_a_target():
    with pytest.raises(ConfigError, match=r"backend\.target.*--set backend\.target=dwave"):
        load_config(overrides=["backend.name=remote"])
    with pytest.raises(ConfigError, match=r"backend\.target: .*got 'remote'"):
        load_config(overrides=["backend.name=remote", "backend.target=remote"])


def test_config_remote_only_keys_need_backend_remote():
    with pytest.raises(ConfigError, match=r"backend\.url.*only apply to backend 'remote'"):
        load_config(overrides=["backend.url=http://127.0.0.1:8700"])
    with pytest.raises(ConfigError, match=r"backend\.remote.*only apply"):
        load_config(overrides=["backend.name=gibbs", "backend.remote.timeout_s=5"])


def test_config_remote_options_follow_the_target():
    base = ["backend.name=remote", "backend.target=gibbs"]
    cfg = load_config(overrides=base + ["backend.options.num_sweeps=5",
                                        "backend.remote.max_retries=1"])
    assert cfg.backend.options == {"num_sweeps": 5}
    with pytest.raises(ConfigError, match=r"backend\.options: unknown .*\['bogus'\].*'gibbs'"):
        load_config(overrides=base + ["backend.options.bogus=1"])
    with pytest.raises(ConfigError, match=r"\['url'\] in backend\.remote"):
        load_config(overrides=base + ["backend.remote.url=http://h:1"])
    with pytest.raises(ConfigError, match=r"backend\.url: .*must start with http"):
        load_config(overrides=base + ["backend.url=h:1"])


def test_sampler_options():
    assert sampler_options(BackendConfig(name="neal", options={"num_sweeps": 3})) == (
        "neal", {"num_sweeps": 3})
    cfg = BackendConfig(name="remote", url="http://h:8700", target="dwave",
                        options={"solver": "emulator"}, remote={"timeout_s": 5.0})
    name, kwargs = sampler_options(cfg)
    assert (name, kwargs) == ("remote", {"url": "http://h:8700", "target": "dwave",
                                         "options": {"solver": "emulator"}, "timeout_s": 5.0})
    sampler = backends.get_sampler(name, **kwargs)
    assert (sampler.url, sampler.target, sampler.timeout_s) == ("http://h:8700", "dwave", 5.0)
