"""The sampler service on a real uvicorn server on loopback: API, protection, load, jobs."""

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dimod
import httpx
import numpy as np
import pytest
import torch

import backends
from backends.testing import exact_visible_marginal, random_rbm, total_variation, tv_tolerance
from qvae.service.testing import running_service

ALICE, BOB = "alice-secret-key", "bob-secret-key0"
KEYS = [{"name": "alice", "key": ALICE},
        {"name": "bob", "key": BOB, "backends": ["gibbs", "dwave"], "qpu_budget_s": 0.025}]
EMULATOR = {"dwave": {"options": {"solver": "emulator", "beta_eff": 6.0},
                      "locked": ["solver"]}}


def auth(key=ALICE):
    return {"Authorization": f"Bearer {key}"}


def rbm_json(rbm):
    return {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
            "hidden_bias": rbm.hidden_bias.tolist()}


def sample_body(rbm=None, **over):
    rbm = rbm if rbm is not None else random_rbm(6, 4, seed=1)
    return {"backend": "gibbs", "num_samples": 8, "rbm": rbm_json(rbm), "seed": 0, **over}


def with_rbm(problem, **over):
    return {**sample_body(), "rbm": problem, **over}


def metric(text, name, **labels):
    """Value of one Prometheus series in the /metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    state = tmp_path_factory.mktemp("svc") / "state.sqlite"
    with running_service({"keys": KEYS, "backends": EMULATOR, "state_db": str(state),
                          "limits": {"max_body_bytes": 200_000, "max_num_samples": 50_000,
                                     "max_variables": 64, "cpu_workers": 2,
                                     "inline_max_work": 400_000}}) as base:
        yield base


# ---------------------------------------------------------------- API and results
def test_rbm_samples_match_the_in_process_backend(url):
    rbm = random_rbm(6, 4, seed=3)
    r = httpx.post(f"{url}/v1/sample", json=sample_body(rbm, seed=11, num_samples=50),
                   headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    local = backends.get_sampler("gibbs").sample(rbm.float64_copy(), 50, seed=11)
    assert body["num_visible"] == 6 and body["vartype"] == "BINARY"
    assert body["samples"] == local.states.to(torch.int64).tolist()
    assert np.allclose(body["energies"], local.energy.numpy())
    assert body["served_by"] == "gibbs" and body["info"]["key"] == "alice"
    assert set(body["info"]["timing"]) == {"preprocess_s", "sample_s", "postprocess_s",
                                           "total_s"}


def test_general_bqm_is_sampled_exactly(url):
    """An Ising triangle (not an RBM) through `exact`: TV against enumeration, energies."""
    bqm = dimod.BinaryQuadraticModel({"a": 0.3, "b": -0.2, "c": 0.1},
                                     {("a", "b"): -1.0, ("b", "c"): 0.5, ("a", "c"): 0.7}, 1.5,
                                     "SPIN")
    n = 20000
    r = httpx.post(f"{url}/v1/sample", headers=auth(), json={
        "backend": "exact", "num_samples": n, "bqm": bqm.to_serializable(), "seed": 2})
    assert r.status_code == 200, r.text
    ss = dimod.SampleSet.from_serializable(r.json())  # BQM results are dimod's own format
    assert ss.vartype is dimod.SPIN and list(ss.variables) == ["a", "b", "c"]
    samples = ss.record.sample
    assert np.allclose(ss.record.energy, bqm.energies((samples, ["a", "b", "c"])))
    states = [(a, b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]
    p = np.exp([-bqm.energy(dict(zip("abc", s, strict=True))) for s in states])
    p /= p.sum()
    counts = np.array([np.all(samples == s, axis=1).sum() for s in states]) / n
    tol = 0.5 * np.sqrt(p * (1 - p) / n).sum() + math.sqrt(math.log(1e6) / (2 * n))
    assert 0.5 * np.abs(counts - p).sum() <= tol
    # the same BQM through a bipartite-only backend is refused, naming the field (gibbs samples
    # it since issue 13: tests/test_service_bm.py)
    r = httpx.post(f"{url}/v1/sample", headers=auth(), json={
        "backend": "langevin", "num_samples": 5, "bqm": bqm.to_serializable()})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "bqm"]


def test_bipartite_bqm_goes_through_any_backend(url):
    rbm = random_rbm(5, 3, seed=4)
    bqm = rbm.to_bqm().change_vartype("SPIN", inplace=False)
    bqm.relabel_variables({i: f"x{i}" for i in range(8)})
    r = httpx.post(f"{url}/v1/sample", headers=auth(), json={
        "backend": "gibbs", "num_samples": 20000, "bqm": bqm.to_serializable(), "seed": 5})
    assert r.status_code == 200, r.text
    ss = dimod.SampleSet.from_serializable(r.json())
    samples = ss.record.sample[:, [ss.variables.index(f"x{i}") for i in range(8)]]
    assert set(np.unique(samples)) <= {-1, 1}
    visible = torch.tensor((samples[:, :5] + 1) / 2)
    p = exact_visible_marginal(rbm.float64_copy())
    assert total_variation(visible, p) <= tv_tolerance(p, 20000)


def test_backends_and_health(url):
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/backends").status_code == 401
    listing = httpx.get(f"{url}/v1/backends", headers=auth(BOB)).json()["backends"]
    assert listing["gibbs"]["allowed"] and not listing["neal"]["allowed"]
    assert listing["dwave"]["resource"] == "qpu" and listing["dwave"]["locked_options"] == \
        ["solver"]
    assert "remote" not in listing


# ------------------------------------------------------------------------ protection
def test_auth_errors(url):
    body = sample_body()
    r = httpx.post(f"{url}/v1/sample", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"]
    assert httpx.post(f"{url}/v1/sample", json=body, headers=auth("wrong-key")).status_code \
        == 401
    r = httpx.post(f"{url}/v1/sample", json={**body, "backend": "neal"}, headers=auth(BOB))
    assert r.status_code == 403 and "may not use backend 'neal'" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/sample", json={**body, "backend": "dwave",
                                             "options": {"solver": "Advantage_system4.1"}},
                   headers=auth())
    assert r.status_code == 403 and "solver" in r.json()["detail"]


def test_qpu_budget_is_per_key_and_metered(url):
    body = sample_body(random_rbm(4, 4, seed=2), backend="dwave", num_samples=20)
    first = httpx.post(f"{url}/v1/sample", json=body, headers=auth(BOB), timeout=60)
    assert first.status_code == 200, first.text
    info = first.json()["info"]
    assert info["served_by"] == "emulator" and info["qpu_access_time_s"] > 0
    assert "chain_break_fraction" in info and info["beta_eff"] == 6.0
    second = httpx.post(f"{url}/v1/sample", json=body, headers=auth(BOB))
    assert second.status_code == 429 and "Retry-After" not in second.headers
    assert "QPU-time budget exhausted for key 'bob'" in second.json()["detail"]
    # the budget is bob's: alice (no budget) still gets the QPU, and gibbs still works for bob
    assert httpx.post(f"{url}/v1/sample", json=body, headers=auth(), timeout=60).status_code \
        == 200
    assert httpx.post(f"{url}/v1/sample", json=sample_body(), headers=auth(BOB)).status_code \
        == 200
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "qvae_qpu_seconds_total", key="bob") == pytest.approx(
        info["qpu_access_time_s"])


def test_size_limits_answer_413(url):
    big = sample_body(random_rbm(40, 30))  # 70 variables > max_variables 64
    r = httpx.post(f"{url}/v1/sample", json=big, headers=auth())
    assert r.status_code == 413 and "variables = 70" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/sample", json=sample_body(num_samples=60_000), headers=auth())
    assert r.status_code == 413 and "num_samples" in r.json()["detail"]
    padded = sample_body(options={}, backend="gibbs")
    padded["rbm"]["weight"] = [[0.0] * 4] * 6
    raw = json.dumps(padded).encode()
    raw = raw[:-1] + b"," + b" " * 250_000 + b'"x": 1}'
    r = httpx.post(f"{url}/v1/sample", content=raw, headers={**auth(), "content-type":
                                                              "application/json"})
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds on the bytes actually received
        yield raw[:1000]
        for i in range(1000, len(raw), 50_000):
            yield raw[i:i + 50_000]

    r = httpx.post(f"{url}/v1/sample", content=chunks(), headers={**auth(), "content-type":
                                                                   "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("change, loc", [
    ({"num_samples": 0}, ["body", "num_samples"]),
    ({"num_sample": 5}, ["body", "num_sample"]),
    ({"seed": -1}, ["body", "seed"]),
    ({"mode": "later"}, ["body", "mode"]),
    ({"options": {"sweeps": 3}}, ["body", "options", "sweeps"]),
    ({"options": {"num_sweeps": 0}}, ["body", "options"]),
    ({"backend": "quantum"}, ["body", "backend"]),
    ({"bqm": {"type": "BinaryQuadraticModel"}}, ["body"]),
    ({"rbm": {"weight": [[1.0, 2.0], [3.0]], "visible_bias": [0, 0],
              "hidden_bias": [0, 0]}}, ["body", "rbm", "weight", 1]),
    ({"rbm": {"weight": [[1.0]], "visible_bias": [0, 0], "hidden_bias": [0]}},
     ["body", "rbm", "weight"]),
])
def test_validation_errors_name_the_field(url, change, loc):
    r = httpx.post(f"{url}/v1/sample", json={**sample_body(), **change}, headers=auth())
    assert r.status_code == 422, r.text
    assert any(err["loc"][:len(loc)] == loc for err in r.json()["detail"]), r.json()


def test_non_finite_parameters_are_refused_before_sampling(url):
    body = sample_body()
    body["rbm"]["hidden_bias"][2] = float("nan")  # json.dumps writes NaN, Python reads it back
    r = httpx.post(f"{url}/v1/sample", content=json.dumps(body), headers={
        **auth(), "content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "rbm", "hidden_bias", 2]


# --------------------------------------------------------------------- jobs and load
def test_jobs_are_delivered_once_to_their_owner(url):
    r = httpx.post(f"{url}/v1/sample", json=sample_body(mode="job", seed=7), headers=auth())
    assert r.status_code == 202 and r.headers["location"] == r.json()["location"]
    job = r.json()["job_id"]
    assert httpx.get(f"{url}/v1/jobs/{job}", headers=auth(BOB)).status_code == 404
    for _ in range(200):
        status = httpx.get(f"{url}/v1/jobs/{job}", headers=auth())
        assert status.status_code == 200
        if status.json()["status"] == "done":
            break
        time.sleep(0.02)
    result = status.json()["result"]
    inline = httpx.post(f"{url}/v1/sample", json=sample_body(seed=7), headers=auth()).json()
    assert result["samples"] == inline["samples"] and result["request_id"] == job
    again = httpx.get(f"{url}/v1/jobs/{job}", headers=auth())
    assert again.status_code == 410 and "delivered once" in again.json()["detail"]
    assert httpx.get(f"{url}/v1/jobs/nope", headers=auth()).status_code == 404


def test_large_requests_become_jobs(url):
    r = httpx.post(f"{url}/v1/sample", json=sample_body(num_samples=45_000), headers=auth())
    assert r.status_code == 202  # 45,000 × 10 > inline_max_work


def test_idempotent_retry_runs_once(url):
    headers = {**auth(), "Idempotency-Key": "retry-me-1"}
    before = metric(httpx.get(f"{url}/metrics").text, "qvae_samples_total", backend="gibbs",
                    served_by="gibbs")
    a = httpx.post(f"{url}/v1/sample", json=sample_body(seed=None), headers=headers).json()
    b = httpx.post(f"{url}/v1/sample", json=sample_body(seed=None), headers=headers).json()
    after = metric(httpx.get(f"{url}/metrics").text, "qvae_samples_total", backend="gibbs",
                   served_by="gibbs")
    assert a["request_id"] == b["request_id"] and a["samples"] == b["samples"]
    assert after - before == 8


def test_concurrent_load_every_request_answered_once(url):
    """300 requests from 16 threads: each answered exactly once, with its own samples."""
    rbm = random_rbm(6, 4, seed=9)
    n_requests = 300
    expected = {s: backends.get_sampler("gibbs").sample(rbm.float64_copy(), 4, seed=s)
                .states.to(torch.int64).tolist() for s in range(n_requests)}
    before = httpx.get(f"{url}/metrics").text
    answers: dict[int, list] = {}
    lock = threading.Lock()

    def call(seed: int) -> int:
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{url}/v1/sample", json=sample_body(rbm, seed=seed, num_samples=4),
                            headers=auth())
        with lock:
            answers.setdefault(seed, []).append(r.json())
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(n_requests)))
    assert codes == [200] * n_requests
    assert sorted(answers) == list(range(n_requests))
    assert all(len(v) == 1 for v in answers.values())
    ids = {v[0]["request_id"] for v in answers.values()}
    assert len(ids) == n_requests
    assert all(answers[s][0]["samples"] == expected[s] for s in range(n_requests))
    after = httpx.get(f"{url}/metrics").text
    served = (metric(after, "qvae_requests_total", backend="gibbs", endpoint="/v1/sample",
                     status="200")
              - metric(before, "qvae_requests_total", backend="gibbs", endpoint="/v1/sample",
                       status="200"))
    assert served == n_requests
    assert metric(after, "qvae_queue_depth", resource="cpu") == 0


def test_queue_full_gets_429_with_retry_after():
    """One worker and a queue of 2: of 12 simultaneous slow requests, at most 3 are admitted
    at once; the rest are told when to come back, and nothing piles up."""
    slow = sample_body(random_rbm(30, 30, seed=1), num_samples=2000,
                       options={"num_sweeps": 400, "burn_in": 400})
    config = {"keys": KEYS, "limits": {"cpu_workers": 1, "cpu_queue": 2}}
    with running_service(config) as base:
        barrier = threading.Barrier(12)

        def call(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(f"{base}/v1/sample", json=slow, headers=auth(), timeout=120)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, range(12)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) >= 6, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert "queue is full" in r.json()["detail"]
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "qvae_requests_total", backend="gibbs", endpoint="/v1/sample",
                      status="429") == codes.count(429)


def test_jobs_expire(tmp_path):
    config = {"keys": KEYS, "job_ttl_s": 0.4}
    with running_service(config) as base:
        job = httpx.post(f"{base}/v1/sample", json=sample_body(mode="job"),
                         headers=auth()).json()["job_id"]
        time.sleep(1.5)
        r = httpx.get(f"{base}/v1/jobs/{job}", headers=auth())
        assert r.status_code == 404 and "expired" in r.json()["detail"]


def test_no_keys_refuses_to_start(monkeypatch):
    from qvae.service.app import create_app
    from qvae.service.settings import ServiceConfig

    monkeypatch.delenv("QVAE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="QVAE_API_KEYS"):
        create_app(ServiceConfig())
    monkeypatch.setenv("QVAE_API_KEYS", "env-key-000001, env-key-000002")
    service = create_app(ServiceConfig(default_qpu_budget_s=5)).state.service
    assert service.keys.get("env-key-000002").qpu_budget_s == 5


def test_service_config_errors_name_the_field(tmp_path):
    from qvae.config import ConfigError
    from qvae.service.settings import load_service_config

    with pytest.raises(ConfigError, match=r"limits.cpu_wokers: unknown key"):
        load_service_config(None, ["limits.cpu_wokers=3"])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['sweeps'\]"):
        load_service_config(None, ["backends={gibbs: {options: {sweeps: 1}}}"])
    assert load_service_config("configs/service.yaml").backends["dwave"].locked


# ------------------------------------------------------------------ the remote backend
def test_remote_backend_passes_conformance_through_the_service(url):
    from backends.testing import run_conformance

    report = run_conformance(lambda: backends.get_sampler(
        "remote", url=url, target="gibbs", api_key=ALICE), num_samples=20000)
    assert all(row["tv"] <= row["tv_tolerance"] for row in report["distribution"])


def test_remote_reports_server_refusals_clearly(url):
    from backends.remote import RemoteError

    rbm = random_rbm(4, 4)
    with pytest.raises(RemoteError, match="may not use backend 'neal'") as info:
        backends.get_sampler("remote", url=url, target="neal", api_key=BOB).sample(rbm, 4)
    assert info.value.status_code == 403
    with pytest.raises(RemoteError, match="QVAE_API_KEY"):
        backends.get_sampler("remote", url=url, target="gibbs", api_key="nope").sample(rbm, 4)


@pytest.mark.parametrize("target", ["gibbs", "dwave"])
def test_train_against_a_shared_service(url, tmp_path, monkeypatch, target):
    """`qvae train --backend remote --set backend.url=... --set backend.target=...`."""
    from qvae.cli import main as cli_main

    monkeypatch.setenv("QVAE_API_KEY", ALICE)
    run = tmp_path / "run"
    sets = ["train.steps=4", "train.log_every=1", "model.n_visible=4", "model.n_hidden=4",
            "model.encoder_hidden=[16]", "model.decoder_hidden=[16]", "data.batch_size=20",
            "backend.num_samples=20", "train.sample_grid=0", f"backend.url={url}",
            f"backend.target={target}", "backend.options={}"]
    argv = ["train", "--config", "configs/smoke.yaml", "--backend", "remote", "--out", str(run),
            "--no-eval", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert cli_main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    text = httpx.get(f"{url}/metrics").text
    served = "emulator" if target == "dwave" else "gibbs"
    assert metric(text, "qvae_samples_total", backend=target, served_by=served) >= 80


def test_private_metrics_and_persistent_ledger(tmp_path):
    from qvae.service.store import SQLiteStore

    state = tmp_path / "state.sqlite"
    config = {"keys": KEYS, "backends": EMULATOR, "metrics_public": False,
              "state_db": str(state)}
    body = sample_body(random_rbm(3, 3, seed=2), backend="dwave", num_samples=10)
    with running_service(config) as base:
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/metrics", headers=auth()).status_code == 200
        assert httpx.post(f"{base}/v1/sample", json=body, headers=auth(BOB),
                          timeout=60).status_code == 200
    assert SQLiteStore(state).used("key:bob") > 0
    with running_service(config) as base:  # a restart does not refill bob's budget
        r = httpx.post(f"{base}/v1/sample", json=body, headers=auth(BOB))
        assert r.status_code == 429 and "budget" in r.json()["detail"]


def test_cli_serve_without_keys_says_what_to_do(monkeypatch, capsys):
    from qvae.cli import main as cli_main

    monkeypatch.delenv("QVAE_API_KEYS", raising=False)
    assert cli_main(["serve", "--port", "0"]) == 2
    assert "QVAE_API_KEYS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    assert "Authorization: Bearer" in capsys.readouterr().out


def test_the_qpu_serves_one_request_at_a_time(url):
    """Concurrent QPU requests never overlap, while the CPU pool runs two at once."""
    qpu = sample_body(random_rbm(4, 4, seed=5), backend="dwave", num_samples=200)
    cpu = sample_body(random_rbm(30, 30, seed=5), num_samples=1000,
                      options={"num_sweeps": 400, "burn_in": 400})

    def windows(body, n=4):
        def call(_):
            r = httpx.post(f"{url}/v1/sample", json=body, headers=auth(), timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["info"]["started_at"], r.json()["info"]["finished_at"]

        with ThreadPoolExecutor(n) as pool:
            return sorted(pool.map(call, range(n)))

    def max_overlap(spans):
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        depth = best = 0
        for _, step in events:
            depth += step
            best = max(best, depth)
        return best

    assert max_overlap(windows(qpu)) == 1
    assert max_overlap(windows(cpu)) == 2


def test_retained_answers_are_bounded(monkeypatch):
    """Idempotent answers are kept briefly for retries, within a byte cap, oldest dropped."""
    from qvae.service import jobs

    monkeypatch.setattr(jobs, "RETAIN_MAX_BYTES", 250)
    scheduler = jobs.Scheduler({"cpu": (1, 8)}, ttl_s=60)
    done = []
    for i in range(4):
        job = scheduler.submit("k", "gibbs", "cpu", lambda job: b"x" * 100, inline=True,
                               idempotency_key=f"key-{i}")
        job.done.result(timeout=10)
        scheduler.deliver(job)
        done.append(job.id)
    assert set(scheduler.retained) == set(done[-2:]) and scheduler.retained_bytes == 200
    again = scheduler.submit("k", "gibbs", "cpu", lambda job: b"y", inline=True,
                             idempotency_key="key-3")
    assert again.id == done[-1] and again.result == b"x" * 100
    scheduler.drain(0)
