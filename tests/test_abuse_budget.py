"""Issue 10, QPU budgets and stored state: reproductions of "What was measured" and store tests.

- QPU budget, concurrency: 17 simultaneous 1,000-read requests against a 0.5 s key budget.
- QPU budget, one request: 20,000 reads at annealing_time 2000 against the same budget.
- Server-wide budget: `qpu_time_budget_s` is one persisted ledger, not one per cached sampler.
- Unfetched results: a byte cap, results kept out of memory, a restart that reads the index only.
- Files: an unreadable state database (or old JSON ledger) stops `qvae serve` with one line.

Every assertion counts (requests, seconds charged, SQL statements); nothing is timed.
"""

import json
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import backends
from backends.dwave import QPUBudgetExceeded
from backends.testing import random_rbm
from qvae.service.accounts import Ledger, QPUBudgetRefused
from qvae.service.jobs import Scheduler, ServiceError
from qvae.service.settings import KeyConfig
from qvae.service.store import SERVER, BudgetRefused, SQLiteStore, StoreError, key_account
from qvae.service.testing import running_service

KEY = "abuse-test-key-0001"
HEADERS = {"Authorization": f"Bearer {KEY}"}
READS, BUDGET = 1000, 0.5
# one 1,000-read call under the timing model: 0.015 s programming + 1,000 × 0.2 ms
COST_1000 = 0.015 + READS * 0.0002


def dwave_policy(tmp_path, **options):
    return {"dwave": {"options": {"solver": "emulator", "beta_eff": 6.0,
                                  "embedding_cache": str(tmp_path / "emb"), **options},
                      "locked": ["solver", "qpu_time_budget_s"]}}


def rbm_body(num_samples=READS, seed=0, **over):
    rbm = random_rbm(4, 4, seed=2)
    return {"backend": "dwave", "num_samples": num_samples, "seed": seed,
            "rbm": {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                    "hidden_bias": rbm.hidden_bias.tolist()}, **over}


def post_all(urls, bodies):
    """POST every body at once (one thread each), round-robin over `urls`."""
    barrier = threading.Barrier(len(bodies))

    def post(i):
        barrier.wait()
        return httpx.post(f"{urls[i % len(urls)]}/v1/sample", json=bodies[i], headers=HEADERS,
                          timeout=120)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


# ------------------------------------------------------------ QPU budget, concurrency
def test_concurrent_requests_cannot_overspend_a_key_budget(tmp_path):
    """Before: all 17 served, 4.3 s charged to a 0.5 s budget. Now each request holds its
    estimate at admission, so exactly floor(0.5 / 0.215) = 2 run; the rest get 429."""
    state = tmp_path / "state.sqlite"
    config = {"keys": [{"name": "lab", "key": KEY, "qpu_budget_s": BUDGET}],
              "backends": dwave_policy(tmp_path), "state_db": str(state)}
    with running_service(config) as url:
        answers = post_all([url], [rbm_body(seed=i) for i in range(17)])
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 2 + [429] * 15, [r.text[:200] for r in answers]
    served = [r.json()["info"]["qpu_access_time_s"] for r in answers if r.status_code == 200]
    store = SQLiteStore(state)
    charged = store.used(key_account("lab"))
    assert charged == pytest.approx(sum(served)) == pytest.approx(2 * COST_1000)
    assert charged <= BUDGET  # the emulator charges exactly the estimate: error 0
    assert store.reserved(key_account("lab")) == 0  # every hold released
    refused = next(r for r in answers if r.status_code == 429)
    assert "Retry-After" not in refused.headers  # waiting does not refill a budget
    figures = refused.json()["qpu_budget"]
    assert figures["scope"] == "key" and figures["key"] == "lab"
    assert figures["limit_s"] == BUDGET and figures["estimate_s"] == pytest.approx(COST_1000)
    assert figures["used_s"] + figures["reserved_s"] + figures["estimate_s"] > BUDGET
    assert "QPU-time budget exhausted for key 'lab'" in refused.json()["detail"]


def test_processes_sharing_a_state_db_share_the_budget(tmp_path):
    """Two services on one database file (as two `qvae serve` processes on one host would be):
    16 simultaneous requests spread over both still spend at most the one budget."""
    state = tmp_path / "state.sqlite"
    config = {"keys": [{"name": "lab", "key": KEY, "qpu_budget_s": BUDGET}],
              "backends": dwave_policy(tmp_path), "state_db": str(state)}
    with running_service(config) as one, running_service(config) as two:
        answers = post_all([one, two], [rbm_body(seed=i) for i in range(16)])
    assert sum(r.status_code == 200 for r in answers) == 2
    assert sum(r.status_code == 429 for r in answers) == 14
    assert SQLiteStore(state).used(key_account("lab")) <= BUDGET


