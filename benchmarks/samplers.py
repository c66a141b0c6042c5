"""Sampler throughput, side by side in one run, on the same dense RBMs (64x64 and 100x100,
couplings and biases ~ N(0, 0.1^2)) with 1,024 chains:

- `gibbs kernel`: the raw kernel `backends.gibbs.gibbs_sweeps`;
- `gibbs (backend)`: `backends.get_sampler("gibbs", num_chains=1024)`, steady state (after its
  burn-in), whole `sample()` calls;
- `naive torch Gibbs`: the textbook loop (sigmoid + torch.bernoulli), for reference;
- `neal (backend)`: `backends.get_sampler("neal")`, dwave-samplers SA at fixed β (chains = reads);
- `plugin ...`: dwave-pytorch-plugin's BipartiteGibbsSampler and BlockSampler on a GRBM holding
  the same model in spin form (timed on fewer sweeps per call: they are slow; rates are per sweep).

    python benchmarks/samplers.py [--quick] [--out benchmarks/results/samplers.json]
                                  [--device cpu|cuda] [--threads N] [--repeats N]

Metrics: spin updates per second (chains x units x sweeps / wall time), the ratio of that to
neal's, and wall seconds per 10,000 samples, a sample being one chain state `sweeps/sample`
sweeps after the previous one (persistent chains) or one independent read of that many sweeps
(neal). Measurements are repeated, interleaved across backends so that load from other processes
hits them alike, and the best repeat is reported (the median is in the JSON). The mean energy per
sample is a cheap check that all of them sample the same distribution. On a machine shared with
other jobs, torch's multi-threaded ops can stall badly; compare with `--threads 1`.

The plugin needs `pip install --no-deps dwave-pytorch-plugin==0.4.0` (a plain install may swap
the installed torch for another build) plus its small imports (einops, dwave-hybrid); when it
cannot be imported its rows say why and the rest still runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
from backends.gibbs import gibbs_sweeps  # noqa: E402
from qvae.rbm import RBM  # noqa: E402

CHAINS = 1024
MODELS = ((64, 64), (100, 100))
COUPLING_STD, BIAS_STD = 0.1, 0.1
PER_SAMPLES = 10_000


# ----------------------------------------------------------------------------------- helpers
def make_rbm(nv: int, nh: int, seed: int = 0) -> RBM:
    rbm = RBM(nv, nh, init_std=COUPLING_STD, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rbm.visible_bias.normal_(0.0, BIAS_STD, generator=gen)
        rbm.hidden_bias.normal_(0.0, BIAS_STD, generator=gen)
    return rbm


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {d: version(d) for d in
                     ("numpy", "dimod", "dwave-samplers", "dwave-pytorch-plugin")},
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


# ------------------------------------------------------------------------------- benchmarks
class Bench:
    """One row of the table. `run()` is one timed unit of work: `sweeps_per_run` sweeps of
    `chains` chains (or reads); `warm()` runs before any timing; `finish()` sets the mean
    energy of the last samples. Rates are reported at `sweeps_per_sample` sweeps per sample
    (equal to `sweeps_per_run` except for the slow plugin samplers, timed on fewer sweeps)."""

    backend: str
    chains: int
    sweeps_per_run: int
    sweeps_per_sample: int

    def __init__(self, rbm: RBM, device: torch.device) -> None:
        self.rbm, self.device = rbm, device
        self.times: list[float] = []
        self.mean_energy: float | None = None
        self.extra: dict[str, Any] = {}

    @property
    def updates_per_run(self) -> int:
        return self.chains * self.sweeps_per_run * self.rbm.n_units

    def warm(self) -> None:
        self.run()

    def run(self) -> None:
        raise NotImplementedError

    def timed(self) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self.run()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)


class KernelBench(Bench):
    """The raw kernel `backends.gibbs.gibbs_sweeps`, nothing around it."""

    backend = "gibbs kernel"

    def __init__(self, rbm: RBM, device: torch.device, sweeps: int) -> None:
        super().__init__(rbm, device)
        self.chains, self.sweeps_per_run = CHAINS, sweeps
        self.sweeps_per_sample = sweeps
        self.params = [p.detach().to(device) for p in
                       (rbm.weight, rbm.visible_bias, rbm.hidden_bias)]
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.h = torch.bernoulli(torch.full((CHAINS, rbm.n_hidden), 0.5, device=device),
                                 generator=self.gen)

    def run(self) -> None:
        self.v, self.h = gibbs_sweeps(self.h, *self.params, self.sweeps_per_run, self.gen)

    def finish(self) -> None:
        self.mean_energy = float(self.rbm.energy(self.v.cpu(), self.h.cpu()).mean())


class NaiveBench(KernelBench):
    """Reference: the textbook torch loop (sigmoid + torch.bernoulli, fresh tensors each step)."""

    backend = "naive torch Gibbs"

    def run(self) -> None:
        w, b, c = self.params
        h = self.h
        for _ in range(self.sweeps_per_run):
            v = torch.bernoulli(torch.sigmoid(torch.addmm(b, h, w.T)), generator=self.gen)
            h = torch.bernoulli(torch.sigmoid(torch.addmm(c, v, w)), generator=self.gen)
        self.v, self.h = v, h


class GibbsBench(Bench):
    """Our `gibbs` backend: persistent chains, one call = `sweeps` sweeps of every chain."""

    backend = "gibbs (backend)"

    def __init__(self, rbm: RBM, device: torch.device, sweeps: int) -> None:
        super().__init__(rbm, device)
        self.chains, self.sweeps_per_run, self.sweeps_per_sample = CHAINS, sweeps, sweeps
        self.rbm_dev = copy.deepcopy(rbm).to(device)
        self.sampler = backends.get_sampler("gibbs", num_chains=CHAINS, num_sweeps=sweeps,
                                            burn_in=100, device=str(device))
        self.seed: int | None = 0

    def run(self) -> None:
        self.out = self.sampler.sample(self.rbm_dev, CHAINS, seed=self.seed)
        self.seed = None  # seed once; later calls continue the persistent chains
        self.extra.setdefault("sweeps_only_s", []).append(self.out.info["timing"]["sample_s"])

    def finish(self) -> None:
        self.mean_energy = float(self.out.energy.mean())
        self.extra["sweeps_only_s"] = self.extra["sweeps_only_s"][1:]  # drop the burn-in call


class NealBench(Bench):
    """Our `neal` backend: dwave-samplers SA at fixed β, independent reads."""

    backend = "neal (backend)"

    def __init__(self, rbm: RBM, device: torch.device, sweeps: int, reads: int) -> None:
        super().__init__(rbm, device)
        self.chains, self.sweeps_per_run, self.sweeps_per_sample = reads, sweeps, sweeps
        self.sampler = backends.get_sampler("neal", num_sweeps=sweeps)

    def warm(self) -> None:
        self.sampler.sample(self.rbm, 8, seed=0)

    def run(self) -> None:
        self.out = self.sampler.sample(self.rbm, self.chains, seed=len(self.times))

    def finish(self) -> None:
        self.mean_energy = float(self.out.energy.mean())


def plugin_import() -> tuple[Any, Any, Any]:
    """(GRBM, BipartiteGibbsSampler or None, BlockSampler) from dwave-pytorch-plugin."""
    from dwave.plugins.torch.models.boltzmann_machine import GraphRestrictedBoltzmannMachine
    from dwave.plugins.torch.samplers import BlockSampler

    try:  # 0.4.0 ships it but does not export it from dwave.plugins.torch.samplers
        from dwave.plugins.torch.samplers.bipartite_sampler import BipartiteGibbsSampler
    except ImportError:
        BipartiteGibbsSampler = None
    return GraphRestrictedBoltzmannMachine, BipartiteGibbsSampler, BlockSampler


class PluginBench(Bench):
    """A dwave-pytorch-plugin sampler on a GRBM holding the same model in spin form."""

    def __init__(
        self, rbm: RBM, device: torch.device, sweeps: int, timed_sweeps: int, kind: str
    ) -> None:
        super().__init__(rbm, device)
        self.chains, self.sweeps_per_run, self.sweeps_per_sample = CHAINS, timed_sweeps, sweeps
        grbm_cls, bipartite_cls, block_cls = plugin_import()
        nv, nh = rbm.n_visible, rbm.n_hidden
        linear, quadratic, _ = rbm.to_ising()  # E(z) = Σ h s + Σ J s s + offset, s = 2z - 1
        edges = [(i, nv + j) for i in range(nv) for j in range(nh)]
        grbm = grbm_cls(range(nv + nh), edges, hidden_nodes=range(nv, nv + nh))
        coupling = [quadratic.get((i, j), quadratic.get((j, i), 0.0)) for i, j in edges]
        with torch.no_grad():
            grbm.linear.copy_(torch.tensor([linear[k] for k in range(nv + nh)]))
            grbm.quadratic.copy_(torch.tensor(coupling))
            z = torch.randint(0, 2, (8, nv + nh), generator=torch.Generator().manual_seed(0))
            gap = grbm(2.0 * z - 1) - rbm.energy(z[:, :nv].float(), z[:, nv:].float())
            if float(gap.max() - gap.min()) > 1e-3 * (1 + float(gap.abs().max())):
                raise RuntimeError("the GRBM does not hold the RBM's energy (spin mapping bug)")
        schedule = [1.0] * timed_sweeps  # one sample() call = len(schedule) sweeps
        if kind == "bipartite":
            if bipartite_cls is None:
                raise ImportError("this plugin version has no BipartiteGibbsSampler")
            self.backend = "plugin BipartiteGibbsSampler"
            sampler = bipartite_cls(grbm, num_chains=CHAINS, schedule=schedule, seed=0)
        else:
            self.backend = "plugin BlockSampler"
            sampler = block_cls(grbm, lambda node: int(node >= nv), num_chains=CHAINS,
                                schedule=schedule, seed=0)
        grbm.to(device)
        self.sampler = sampler.to(device) if device.type != "cpu" else sampler

    def run(self) -> None:
        self.spins = self.sampler.sample()

    def finish(self) -> None:
        z = (self.spins.float().cpu() + 1) / 2
        nv = self.rbm.n_visible
        self.mean_energy = float(self.rbm.energy(z[:, :nv], z[:, nv:]).mean())


# ------------------------------------------------------------------------------------ main
def measure(
    makers: list[tuple[str, Callable[[], Bench], bool]], repeats: int
) -> tuple[list[Bench], dict[str, str]]:
    """Build and warm every (name, maker, optional) bench, then time them interleaved."""
    benches, unavailable = [], {}
    for name, make, optional in makers:
        try:
            bench = make()
            bench.warm()
        except Exception as exc:  # an optional sampler missing or broken: report, carry on
            if not optional:
                raise
            unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        benches.append(bench)
    for _ in range(repeats):  # interleaved: every backend once per repeat
        for bench in benches:
            bench.timed()
    with torch.no_grad():
        for bench in benches:
            bench.finish()
    return benches, unavailable


def row(bench: Bench, model: str) -> dict[str, Any]:
    best, median = min(bench.times), statistics.median(bench.times)
    rate = bench.updates_per_run / best
    return {
        "backend": bench.backend,
        "model": model,
        "chains": bench.chains,
        "sweeps_per_sample": bench.sweeps_per_sample,
        "sweeps_per_timed_run": bench.sweeps_per_run,
        "spin_updates_per_timed_run": bench.updates_per_run,
        "spin_updates_per_s": rate,
        "spin_updates_per_s_median": bench.updates_per_run / median,
        "s_per_10k_samples": PER_SAMPLES * bench.sweeps_per_sample * bench.rbm.n_units / rate,
        "mean_energy": bench.mean_energy,
        "times_s": bench.times,
        "available": True,
        **bench.extra,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("backend", "model", "chains", "sweeps/sample", "spin updates/s",
            "s per 10k samples", "x neal", "mean E")
    lines = []
    for r in rows:
        if not r["available"]:
            lines.append((r["backend"], r["model"], "-", "-", "unavailable", "-", "-", "-"))
            continue
        ratio = r.get("ratio_to_neal")
        lines.append((
            r["backend"], r["model"], str(r["chains"]), str(r["sweeps_per_sample"]),
            f"{r['spin_updates_per_s']:.3g}", f"{r['s_per_10k_samples']:.4g}",
            "-" if ratio is None else f"{ratio:.1f}", f"{r['mean_energy']:.2f}",
        ))
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under ~30 s)")
    parser.add_argument("--out", default="benchmarks/results/samplers.json", help="JSON path")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for this run (default: leave torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per backend")
    parser.add_argument("--sweeps", type=int, default=10,
                        help="sweeps per sample for the Gibbs samplers (default 10)")
    parser.add_argument("--neal-sweeps", type=int, default=200,
                        help="sweeps per neal read (default 200, the backend's default)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    reads = 64 if args.quick else 512
    plugin_sweeps = 1 if args.quick else 2  # timed per call; it is ~1e3 times slower

    started = time.perf_counter()
    info = machine_info(device)
    load = info.get("load_average_at_start")
    print(f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_count']} CPUs "
          f"({info['cpu_model']}), device {device}; {repeats} repeats, best shown"
          + (f"; load average {load[0]:.2f}" if load else ""))
    rows: list[dict[str, Any]] = []
    for nv, nh in MODELS:
        rbm, model = make_rbm(nv, nh), f"{nv}x{nh}"
        makers: list[tuple[str, Callable[[], Bench], bool]] = [
            ("gibbs kernel", lambda r=rbm: KernelBench(r, device, args.sweeps), False),
            ("gibbs (backend)", lambda r=rbm: GibbsBench(r, device, args.sweeps), False),
            ("naive torch Gibbs", lambda r=rbm: NaiveBench(r, device, args.sweeps), False),
            ("neal (backend)",
             lambda r=rbm: NealBench(r, device, args.neal_sweeps, reads), False),
            ("plugin BipartiteGibbsSampler",
             lambda r=rbm: PluginBench(r, device, args.sweeps, plugin_sweeps, "bipartite"), True),
            ("plugin BlockSampler",
             lambda r=rbm: PluginBench(r, device, args.sweeps, plugin_sweeps, "block"), True),
        ]
        benches, unavailable = measure(makers, repeats)
        model_rows = [row(b, model) for b in benches]
        neal = next((r for r in model_rows if r["backend"] == "neal (backend)"), None)
        for r in model_rows:
            r["ratio_to_neal"] = neal and r["spin_updates_per_s"] / neal["spin_updates_per_s"]
        model_rows += [{"backend": name, "model": model, "available": False, "reason": why}
                       for name, why in unavailable.items()]
        rows += model_rows
        print(f"  {model} done ({time.perf_counter() - started:.1f} s)", flush=True)

    print()
    print(format_table(rows))
    notes = {r["backend"]: r["reason"] for r in rows if not r["available"]}
    for name, why in notes.items():
        print(f"\n{name} unavailable: {why}")
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    result = {
        "machine": info,
        "config": {
            "quick": args.quick, "repeats": repeats, "chains": CHAINS, "models": MODELS,
            "coupling_std": COUPLING_STD, "bias_std": BIAS_STD, "gibbs_sweeps": args.sweeps,
            "plugin_sweeps": plugin_sweeps, "neal_sweeps": args.neal_sweeps, "neal_reads": reads,
            "reported": "best of the repeats (median also given)",
        },
        "results": rows,
        "wall_s": time.perf_counter() - started,
    }
    write_result(result, args.out)
    return 0


def write_result(result: dict[str, Any], out: str | Path) -> None:
    """Write a benchmark's JSON (its folder created) and say where (shared by the benchmarks
    that import this module)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['wall_s']:.1f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
