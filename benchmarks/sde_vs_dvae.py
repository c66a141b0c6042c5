"""SDE-VAE versus DVAE on binarized MNIST: same latent size, same schedules, same wall-time budget.

    python benchmarks/sde_vs_dvae.py                      # 4 minutes of training each, 1 thread
    python benchmarks/sde_vs_dvae.py --minutes 1 --max-examples 200 --num-iw 20   # a quick look

Both models use configs/mnist.yaml with n_visible = n_hidden = 50 (by default), encoder/decoder
[200, 200], batch 100, the same lr and τ schedules (τ 1 → 0.25) and a KL warm-up of a tenth of
the steps. Each model's steps/s is measured on a short probe run, and train.steps is set so that
its training takes --minutes. Then both are evaluated on the first --max-examples test images:
- DVAE: the discrete ELBO and the K-sample importance-weighted bound, with log Z from AIS;
- SDE-VAE: the path-measure ELBO and its importance-weighted bound (no log Z enters).
Both are lower bounds on log p(x) of their own generative model (the SDE's is the
Euler–Maruyama-discretised path model), in nats. Writes JSON (default
benchmarks/results/sde_vs_dvae.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]


def overrides_for(kind: str, args: argparse.Namespace) -> list[str]:
    common = [f"model.n_visible={args.latent}", f"model.n_hidden={args.latent}",
              "model.encoder_hidden=[200, 200]", "model.decoder_hidden=[200, 200]",
              "data.batch_size=100", "train.tau_start=1.0", "train.tau_end=0.25",
              "train.num_iw=1", f"seed={args.seed}", "train.sample_grid=0"]
    if kind == "sde":
        return [*common, "model.kind=sde", f"model.sde_steps={args.sde_steps}"]
    return [*common, "model.kind=dvae", "backend.name=gibbs"]


def probe_rate(base: list[str], steps: int) -> float:
    """Training steps per second (training time only) on a short throwaway run."""
    cfg = load_config(ROOT / "configs/mnist.yaml",
                      [*base, f"train.steps={steps}", "eval.at_end=false",
                       f"train.checkpoint_every={steps}", f"train.log_every={steps}",
                       "train.kl_warmup_steps=0"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = train(cfg, Path(tmp) / "probe", progress=False)
        wall = time.perf_counter() - start
    seconds = res.train_seconds if res.train_seconds > 0 else wall
    return steps / seconds


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    base = overrides_for(kind, args)
    print(f"[{kind}] probing speed ({args.probe_steps} steps) ...", flush=True)
    rate = probe_rate(base, args.probe_steps)
    steps = max(50, int(rate * args.minutes * 60))
    print(f"[{kind}] {rate:.1f} steps/s -> {steps} steps for {args.minutes} min", flush=True)
    cfg = load_config(ROOT / "configs/mnist.yaml",
                      [*base, f"train.steps={steps}", f"train.kl_warmup_steps={steps // 10}",
                       f"train.log_every={max(1, steps // 10)}",
                       f"train.checkpoint_every={steps}", "eval.at_end=true",
                       f"eval.num_iw={args.num_iw}", f"eval.max_examples={args.max_examples}",
                       "eval.split=test"])
    start = time.perf_counter()
    result = train(cfg, args.run_dir / kind, progress=False)
    wall = time.perf_counter() - start
    ev = result.evaluation or {}
    train_s = result.train_seconds
    return {
        "kind": kind,
        "steps": result.step,
        "train_seconds": train_s,
        "steps_per_second": result.step / train_s if train_s > 0 else None,
        "probe_steps_per_second": rate,
        "eval_seconds": ev.get("seconds"),
        "wall_seconds": wall,
        "test_elbo": ev.get("elbo"),
        "test_iw_bound": -ev["nll"] if ev.get("nll") is not None else None,
        "iw_bound_stderr": ev.get("nll_stderr_examples"),
        "log_z": ev.get("log_z"),
        "log_z_std": ev.get("log_z_std"),
        "log_z_method": ev.get("method"),
        "num_iw": ev.get("num_iw"),
        "num_examples": ev.get("num_examples"),
        "config": cfg.model_dump(mode="json"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="training wall time per model")
    p.add_argument("--latent", type=int, default=50, help="n_visible = n_hidden")
    p.add_argument("--sde-steps", type=int, default=20, help="SDE Euler–Maruyama steps")
    p.add_argument("--num-iw", type=int, default=100, help="K of the importance-weighted bound")
    p.add_argument("--max-examples", type=int, default=1000, help="test images evaluated")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--models", default="dvae,sde")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs/sde-vs-dvae")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sde_vs_dvae.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = [run_one(kind, args) for kind in args.models.split(",")]
    report = {"benchmark": "sde_vs_dvae", "minutes_each": args.minutes, "latent": args.latent,
              "results": rows,
              "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"\n{args.latent}+{args.latent} latent, {args.minutes} min training each, test split, "
          f"{rows[0]['num_examples']} images, K = {rows[0]['num_iw']}")
    print(f"{'model':6s} {'steps':>7s} {'steps/s':>8s} {'train_s':>8s} {'test ELBO':>10s} "
          f"{'IW bound':>10s} {'± se':>6s} {'log Z':>9s} {'eval_s':>7s}")
    for r in rows:
        log_z = f"{r['log_z']:9.2f}" if r["log_z"] is not None else f"{'-':>9s}"
        print(f"{r['kind']:6s} {r['steps']:7d} {r['steps_per_second']:8.1f} "
              f"{r['train_seconds']:8.1f} {r['test_elbo']:10.2f} {r['test_iw_bound']:10.2f} "
              f"{r['iw_bound_stderr']:6.2f} {log_z} {r['eval_seconds']:7.1f}")
    print("(DVAE: discrete bounds with log Z from "
          f"{next((r['log_z_method'] for r in rows if r['kind'] == 'dvae'), '-')}; "
          "SDE: path-measure bounds, no log Z)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