def test_a_retry_of_a_paid_request_is_answered_not_refused(tmp_path):
    """The remote client retries a lost response with the same Idempotency-Key: it gets the
    first attempt's answer, although a fresh hold would no longer fit in the budget."""
    config = {"keys": [{"name": "lab", "key": KEY, "qpu_budget_s": 0.3}],
              "backends": dwave_policy(tmp_path)}
    with running_service(config) as url:
        headers = {**HEADERS, "Idempotency-Key": "call-1"}
        first = httpx.post(f"{url}/v1/sample", json=rbm_body(), headers=headers, timeout=60)
        again = httpx.post(f"{url}/v1/sample", json=rbm_body(), headers=headers, timeout=60)
        other = httpx.post(f"{url}/v1/sample", json=rbm_body(), headers=HEADERS, timeout=60)
    assert first.status_code == again.status_code == 200
    assert first.json()["request_id"] == again.json()["request_id"]
    assert other.status_code == 429


# ------------------------------------------------------------ QPU budget, one request
def test_one_request_over_the_budget_is_refused_up_front(tmp_path):
    """Before: 20,000 reads at annealing_time 2000 were served and charged 50 s against 0.5 s.
    Now the estimate (2 calls, 20,000 × (0.2 ms + 1.98 ms)) is refused before any QPU call."""
    state = tmp_path / "state.sqlite"
    config = {"keys": [{"name": "lab", "key": KEY, "qpu_budget_s": BUDGET}],
              "backends": dwave_policy(tmp_path), "state_db": str(state),
              # above the one-request QPU work limit (413), so the budget is what refuses it
              "limits": {"inline_max_work": 10**6, "max_request_qpu_s": 100}}
    with running_service(config) as url:
        r = httpx.post(f"{url}/v1/sample", headers=HEADERS, timeout=60,
                       json=rbm_body(20_000, options={"annealing_time": 2000}))
        assert r.status_code == 429, r.text
        assert r.json()["qpu_budget"]["estimate_s"] == pytest.approx(
            2 * 0.015 + 20_000 * (0.0002 + 1980e-6))
        text = httpx.get(f"{url}/metrics").text
    assert 'qvae_qpu_seconds_total{key="lab"}' not in text
    store = SQLiteStore(state)
    assert store.used(key_account("lab")) == 0 and store.used(SERVER) == 0


@pytest.mark.parametrize("options, reads", [
    ({"beta_eff": 6.0}, 300),
    ({"beta_eff": 6.0, "num_spin_reversal_transforms": 3}, 300),
    ({"beta_eff": 6.0, "annealing_time": 150.0}, 200),
    ({"beta_eff": 6.0}, 12_000),  # split over num_reads_range: two calls
    ({"calibration_reads": 200}, 100),  # β̂ unknown: up to three calibration rounds
])
def test_estimate_is_an_upper_bound_of_the_charge(tmp_path, options, reads):
    """The admission estimate covers calibration, read splits, spin-reversal transforms and
    annealing_time: on the emulator it is never below what the calls are charged."""
    sampler = backends.get_sampler("dwave", solver="emulator",
                                   embedding_cache=str(tmp_path / "emb"), **options)
    estimate = sampler.estimate_qpu_seconds(reads)
    out = sampler.sample(random_rbm(4, 4, seed=2), reads, seed=0)
    assert out.info["served_by"] == "emulator"
    assert 0 < out.info["qpu_access_time_s"] <= estimate + 1e-12
    if "calibration_reads" not in options:  # no calibration: the estimate is exact
        assert out.info["qpu_access_time_s"] == pytest.approx(estimate)


def test_qpu_worker_rechecks_before_each_call(tmp_path):
    """A request admitted while the budget had room, then spent elsewhere (another process on
    the same database), makes no QPU call: the backend's meter refuses it first."""
    state = tmp_path / "state.sqlite"
    here, elsewhere = SQLiteStore(state), SQLiteStore(state)
    key = KeyConfig(key=KEY, name="lab", qpu_budget_s=BUDGET)
    reservation = Ledger(here).reserve(key, COST_1000)
    elsewhere.add_used({key_account("lab"): BUDGET - COST_1000 / 2})
    sampler = backends.get_sampler("dwave", solver="emulator", beta_eff=6.0,
                                   embedding_cache=str(tmp_path / "emb"))
    sampler.meter = reservation
    with pytest.raises(QPUBudgetExceeded, match="budget exhausted for key 'lab'"):
        sampler.sample(random_rbm(4, 4, seed=2), READS, seed=0)
    assert sampler.qpu_time_s == 0  # no call was made
    assert here.used(key_account("lab")) == pytest.approx(BUDGET - COST_1000 / 2)
    reservation.release()
    assert here.reserved(key_account("lab")) == 0


