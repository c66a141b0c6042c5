"""Small Gibbs requests through the sampler service versus the same backend in-process, on loopback.

    python benchmarks/service.py             # 16x16, 100x100; 1 and 8 clients; ~1 min on 2 cores
    python benchmarks/service.py --quick     # 100 requests per cell instead of 500: ~20 s
    python benchmarks/service.py --sizes 16x16 --concurrency 1,2,4,8 --workers 4 --requests 1000

A trainer using `backend.name=remote` makes one small request per step (its negative phase: here
100 samples, 50 burn-in + 5 sweeps of fresh chains). For such a request the sampling itself takes
milliseconds, so what the service adds around it decides whether remote sampling is usable: the
HTTP round trip, validating the RBM (`list[list[float]]` through pydantic), the job queue, and the
samples travelling back as JSON lists (then, in the `remote` backend, tensors again and energies
recomputed). This script measures that, side by side in one run, for three paths per RBM size and
client concurrency (client threads, one keep-alive `httpx.Client` / `RemoteSampler` each):

- `in-process`: `backends.get_sampler("gibbs", **opts).sample(rbm, n, seed=s)` in the client
  threads, a fresh sampler per call as the service does, torch with one thread;
- `service (raw HTTP)`: POST /v1/sample with a JSON body built per request (the RBM part is
  serialised once), the JSON response parsed: the least a client can do;
- `remote backend`: `backends.get_sampler("remote", target="gibbs", ...).sample(...)`, what a
  trainer calls: RBM tensors to JSON, samples back to tensors, energies recomputed.

The service runs as its own process (`python -m qvae serve`, `limits.cpu_workers` = --workers, one
torch thread per sampling call, a queue long enough that nothing is refused). Every path samples
the same float64 RBM (the service builds float64 RBMs) with the same seeds, so all do identical
sampling work. Reported per path: requests per second over a fixed number of requests after a
warm-up, the ratio of that to in-process, latency p50 / p99 / mean, the server's own sampling time
(`info.timing.total_s`; for in-process, the sampler's) and queue wait (`info.queue_wait_s`), and the
p50 overhead over in-process. Client and server share this machine's cores, as they would when a
trainer talks to a service on its own host. With more client threads than cores the in-process
calls also contend for the GIL and the cores (its rate at 8 clients can be below that at 1), so
ratios at high concurrency are kinder to the service than a single-threaded trainer would see.
Writes JSON (default benchmarks/results/service.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from threading import BrokenBarrierError
from typing import Any

import httpx
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import backends  # noqa: E402
from backends.testing import random_rbm  # noqa: E402
from qvae.rbm import RBM  # noqa: E402

PATHS = ("in-process", "service (raw HTTP)", "remote backend")
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

# one request: seed -> named durations in seconds, e.g. "sample" (the backend's own sampling time:
# info.timing.total_s), "queue" (info.queue_wait_s), "service" (info.service_s: admitted to
# sampled; the encoding of the result comes after it), "client_pre" / "client_http" /
# "client_post" (the remote backend's own timing)
Call = Callable[[int], dict[str, float]]


# ----------------------------------------------------------------------------------- service
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_config(workers: int, queue: int) -> dict[str, Any]:
    return {"host": "127.0.0.1",
            "limits": {"cpu_workers": workers, "cpu_queue": queue, "torch_threads": 1}}


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode} on startup")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service at {url} was not healthy within {timeout_s:g} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_service(workers: int, queue: int, key: str) -> Iterator[str]:
    """`python -m qvae serve` in its own process on a free loopback port; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="qvae-bench-") as tmp:
        config = Path(tmp) / "service.yaml"
        config.write_text(yaml.safe_dump(service_config(workers, queue)))
        port = free_port()
        env = {**os.environ, "QVAE_API_KEYS": key,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        log = (Path(tmp) / "service.log").open("w+")
        cmd = [sys.executable, "-m", "qvae", "serve", "--config", str(config),
               "--port", str(port), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_healthy(url, proc, STARTUP_TIMEOUT_S)
            except RuntimeError:
                log.seek(0)
                print(log.read()[-4000:], file=sys.stderr)
                raise
            yield url
        finally:
            stop(proc)
            log.close()


# ----------------------------------------------------------------------------------- paths
def rbm_json(rbm: RBM) -> str:
    return json.dumps({"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                       "hidden_bias": rbm.hidden_bias.tolist()})


def server_times(info: dict[str, Any], timing: str) -> dict[str, float]:
    return {"sample": info[timing]["total_s"], "queue": info["queue_wait_s"],
            "service": info["service_s"]}


def in_process_call(rbm: RBM, n: int, opts: dict[str, Any]) -> Callable[[], Call]:
    def make() -> Call:
        def call(seed: int) -> dict[str, float]:
            out = backends.get_sampler("gibbs", **opts).sample(rbm, n, seed=seed)
            return {"sample": out.info["timing"]["total_s"]}
        return call
    return make


def raw_http_call(url: str, key: str, rbm: RBM, n: int, opts: dict[str, Any]
                  ) -> Callable[[], Call]:
    rbm_part = rbm_json(rbm)  # serialised once; the rest of the body is built per request
    options = json.dumps(opts)

    def make() -> Call:
        client = httpx.Client(headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "application/json"}, timeout=60.0)

        def call(seed: int) -> dict[str, float]:
            body = (f'{{"backend":"gibbs","num_samples":{n},"seed":{seed},'
                    f'"options":{options},"rbm":{rbm_part}}}').encode()
            r = client.post(url + "/v1/sample", content=body)
            if r.status_code != 200:
                raise RuntimeError(f"POST /v1/sample answered {r.status_code}: {r.text[:300]}")
            return server_times(r.json()["info"], "timing")
        return call
    return make


def remote_call(url: str, key: str, rbm: RBM, n: int, opts: dict[str, Any]
                ) -> Callable[[], Call]:
    def make() -> Call:
        sampler = backends.get_sampler("remote", url=url, target="gibbs", options=opts,
                                       api_key=key, max_retries=0)

        def call(seed: int) -> dict[str, float]:
            info = sampler.sample(rbm, n, seed=seed).info
            client = info["timing"]
            return {**server_times(info, "server_timing"),
                    "client_pre": client["preprocess_s"], "client_http": client["sample_s"],
                    "client_post": client["postprocess_s"]}
        return call
    return make


def check_same_samples(url: str, key: str, rbm: RBM, n: int, opts: dict[str, Any]) -> None:
    """The service must do exactly the in-process work: same seed, same samples."""
    local = backends.get_sampler("gibbs", **opts).sample(rbm, n, seed=7)
    remote = backends.get_sampler("remote", url=url, target="gibbs", options=opts,
                                  api_key=key).sample(rbm, n, seed=7)
    if not torch.equal(local.states, remote.states):
        raise RuntimeError("the service's samples differ from the in-process backend's")


# ----------------------------------------------------------------------------------- timing
def measure(make: Callable[[], Call], concurrency: int, requests: int, warmup: int,
            seed0: int) -> dict[str, Any]:
    """`requests` calls from `concurrency` threads (each its own client), after `warmup` calls;
    threads take the next seed from a shared counter, so a fast thread does more requests."""
    lock = threading.Lock()
    seeds = iter(range(seed0, seed0 + warmup + requests))
    start = threading.Barrier(concurrency + 1)
    warm_left = [warmup]

    def next_seed() -> int | None:
        with lock:
            return next(seeds, None)

    def warm_seed() -> int | None:
        with lock:
            if warm_left[0] <= 0:
                return None
            warm_left[0] -= 1
            return next(seeds)

    def worker() -> list[tuple[float, dict[str, float]]]:
        try:
            # per thread: MKL reads OpenMP's per-thread setting, so without this a matmul in a
            # new thread uses every core whatever the main thread set (and stalls, under load)
            torch.set_num_threads(1)
            call = make()
            while (seed := warm_seed()) is not None:  # the warm-up, shared by the threads
                call(seed)
        except BaseException:
            start.abort()  # release the others; the error surfaces from f.result()
            raise
        start.wait()
        out = []
        while (seed := next_seed()) is not None:
            t = time.perf_counter()
            times = call(seed)
            out.append((time.perf_counter() - t, times))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        with suppress(BrokenBarrierError):
            start.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    rows = [r for rs in results for r in rs]
    return summarize(rows, wall)


def summarize(rows: list[tuple[float, dict[str, float]]], wall: float) -> dict[str, Any]:
    lat = np.array([r[0] for r in rows])
    out: dict[str, Any] = {
        "requests": len(rows), "wall_s": wall, "req_per_s": len(rows) / wall,
        "p50_ms": float(np.percentile(lat, 50)) * 1e3,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3, "mean_ms": float(lat.mean()) * 1e3,
        "sample_p50_ms": None, "queue_p50_ms": None}
    for name in rows[0][1]:
        out[f"{name}_p50_ms"] = float(np.median([r[1][name] for r in rows])) * 1e3
    return out


# ----------------------------------------------------------------------------------- run
def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        nv, _, nh = part.strip().lower().partition("x")
        out.append((int(nv), int(nh)))
    return out


def run_cell(makers: dict[str, Callable[[], Call]], label: str, concurrency: int,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in PATHS:
        stats = measure(makers[path], concurrency, args.requests, args.warmup, args.seed)
        row = {"rbm": label, "concurrency": concurrency, "path": path, **stats}
        base = rows[0] if rows else row
        row["overhead_p50_ms"] = row["p50_ms"] - base["p50_ms"]
        row["throughput_ratio"] = row["req_per_s"] / base["req_per_s"]
        rows.append(row)
        print_row(row)
    return rows


def run(args: argparse.Namespace, key: str) -> list[dict[str, Any]]:
    opts = {"num_sweeps": args.num_sweeps, "burn_in": args.burn_in}
    n = args.num_samples
    rows: list[dict[str, Any]] = []
    with running_service(args.workers, args.queue, key) as url:
        print(f"service at {url} (cpu_workers {args.workers}); client torch threads "
              f"{torch.get_num_threads()}\n")
        print_header()
        for nv, nh in parse_sizes(args.sizes):
            rbm = random_rbm(nv, nh, seed=0).float64_copy()
            check_same_samples(url, key, rbm, n, opts)
            makers = {"in-process": in_process_call(rbm, n, opts),
                      "service (raw HTTP)": raw_http_call(url, key, rbm, n, opts),
                      "remote backend": remote_call(url, key, rbm, n, opts)}
            for c in args.concurrency:
                rows += run_cell(makers, f"{nv}x{nh}", c, args)
    return rows


# ----------------------------------------------------------------------------------- output
COLUMNS = (("rbm", 8, "s"), ("clients", 7, "d"), ("path", 18, "s"), ("req/s", 8, ".1f"),
           ("x in-proc", 9, ".3f"), ("p50 ms", 8, ".2f"), ("p99 ms", 8, ".2f"),
           ("mean ms", 8, ".2f"), ("sample ms", 9, ".2f"), ("queue ms", 8, ".2f"),
           ("overhead ms", 11, ".2f"))
KEYS = ("rbm", "concurrency", "path", "req_per_s", "throughput_ratio", "p50_ms", "p99_ms",
        "mean_ms", "sample_p50_ms", "queue_p50_ms", "overhead_p50_ms")


def print_header() -> None:
    print(" ".join(f"{name:<{w}s}" if fmt == "s" else f"{name:>{w}s}"
                   for name, w, fmt in COLUMNS))
    print(" ".join("-" * w for _, w, _ in COLUMNS))


def print_row(row: dict[str, Any]) -> None:
    cells = []
    for (_, w, fmt), key in zip(COLUMNS, KEYS, strict=True):
        val = row[key]
        if val is None:
            cells.append(f"{'-':>{w}s}")
        elif fmt == "s":
            cells.append(f"{val:<{w}s}")
        else:
            cells.append(f"{val:>{w}{fmt}}")
    print(" ".join(cells), flush=True)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for base in (r for r in rows if r["path"] == "in-process"):
        cell = [r for r in rows if r["rbm"] == base["rbm"]
                and r["concurrency"] == base["concurrency"] and r["path"] != "in-process"]
        who = f"{base['concurrency']} client{'s' if base['concurrency'] > 1 else ''}"
        for r in cell:
            rest = r["p50_ms"] - (r["sample_p50_ms"] or 0.0) - (r["queue_p50_ms"] or 0.0)
            lines.append(
                f"{base['rbm']}, {who}, {r['path']}: adds {r['overhead_p50_ms']:.2f} ms per "
                f"request (p50 {r['p50_ms']:.2f} vs {base['p50_ms']:.2f} ms) and runs at "
                f"{r['throughput_ratio']:.2f}x the in-process rate; of its p50, sampling "
                f"{r['sample_p50_ms']:.2f} ms, queue {r['queue_p50_ms']:.2f} ms, HTTP/JSON/"
                f"validation and the rest {rest:.2f} ms")
    return lines


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "client_torch_threads": torch.get_num_threads(),
            **{dist: version(dist) for dist in ("httpx", "fastapi", "uvicorn", "pydantic")},
            # uvicorn uses these when installed (uvloop event loop, httptools parser)
            "uvloop": importlib.util.find_spec("uvloop") is not None,
            "httptools": importlib.util.find_spec("httptools") is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="16x16,100x100", help="RBM sizes NVxNH, comma-separated")
    p.add_argument("--num-samples", type=int, default=100, help="samples per request")
    p.add_argument("--num-sweeps", type=int, default=5, help="gibbs num_sweeps")
    p.add_argument("--burn-in", type=int, default=50, help="gibbs burn_in")
    p.add_argument("--requests", type=int, help="timed requests per path and cell (default 500; "
                   "100 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed requests first (default 20; 5 with "
                   "--quick)")
    p.add_argument("--concurrency", default="1,8", help="client threads, comma-separated")
    p.add_argument("--workers", type=int, default=2, help="the service's limits.cpu_workers")
    p.add_argument("--queue", type=int, default=1024, help="the service's limits.cpu_queue")
    p.add_argument("--seed", type=int, default=1000, help="first request seed")
    p.add_argument("--quick", action="store_true", help="100 requests, 5 warm-up")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/service.json")
    args = p.parse_args()
    if args.requests is None:
        args.requests = 100 if args.quick else 500
    if args.warmup is None:
        args.warmup = 5 if args.quick else 20
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or args.warmup < 0 or min(args.concurrency) < 1:
        raise SystemExit("--requests must be >= 1, --warmup >= 0, --concurrency values >= 1")
    if args.queue < max(args.concurrency):
        raise SystemExit("--queue must be at least the largest --concurrency (no 429s)")
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows = run(args, secrets.token_hex(16))
    total = time.perf_counter() - start
    lines = summary_lines(rows)
    print()
    print("\n".join(lines))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"rows": rows, "summary": lines, "settings": settings,
              "gibbs_options": {"num_sweeps": args.num_sweeps, "burn_in": args.burn_in},
              "service_config": service_config(args.workers, args.queue),
              "machine": machine_info(), "total_seconds": total,
              "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\ntotal {total:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
