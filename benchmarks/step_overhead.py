"""The training step's bookkeeping, measured: the per-step checks and the minibatch order as they
were (a finite test of every gradient and parameter by `torch.isfinite`, twice a step; a fresh
50,000-long `randperm` every step) against the current ones (per-tensor sums with an exact
fallback; one permutation per epoch), in the same process, on the same model.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--config beat/1-layer-nonlin] \
        [--steps 400] [--repeats 3] [--out benchmarks/results/step_overhead.json]

Each repeat trains `--steps` steps of the config (batch norm and weight decay on, as in the
best 1-layer row; no validation, no evaluation, no sample grid) once with the old helpers
patched in and once with the current ones, interleaved so that other load on the machine hits
both alike; the time is the run's own training seconds. It also checks that both give the same
parameters bit for bit, since the change must not move a resumed run. Prints a table with the
median time per step and the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qvae import train as train_module
from qvae.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def old_first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The check as it was before: `isfinite` on every element of every tensor."""
    pairs = [(name, t) for name, t in named if t is not None]
    if not pairs:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in pairs]).cpu()
    if bool(finite.all()):
        return None
    return pairs[int((~finite).nonzero()[0])][0]


def old_epoch_permutation(n: int, seed: int) -> torch.Tensor:
    """The order as it was before: drawn afresh at every step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def train_once(config: str, steps: int, old: bool, workdir: Path) -> dict[str, Any]:
    cfg = load_config(config, [
        f"train.steps={steps}", "train.validate_every=0", "eval.at_end=false",
        "train.sample_grid=0", f"train.checkpoint_every={steps}", f"train.log_every={steps}",
        "model.batch_norm=true", "train.weight_decay=1e-4", "threads=1"])
    saved = train_module.first_nonfinite, train_module._epoch_permutation
    if old:
        train_module.first_nonfinite = old_first_nonfinite
        train_module._epoch_permutation = old_epoch_permutation
    try:
        out = Path(tempfile.mkdtemp(dir=workdir))
        train_module.train(cfg, out, progress=False)
    finally:
        train_module.first_nonfinite, train_module._epoch_permutation = saved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    return {"train_s": rows[-1]["train_seconds"], "params": state}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="beat/1-layer-nonlin")
    p.add_argument("--steps", type=int, default=400, help="training steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (median kept)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_overhead.json")
    args = p.parse_args()
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1")
    try:  # a bad --config is one line, before any training
        load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"error: --config {args.config}: {exc}") from None
    torch.set_num_threads(1)

    times: dict[str, list[float]] = {"before": [], "now": []}
    identical = True
    with tempfile.TemporaryDirectory(prefix="qvae-step-") as tmp:
        for r in range(args.repeats):
            runs = {name: train_once(args.config, args.steps, name == "before", Path(tmp))
                    for name in ("before", "now")}
            for name, run in runs.items():
                times[name].append(run["train_s"])
            a, b = runs["before"]["params"], runs["now"]["params"]
            identical &= all(torch.equal(a[k], b[k]) for k in a)
            print(f"  repeat {r + 1}: before {runs['before']['train_s']:.2f} s, "
                  f"now {runs['now']['train_s']:.2f} s", flush=True)

    ms = {name: 1000 * statistics.median(t) / args.steps for name, t in times.items()}
    ratio = ms["now"] / ms["before"]
    print(f"\n| variant | ms/step (median of {args.repeats}) | ratio to before |")
    print("|---|---|---|")
    for name in ("before", "now"):
        print(f"| {name} | {ms[name]:.2f} | {ms[name] / ms['before']:.3f} |")
    print(f"\nparameters after {args.steps} steps identical: {identical}")
    report = {
        "command": f"OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --config {args.config} "
                   f"--steps {args.steps} --repeats {args.repeats}",
        "config": args.config, "steps": args.steps, "repeats": args.repeats,
        "train_seconds": times, "ms_per_step_median": ms, "ratio_now_to_before": ratio,
        "parameters_identical": identical, "cpu_count": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
