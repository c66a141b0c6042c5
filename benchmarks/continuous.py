"""Quality versus wall time of gibbs, neal, langevin and mala on one RBM with an exact reference.

    python benchmarks/continuous.py                 # 12x12 RBM, N = 20000, ~5 minutes on 1 core
    python benchmarks/continuous.py --quick         # under a minute
    python benchmarks/continuous.py --nv 10 --nh 20 --num-samples 50000 --out /tmp/cont

Every backend draws N samples from fresh, independent chains (num_chains = N, persistent=False
where the backend has it), at a rising effort level: Gibbs sweeps, Neal annealing sweeps, Langevin
(ULA) steps at the default τ and Δt, MALA steps (the burn-in with step adaptation). For each level
it records the wall time of the call, the total variation of the visible marginal against exact
enumeration, the TV noise floor ½ Σ sqrt(p(1−p)/N) (what exact samples of the same size score),
and the RMS error of the unit means (visible and hidden) against exact moments.

Writes OUT/continuous.json and OUT/continuous.png (log-log TV vs time, and mean RMS vs time), and
prints a table and, for a few accuracy targets, which sampler reaches each first and how fast.
A sampler with a bias (langevin and mala sample the relaxation π_τ, whose rounded law is off by
about 0.4–0.5·τ in TV) plateaus above the noise floor and may never reach a target.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

import backends
from backends.testing import exact_moments, exact_visible_marginal, random_rbm, total_variation
from qvae.compare import moments

ROOT = Path(__file__).resolve().parents[1]

# effort levels: the total number of sweeps / steps of a fresh chain
LEVELS = {
    "gibbs": [1, 2, 5, 10, 20, 50, 100, 200, 500],
    "neal": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
    "langevin": [100, 300, 1000, 3000, 10000, 20000, 45000],
    "mala": [10, 30, 100, 300, 1000, 2000, 5000],
}
QUICK_LEVELS = {
    "gibbs": [1, 2, 5, 10, 20, 50, 100],
    "neal": [1, 5, 20, 100, 500],
    "langevin": [100, 1000, 5000, 15000],
    "mala": [10, 100, 300, 1000, 2000],
}
UNITS = {"gibbs": "sweeps", "neal": "sweeps", "langevin": "steps", "mala": "steps"}


def make_sampler(name: str, effort: int, num_samples: int) -> backends.Sampler:
    """A sampler doing `effort` sweeps/steps on each of `num_samples` fresh chains."""
    if name == "gibbs":  # a fresh call runs burn_in + num_sweeps sweeps
        return backends.get_sampler("gibbs", burn_in=0, num_sweeps=effort,
                                    num_chains=num_samples, persistent=False)
    if name == "neal":  # one annealing run of num_sweeps per sample
        return backends.get_sampler("neal", num_sweeps=effort)
    if name in ("langevin", "mala"):  # a fresh call runs burn_in + num_steps steps
        return backends.get_sampler(name, burn_in=effort - 1, num_steps=1,
                                    num_chains=num_samples, persistent=False, num_threads=1)
    raise ValueError(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rbm = random_rbm(args.nv, args.nh, scale=args.scale, seed=args.rbm_seed)
    p = exact_visible_marginal(rbm)
    exact = exact_moments(rbm)
    ref_mean = torch.cat([exact["v"], exact["h"]])
    n = args.num_samples
    floor = 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    # What exact samples of the same size actually score (the floor above bounds its mean).
    exact_out = backends.get_sampler("exact").sample(rbm, n, seed=args.seed)
    exact_tv = total_variation(exact_out.visible, p)
    exact_rms = float((moments(exact_out.visible, exact_out.hidden)["mean"] - ref_mean)
                      .pow(2).mean().sqrt())
    print(f"  exact samples: TV {exact_tv:.4f} (floor {floor:.4f}), mean RMS {exact_rms:.4f}")
    levels = QUICK_LEVELS if args.quick else LEVELS
    names = args.backends.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = results.setdefault(name, [])
        for effort in levels[name]:
            sampler = make_sampler(name, effort, n)
            start = time.perf_counter()
            out = sampler.sample(rbm, n, seed=args.seed)
            wall = time.perf_counter() - start
            stats = moments(out.visible, out.hidden)
            row = {
                "effort": effort,
                "unit": UNITS[name],
                "wall_s": wall,
                "tv": total_variation(out.visible, p),
                "tv_noise_floor": floor,
                "mean_rms_error": float((stats["mean"] - ref_mean).pow(2).mean().sqrt()),
            }
            for key in ("acceptance", "step_size", "tau"):
                if key in out.info and isinstance(out.info[key], (int, float)):
                    row[key] = float(out.info[key])
            rows.append(row)
            print(f"  {name:8s} {effort:6d} {UNITS[name]:6s} {wall:8.3f} s  TV {row['tv']:.4f}"
                  f"  (floor {floor:.4f})  mean RMS {row['mean_rms_error']:.4f}", flush=True)
            if wall > args.max_level_seconds:
                print(f"  {name}: level took {wall:.1f} s > {args.max_level_seconds} s; stopping")
                break
    return {"rbm": {"n_visible": args.nv, "n_hidden": args.nh, "scale": args.scale,
                    "seed": args.rbm_seed},
            "num_samples": n, "seed": args.seed, "tv_noise_floor": floor,
            "exact_samples": {"tv": exact_tv, "mean_rms_error": exact_rms},
            "results": results}


def targets(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, metric, threshold) accuracy targets. The noise floor bounds the mean TV of exact
    samples from above; `exact samples` is what exact draws of the same size actually score."""
    floor, exact = report["tv_noise_floor"], report["exact_samples"]
    return [("TV <= 2x floor", "tv", 2 * floor), ("TV <= 1.2x floor", "tv", 1.2 * floor),
            ("TV <= 1.0x floor", "tv", floor),
            ("TV <= 1.1x exact", "tv", 1.1 * exact["tv"]),
            ("mean RMS <= 0.02", "mean_rms_error", 0.02),
            ("mean RMS <= 0.005", "mean_rms_error", 0.005),
            ("mean RMS <= 2x exact", "mean_rms_error", 2 * exact["mean_rms_error"])]