# ------------------------------------------------------------------ server-wide budget
def test_server_budget_is_one_persisted_ledger(tmp_path):
    """Before: counted per cached sampler (a new `beta_every` started a fresh counter, restarts
    reset it) and a spent budget was a 500 QPUBudgetExceeded. Now one ledger in the database."""
    state = tmp_path / "state.sqlite"
    config = {"keys": [{"name": "lab", "key": KEY}], "state_db": str(state),
              "backends": dwave_policy(tmp_path, qpu_time_budget_s=BUDGET, on_budget="stop")}
    with running_service(config) as url:
        codes = [httpx.post(f"{url}/v1/sample", headers=HEADERS, timeout=60,
                            json=rbm_body(seed=i, options={"beta_every": 10 + i})).status_code
                 for i in range(3)]
        assert codes == [200, 200, 429]
        same = httpx.post(f"{url}/v1/sample", headers=HEADERS, json=rbm_body(seed=9))
        assert same.status_code == 429 and same.json()["qpu_budget"]["scope"] == "server"
        assert "qpu_time_budget_s" in same.json()["detail"]
        own = httpx.post(f"{url}/v1/sample", headers=HEADERS,
                         json=rbm_body(options={"on_budget": "fallback"}))
        assert own.status_code == 403  # budgets are the service's, not the client's
    assert SQLiteStore(state).used(SERVER) == pytest.approx(2 * COST_1000)
    with running_service(config) as url:  # a restart does not refill it
        r = httpx.post(f"{url}/v1/sample", headers=HEADERS, json=rbm_body(seed=5))
        assert r.status_code == 429 and r.json()["qpu_budget"]["used_s"] == pytest.approx(
            2 * COST_1000)


# ------------------------------------------------------------------- unfetched results
def gibbs_job(num_samples):
    rbm = random_rbm(6, 6, seed=1)
    return {"backend": "gibbs", "num_samples": num_samples, "seed": 0, "mode": "job",
            "rbm": {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                    "hidden_bias": rbm.hidden_bias.tolist()}}


def wait_done(url, job_id):
    for _ in range(600):
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=HEADERS)
        if r.json()["status"] in ("done", "failed"):
            return r
        threading.Event().wait(0.05)
    raise AssertionError(f"job {job_id} never finished")


def test_unfetched_results_are_capped(tmp_path):
    """Before: 60 unfetched 100,000-sample results piled up without limit. Now new jobs get 429
    (with Retry-After) once stored + running results would pass max_stored_result_bytes;
    fetching frees the room. Nothing is evicted."""
    cap = 2**20
    state = tmp_path / "state.sqlite"
    config = {"keys": [{"key": KEY}], "state_db": str(state),
              "limits": {"max_stored_result_bytes": cap}}
    with running_service(config) as url:
        admitted, refused = [], None
        for _ in range(20):
            r = httpx.post(f"{url}/v1/sample", json=gibbs_job(5000), headers=HEADERS)
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 202, r.text
            admitted.append(r.json()["job_id"])
        assert refused is not None and 1 <= len(admitted) < 20
        assert "max_stored_result_bytes" in refused.json()["detail"]
        assert refused.headers["Retry-After"]
        assert SQLiteStore(state).result_bytes() <= cap
        first = httpx.get(f"{url}/v1/jobs/{admitted[0]}", headers=HEADERS)
        if first.json()["status"] != "done":  # still running: wait, this fetch delivers it
            first = wait_done(url, admitted[0])
        assert len(first.json()["result"]["samples"]) == 5000  # kept, not evicted
        for job_id in admitted[1:]:
            assert len(wait_done(url, job_id).json()["result"]["samples"]) == 5000
        assert SQLiteStore(state).result_bytes() == 0
        assert httpx.post(f"{url}/v1/sample", json=gibbs_job(5000),
                          headers=HEADERS).status_code == 202


def fill(scheduler, n, size):
    ids = []
    for i in range(n):
        job = scheduler.submit("k", "gibbs", "cpu", lambda job, i=i: b'{"n":%d,"pad":"%s"}' % (
            i, b"x" * size), inline=False)
        job.done.result(timeout=30)
        ids.append(job.id)
    return ids


