"""Train the default 200-latent DVAE on binarized MNIST and report test NLL, speed and wall time.

    python benchmarks/train_mnist.py --minutes 100            # the ~2-hour CPU benchmark
    python benchmarks/train_mnist.py --steps 2000 --num-iw 100 --max-examples 1000   # a quick look

With --minutes, the number of steps (and so the cosine learning-rate and τ schedules) is set from
the throughput measured in a short warm-up run, so the run ends near the requested wall time.
Evaluation: K = 1000 importance samples (configurable up to 5000) and AIS log Z.
Writes JSON (default benchmarks/results/train_mnist.json) and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]


def measure_rate(base_overrides: list[str], steps: int = 300) -> float:
    """Steps per second of the full model on this machine (a short throwaway run)."""
    cfg = load_config(ROOT / "configs/mnist.yaml",
                      [*base_overrides, f"train.steps={steps}", "eval.at_end=false",
                       "train.sample_grid=0", f"train.checkpoint_every={steps}"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(cfg, Path(tmp) / "probe", progress=False)
        return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--minutes", type=float, help="training wall-time budget")
    group.add_argument("--steps", type=int, help="training steps (default: configs/mnist.yaml)")
    p.add_argument("--backend", default="gibbs")
    p.add_argument("--num-iw", type=int, default=1000, help="K for the test NLL")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N test images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs/bench-mnist")
    p.add_argument("--resume", action="store_true", help="continue --run-dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_mnist.json")
    p.add_argument("--threads", type=int, help="torch threads (1 is as fast here: small matmuls)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"backend.name={args.backend}", *args.overrides]
    rate = None
    if args.minutes:
        rate = measure_rate(overrides)
        overrides.append(f"train.steps={max(100, int(rate * args.minutes * 60))}")
    elif args.steps:
        overrides.append(f"train.steps={args.steps}")
    overrides += ["eval.at_end=true", f"eval.num_iw={args.num_iw}"]
    if args.max_examples:
        overrides.append(f"eval.max_examples={args.max_examples}")
    cfg = load_config(ROOT / "configs/mnist.yaml", overrides)

    start = time.perf_counter()
    result = train(cfg, args.run_dir, resume=args.resume, progress=True)
    wall = time.perf_counter() - start
    ev = result.evaluation or {}
    train_seconds = result.train_seconds  # all steps, also those of earlier (resumed) runs
    report = {
        "benchmark": "train_mnist",
        "backend": cfg.backend.name,
        "steps": result.step,
        "train_seconds": train_seconds,
        "steps_per_second": result.step / train_seconds if train_seconds > 0 else None,
        "probe_steps_per_second": rate,
        "wall_seconds_this_invocation": wall,
        "eval_seconds": ev.get("seconds"),
        "test_nll": ev.get("nll"),
        "test_nll_stderr": ev.get("nll_stderr_examples"),
        "test_elbo": ev.get("elbo"),
        "log_z": ev.get("log_z"),
        "log_z_std": ev.get("log_z_std"),
        "log_z_method": ev.get("method"),
        "num_iw": ev.get("num_iw"),
        "num_examples": ev.get("num_examples"),
        "config": cfg.model_dump(mode="json"),
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'metric':24s} value")
    for key in ("backend", "steps", "steps_per_second", "train_seconds", "test_nll",
                "test_nll_stderr", "test_elbo", "log_z", "log_z_std", "log_z_method", "num_iw"):
        value = report[key]
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