def fastest(report: dict[str, Any]) -> list[dict[str, Any]]:
    """For each target: the first level each backend meets it at, and the fastest backend."""
    out = []
    for label, metric, thr in targets(report):
        per: dict[str, Any] = {}
        for name, rows in report["results"].items():
            hit = next((r for r in rows if r[metric] <= thr), None)
            per[name] = None if hit is None else {"wall_s": hit["wall_s"], "effort": hit["effort"]}
        reached = {k: v for k, v in per.items() if v is not None}
        best = min(reached, key=lambda k: reached[k]["wall_s"]) if reached else None
        out.append({"target": label, "metric": metric, "threshold": thr, "per_backend": per,
                    "fastest": best})
    return out


def print_tables(report: dict[str, Any]) -> None:
    print(f"\nRBM {report['rbm']['n_visible']}x{report['rbm']['n_hidden']} "
          f"(scale {report['rbm']['scale']}), N = {report['num_samples']}, "
          f"TV noise floor {report['tv_noise_floor']:.4f}; exact samples of this size: "
          f"TV {report['exact_samples']['tv']:.4f}, "
          f"mean RMS {report['exact_samples']['mean_rms_error']:.4f}")
    print(f"{'backend':9s} {'effort':>7s} {'unit':6s} {'wall_s':>9s} {'TV':>8s} "
          f"{'TV/floor':>8s} {'mean_rms':>9s}")
    for name, rows in report["results"].items():
        for r in rows:
            print(f"{name:9s} {r['effort']:7d} {r['unit']:6s} {r['wall_s']:9.3f} {r['tv']:8.4f} "
                  f"{r['tv'] / report['tv_noise_floor']:8.2f} {r['mean_rms_error']:9.4f}")
    names = list(report["results"])
    print(f"\n{'target':20s} {'fastest':9s} " + " ".join(f"{n:>16s}" for n in names))
    for t in report["targets"]:
        cells = []
        for n in names:
            hit = t["per_backend"][n]
            cells.append(f"{'never':>16s}" if hit is None else
                         f"{hit['wall_s']:8.3f}s @{hit['effort']:>5d}")
        print(f"{t['target']:20s} {t['fastest'] or '-':9s} " + " ".join(cells))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in report["results"].items():
        t = [r["wall_s"] for r in rows]
        axes[0].loglog(t, [r["tv"] for r in rows], "o-", label=name)
        axes[1].loglog(t, [r["mean_rms_error"] for r in rows], "o-", label=name)
    axes[0].axhline(report["tv_noise_floor"], color="k", ls="--", lw=1, label="noise floor")
    axes[0].axhline(2 * report["tv_noise_floor"], color="gray", ls=":", lw=1, label="2x floor")
    axes[0].axhline(report["exact_samples"]["tv"], color="k", ls=":", lw=1,
                    label="exact samples")
    axes[1].axhline(report["exact_samples"]["mean_rms_error"], color="k", ls=":", lw=1,
                    label="exact samples")
    axes[0].set_ylabel("TV of visible marginal vs exact")
    axes[1].set_ylabel("RMS error of unit means")
    rbm = report["rbm"]
    for ax in axes:
        ax.set_xlabel("wall time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"RBM {rbm['n_visible']}x{rbm['n_hidden']}, N = {report['num_samples']} "
                 f"independent chains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nv", type=int, default=12, help="visible units (exact marginal: <= 20)")
    p.add_argument("--nh", type=int, default=12, help="hidden units")
    p.add_argument("--scale", type=float, default=1.0, help="coupling scale of random_rbm")
    p.add_argument("--rbm-seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, help="N (default 20000; 5000 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--backends", default="gibbs,neal,langevin,mala")
    p.add_argument("--quick", action="store_true", help="fewer levels and samples (< ~60 s)")
    p.add_argument("--max-level-seconds", type=float, default=90.0,
                   help="stop a backend's sweep after a level that took longer than this")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="re-score, re-plot and print a saved continuous.json; no sampling")
    args = p.parse_args()
    if args.report:
        report = json.loads(args.report.read_text())
        report["targets"] = fastest(report)
        args.report.write_text(json.dumps(report, indent=2))
        plot(report, args.report.with_suffix(".png"))
        print_tables(report)
        return
    torch.set_num_threads(args.threads)
    if args.num_samples is None:
        args.num_samples = 5000 if args.quick else 20000
    if not math.isfinite(args.scale):
        raise SystemExit("--scale must be finite")

    start = time.perf_counter()
    report = run(args)
    report["targets"] = fastest(report)
    report["total_seconds"] = time.perf_counter() - start
    report["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                         "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continuous.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "continuous.png")
    print_tables(report)
    print(f"\ntotal {report['total_seconds']:.1f} s; wrote {args.out / 'continuous.json'} and "
          f"{args.out / 'continuous.png'}")


if __name__ == "__main__":
    main()