@pytest.mark.parametrize("n_jobs", [3, 40])
def test_results_live_in_the_store_and_a_restart_reads_only_the_index(tmp_path, n_jobs):
    """Before: results sat in memory and a restart re-parsed and re-wrote every job file. Now a
    finished result leaves memory for the store, and a restart runs the same few statements,
    none of them reading result bytes, whatever the number of jobs; results load on fetch."""
    path = tmp_path / "state.sqlite"
    first = Scheduler({"cpu": (1, 64)}, ttl_s=600, store=SQLiteStore(path))
    ids = fill(first, n_jobs, 50_000)
    assert all(first.jobs[i].result is None and first.jobs[i].stored for i in ids)
    first.drain(0)

    store, statements = SQLiteStore(path), []
    store.db.set_trace_callback(statements.append)
    second = Scheduler({"cpu": (1, 4)}, ttl_s=600, store=store)
    # one transaction, whatever the number of jobs: BEGIN, dead holders, fail unfinished,
    # SELECT the index, COMMIT (nothing expired: no DELETE); no statement reads `results`
    assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "UPDATE", "SELECT",
                                                  "COMMIT"], statements
    assert not any("results" in s for s in statements)
    assert sorted(second.jobs) == sorted(ids)
    job = second.fetch(ids[-1], "k")
    assert job.result is None and json.loads(second.result_of(job))["n"] == n_jobs - 1
    second.deliver(job)
    assert store.job_result(ids[-1]) is None
    second.drain(0)


def test_a_job_finishing_during_a_poll_is_not_delivered_without_its_result(tmp_path):
    """Before (a CI failure, 1 in ~1000): the poll read the result (none yet: running), the job
    finished and left memory for the store, then the poll read the status, answered "done" with
    a null result and marked the job delivered: its samples were lost. Here the job finishes
    right after that first read; the poll must say "running" and the next one bring the
    result."""
    scheduler = Scheduler({"cpu": (1, 4)}, ttl_s=600, store=SQLiteStore(tmp_path / "s.sqlite"))
    release = threading.Event()
    job = scheduler.submit("k", "gibbs", "cpu",
                           lambda job: release.wait(30) and b'{"samples":[[1]]}', inline=False)
    while job.status != "running":
        threading.Event().wait(0.01)
    read_result = scheduler.result_of

    def result_then_finish(j):
        out = read_result(j)
        release.set()
        j.done.result(timeout=30)  # finished and moved to the store before the status is read
        return out

    scheduler.result_of = result_then_finish
    body, final = scheduler.status_body(job)
    polled = json.loads(body)
    assert (polled["status"], polled["result"], final) == ("running", None, False), polled
    release.set()
    job.done.result(timeout=30)
    scheduler.result_of = read_result
    body, final = scheduler.status_body(job)
    assert final and json.loads(body)["result"] == {"samples": [[1]]}
    scheduler.drain(0)


# ----------------------------------------------------------------------------- store
def test_reservations_are_atomic_across_threads_and_instances(tmp_path):
    """24 threads over two store instances on one file reserve 0.1 s against 1.0 s: exactly 10
    holds succeed (BEGIN IMMEDIATE makes read-check-write one step)."""
    path = tmp_path / "state.sqlite"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    barrier = threading.Barrier(24)

    def attempt(i):
        barrier.wait()
        try:
            stores[i % 2].reserve(f"r{i}", {"key:a": 1.0, SERVER: None}, 0.1)
            return True
        except BudgetRefused:
            return False

    with ThreadPoolExecutor(24) as pool:
        assert sum(pool.map(attempt, range(24))) == 10
    assert stores[0].reserved("key:a") == pytest.approx(1.0)
    assert stores[1].reserved(SERVER) == pytest.approx(1.0)  # held, though unlimited


def test_call_checks_charges_and_release(tmp_path):
    store = SQLiteStore(tmp_path / "state.sqlite")
    limits = {"key:a": 1.0}
    store.reserve("mine", limits, 0.3)
    store.reserve("other", limits, 0.5)
    store.admit_call("mine", limits, 0.5)  # 0 used + 0.5 others + 0.5 ≤ 1: raises the hold
    assert store.reserved("key:a") == pytest.approx(1.0)
    with pytest.raises(BudgetRefused) as info:
        store.admit_call("mine", limits, 0.6)
    assert (info.value.used_s, info.value.reserved_s, info.value.estimate_s) == (0, 0.5, 0.6)
    store.charge("mine", ["key:a", SERVER], 0.45, estimated_s=0.5)
    assert store.used("key:a") == store.used(SERVER) == pytest.approx(0.45)
    assert store.reserved("key:a") == pytest.approx(0.5)  # mine is down to 0
    store.release("other")
    store.release("other")  # idempotent
    assert store.reserved("key:a") == 0


