"""Sampler throughput on a complete 4-partite Boltzmann machine against a bipartite RBM with the
same number of units (issue 13: gibbs within 2x of the bipartite kernel's spin updates per second):

- `4-partite 4x64`: `qvae.boltzmann_graphs.multipartite([64] * 4)`, every inter-part pair coupled
  (24,576 couplings), four colour classes;
- `RBM 128x128`: the bipartite model with 256 units too (16,384 couplings).

Both have couplings and biases ~ N(0, 0.1^2). Rows, each on both models with 1,024 chains:

- `gibbs kernel`: the raw kernels, `backends.gibbs.colour_gibbs_sweeps` (4-partite) and
  `backends.gibbs.gibbs_sweeps` (RBM);
- `gibbs (backend)`: `backends.get_sampler("gibbs", num_chains=1024)`, steady state (after its
  burn-in), whole `sample()` calls;
- `neal (backend)`: dwave-samplers SA at fixed β (reads = chains), as a reference.

    python benchmarks/boltzmann.py [--quick] [--out benchmarks/results/boltzmann.json]
                                   [--threads N] [--repeats N] [--sweeps N]

A spin update is one unit redrawn in one chain: chains x sweeps x units per run, the same count
for both models. Runs are interleaved across rows so that load from other processes hits them
alike, and the best repeat is reported (the median is in the JSON). `x RBM` is the 4-partite
rate over the RBM's for the same row (the issue's target: at least 0.5 for gibbs). torch runs
with one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samplers import machine_info, write_result  # noqa: E402  (benchmarks/samplers.py, this directory)

import backends  # noqa: E402
from backends.gibbs import colour_blocks, colour_gibbs_sweeps, gibbs_sweeps  # noqa: E402
from qvae.boltzmann import BoltzmannMachine  # noqa: E402
from qvae.boltzmann_graphs import multipartite  # noqa: E402
from qvae.rbm import RBM  # noqa: E402

CHAINS = 1024
PARTS, LAYER = (64, 64, 64, 64), 128
STD = 0.1

Model = RBM | BoltzmannMachine


def make_models(seed: int = 0) -> dict[str, Model]:
    gen = torch.Generator().manual_seed(seed)
    bm = multipartite(list(PARTS), seed=seed, scale=STD)
    rbm = RBM(LAYER, LAYER, init_std=STD, seed=seed)
    with torch.no_grad():
        bm.bias.normal_(0.0, STD, generator=gen)
        rbm.visible_bias.normal_(0.0, STD, generator=gen)
        rbm.hidden_bias.normal_(0.0, STD, generator=gen)
    return {"4-partite 4x64": bm, "RBM 128x128": rbm}


class Bench:
    """One row: `run()` is one timed unit of work, `chains` x `sweeps` sweeps."""

    def __init__(self, backend: str, model_name: str, model: Model, chains: int,
                 sweeps: int) -> None:
        self.backend, self.model_name, self.model = backend, model_name, model
        self.chains, self.sweeps = chains, sweeps
        self.times: list[float] = []
        self.mean_energy: float | None = None

    @property
    def updates_per_run(self) -> int:
        return self.chains * self.sweeps * self.model.n_units

    def warm(self) -> None:
        self.run()

    def run(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def timed(self) -> None:
        start = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - start)


class KernelBench(Bench):
    def __init__(self, model_name: str, model: Model, sweeps: int) -> None:
        super().__init__("gibbs kernel", model_name, model, CHAINS, sweeps)
        self.gen = torch.Generator().manual_seed(0)
        if isinstance(model, RBM):
            self.params = [p.detach() for p in (model.weight, model.visible_bias,
                                                model.hidden_bias)]
            self.state = torch.bernoulli(torch.full((CHAINS, model.n_hidden), 0.5),
                                         generator=self.gen)
        else:
            self.order, self.blocks = colour_blocks(model, 1.0, torch.device("cpu"),
                                                    torch.float32)
            self.state = torch.bernoulli(torch.full((model.n_units, CHAINS), 0.5),
                                         generator=self.gen)

    def run(self) -> None:
        if isinstance(self.model, RBM):
            self.v, self.state = gibbs_sweeps(self.state, *self.params, self.sweeps, self.gen)
        else:
            self.state = colour_gibbs_sweeps(self.state, self.blocks, self.sweeps, self.gen)

    def finish(self) -> None:
        if isinstance(self.model, RBM):
            self.mean_energy = float(self.model.sample_energy(self.v, self.state).mean())
        else:
            z = torch.empty_like(self.state.T)
            z[:, self.order] = self.state.T
            self.mean_energy = float(self.model.sample_energy(z).mean())


class BackendBench(Bench):
    def __init__(self, name: str, model_name: str, model: Model, chains: int, sweeps: int,
                 **options: Any) -> None:
        super().__init__(f"{name} (backend)", model_name, model, chains, sweeps)
        self.sampler = backends.get_sampler(name, num_sweeps=sweeps, **options)
        self.seed: int | None = 0
        self.gibbs = name == "gibbs"

    def run(self) -> None:
        self.out = self.sampler.sample(self.model, self.chains, seed=self.seed)
        if self.gibbs:
            self.seed = None  # seed once; later calls continue the persistent chains
        else:
            self.seed = len(self.times) + 1

    def finish(self) -> None:
        self.mean_energy = float(self.out.energy.mean())


def measure(makers: list[Callable[[], Bench]], repeats: int) -> list[Bench]:
    benches = [make() for make in makers]
    for bench in benches:
        bench.warm()  # gibbs: the burn-in call
    for _ in range(repeats):
        for bench in benches:
            bench.timed()
    with torch.no_grad():
        for bench in benches:
            bench.finish()
    return benches


def row(bench: Bench) -> dict[str, Any]:
    best, median = min(bench.times), statistics.median(bench.times)
    return {
        "backend": bench.backend, "model": bench.model_name, "units": bench.model.n_units,
        "chains": bench.chains, "sweeps_per_run": bench.sweeps,
        "spin_updates_per_run": bench.updates_per_run,
        "spin_updates_per_s": bench.updates_per_run / best,
        "spin_updates_per_s_median": bench.updates_per_run / median,
        "mean_energy": bench.mean_energy, "times_s": bench.times,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("backend", "model", "chains", "sweeps/run", "spin updates/s", "x RBM", "mean E")
    lines = [(r["backend"], r["model"], str(r["chains"]), str(r["sweeps_per_run"]),
              f"{r['spin_updates_per_s']:.3g}",
              "-" if r.get("ratio_to_rbm") is None else f"{r['ratio_to_rbm']:.2f}",
              f"{r['mean_energy']:.2f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under ~30 s)")
    parser.add_argument("--out", default="benchmarks/results/boltzmann.json", help="JSON path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for this run (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row")
    parser.add_argument("--sweeps", type=int, default=10, help="Gibbs sweeps per run")
    parser.add_argument("--neal-sweeps", type=int, default=200,
                        help="sweeps per neal read (default 200, the backend's default)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.sweeps < 1 or args.neal_sweeps < 1:
        parser.error("--threads, --sweeps and --neal-sweeps must be >= 1")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    reads = 64 if args.quick else 512

    started = time.perf_counter()
    info = machine_info(torch.device("cpu"))
    load = info.get("load_average_at_start")
    print(f"torch {info['torch']}, {info['torch_threads']} thread(s), {info['cpu_count']} CPUs "
          f"({info['cpu_model']}); {repeats} repeats, best shown"
          + (f"; load average {load[0]:.2f}" if load else ""))
    models = make_models()
    makers: list[Callable[[], Bench]] = []
    for name, model in models.items():
        makers += [
            lambda n=name, m=model: KernelBench(n, m, args.sweeps),
            lambda n=name, m=model: BackendBench("gibbs", n, m, CHAINS, args.sweeps,
                                                 num_chains=CHAINS, burn_in=100),
            lambda n=name, m=model: BackendBench("neal", n, m, reads, args.neal_sweeps),
        ]
    rows = [row(b) for b in measure(makers, repeats)]
    rbm_name = "RBM 128x128"
    for r in rows:
        ref = next(x for x in rows if x["backend"] == r["backend"] and x["model"] == rbm_name)
        r["ratio_to_rbm"] = r["spin_updates_per_s"] / ref["spin_updates_per_s"]
    rows.sort(key=lambda r: (r["backend"], r["model"]))
    print()
    print(format_table(rows))
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    result = {
        "machine": info,
        "config": {"quick": args.quick, "repeats": repeats, "chains": CHAINS,
                   "parts": PARTS, "rbm": [LAYER, LAYER], "std": STD,
                   "gibbs_sweeps": args.sweeps, "neal_sweeps": args.neal_sweeps,
                   "neal_reads": reads, "threads": args.threads,
                   "reported": "best of the repeats (median also given)"},
        "results": rows,
        "wall_s": time.perf_counter() - started,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