def test_holds_of_a_dead_process_are_released(tmp_path):
    path = tmp_path / "state.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    store = SQLiteStore(path)
    store.holder = store.holder.rsplit(":", 1)[0] + ":" + dead
    store.reserve("crashed", {"key:a": 1.0}, 0.4)
    live = SQLiteStore(path)
    live.reserve("running", {"key:a": 1.0}, 0.2)
    assert live.release_dead() == 1
    assert live.reserved("key:a") == pytest.approx(0.2)


def test_ledger_refusal_is_a_429_with_figures(tmp_path):
    ledger = Ledger(SQLiteStore(None), server_budget_s=1.0)
    key = KeyConfig(key=KEY, name="lab", qpu_budget_s=None)
    ledger.reserve(key, 0.7)
    with pytest.raises(QPUBudgetRefused) as info:
        ledger.reserve(key, 0.4)
    assert isinstance(info.value, ServiceError) and info.value.status_code == 429
    assert info.value.body["qpu_budget"] == {"scope": "server", "key": "lab", "used_s": 0.0,
                                             "reserved_s": 0.7, "estimate_s": 0.4,
                                             "limit_s": 1.0}


# ------------------------------------------------------------------------------ files
def serve_main(tmp_path, capsys, **config):
    from qvae.cli import main

    path = tmp_path / "service.yaml"
    path.write_text(json.dumps({"keys": [{"key": KEY}], "port": 0, **config}))
    code = main(["serve", "--config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content", [
    b"", b"\x00garbage" * 4096, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_corrupt_state_db_stops_serve_with_one_line(tmp_path, capsys, content):
    bad = tmp_path / "state.sqlite"
    bad.write_bytes(content)
    if not content:  # an empty file is a valid empty database: make it another program's
        with sqlite3.connect(bad) as db:
            db.execute("CREATE TABLE other (x)")
    code, err = serve_main(tmp_path, capsys, state_db=str(bad))
    assert code == 2 and str(bad) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "new file" in err or "move it aside" in err


def test_store_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"not a database at all" * 500)
    with pytest.raises(StoreError, match=r"x\.sqlite is unreadable .*move it aside"):
        SQLiteStore(bad)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(newer)


def test_old_json_ledger_is_imported_once_or_refused_in_one_line(tmp_path, capsys):
    from qvae.service.app import create_app
    from qvae.service.settings import ServiceConfig

    old = tmp_path / "ledger.json"
    old.write_text(json.dumps({"lab": 0.25}))
    state = tmp_path / "state.sqlite"
    config = ServiceConfig(keys=[{"key": KEY, "name": "lab"}], state_db=state, ledger_path=old)
    create_app(config)
    assert SQLiteStore(state).used(key_account("lab")) == 0.25
    assert not old.exists() and (tmp_path / "ledger.json.imported").exists()
    create_app(config)  # nothing left to import: not counted twice
    assert SQLiteStore(state).used(key_account("lab")) == 0.25

    capsys.readouterr()
    old.write_text("{ half a ledger")
    code, err = serve_main(tmp_path, capsys, state_db=str(state), ledger_path=str(old))
    assert code == 2 and str(old) in err and len(err.strip().splitlines()) == 1


def test_jobs_dir_is_refused_naming_the_replacement(tmp_path, capsys):
    code, err = serve_main(tmp_path, capsys, jobs_dir=str(tmp_path / "jobs"))
    assert code == 2 and "jobs_dir is replaced by state_db" in err


def test_a_restart_adopts_jobs_of_dead_processes_only(tmp_path):
    import os

    from qvae.service.store import JobRecord

    path = tmp_path / "state.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = SQLiteStore(path).holder.rsplit(":", 1)[0]
    for name, pid in (("dead", dead), ("live", str(os.getppid()))):
        store = SQLiteStore(path)
        store.holder = f"{host}:{pid}"
        store.put_job(JobRecord(name, "k", "gibbs", "cpu", None, "running", 1.0, 2.0, None,
                                None, 0))
    adopted = SQLiteStore(path).adopt_jobs({"status_code": 503, "detail": "stopped"}, 3.0)
    assert [(r.id, r.status, r.finished_at) for r in adopted] == [("dead", "failed", 3.0)]
    with sqlite3.connect(path) as db:  # the live process's job is left alone
        assert db.execute("SELECT status FROM jobs WHERE id = 'live'").fetchone() == ("running",)
