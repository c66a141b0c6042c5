"""How far a trained model's NLL on its own training images is below its NLL on held-out ones.

    OMP_NUM_THREADS=1 python benchmarks/generalization_gap.py runs/A/best.pt runs/B/best.pt \
        --out benchmarks/paper/generalization-gap/beat-rows.json

For each checkpoint: the validation estimate the trainer uses to select `best.pt` (−IW bound with
K = train.validate_num_iw, log Z by AIS with the validation's temperatures and runs, see
`qvae.evaluate.validation_nll`) on the same number of random training and validation images,
with the same seed, so both splits use the same log Z and the gap does not depend on its error.
A gap of several nats says the networks fit the training images better than the distribution:
regularisation (weight decay, fewer steps) is then a lever, where a small gap says capacity or
optimisation is. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvae.atomic import write_bytes_atomic  # noqa: E402
from qvae.checkpoint import load_model  # noqa: E402
from qvae.datasets import load_dataset  # noqa: E402
from qvae.evaluate import evaluation_subset, validation_nll  # noqa: E402

SEED = 7  # one seed for both splits: the same AIS run, so the same log Z


def measure(checkpoint: str, examples: int) -> dict:
    model, cfg, state = load_model(checkpoint)
    row: dict = {"checkpoint": checkpoint, "step": state.get("step"),
                 "dataset": cfg.data.dataset, "num_iw": cfg.train.validate_num_iw}
    for split in ("train", "valid"):
        data = evaluation_subset(load_dataset(cfg.data.dataset, split), examples)
        row[split] = validation_nll(model, cfg, data, seed=SEED)
    train, valid = row["train"], row["valid"]
    if train["log_z"] != valid["log_z"]:
        raise RuntimeError(f"{checkpoint}: log Z differs between the splits "
                           f"({train['log_z']} vs {valid['log_z']})")
    row["gap"] = valid["nll"] - train["nll"]
    row["gap_stderr"] = math.hypot(train["nll_stderr_examples"], valid["nll_stderr_examples"])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoints (.pt) or run directories")
    ap.add_argument("--examples", type=int, default=2000,
                    help="random images per split (seed 0, the same in every run; default 2000)")
    ap.add_argument("--out", default="benchmarks/results/generalization_gap.json")
    args = ap.parse_args(argv)
    if not 1 <= args.examples <= 10_000:
        ap.error(f"--examples {args.examples}: give 1 to 10000 (the validation split's size)")
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [measure(c, args.examples) for c in args.checkpoints]
    print("| checkpoint | step | train NLL | valid NLL | gap (valid − train) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        t, v = r["train"], r["valid"]
        print(f"| {r['checkpoint']} | {r['step']} | {t['nll']:.2f} ± {t['nll_stderr_examples']:.2f}"
              f" | {v['nll']:.2f} ± {v['nll_stderr_examples']:.2f}"
              f" | {r['gap']:.2f} ± {r['gap_stderr']:.2f} |")
    out = {"examples_per_split": args.examples, "seed": SEED, "torch_threads": 1,
           "machine": platform.platform(), "seconds": time.perf_counter() - start,
           "command": "OMP_NUM_THREADS=1 python benchmarks/generalization_gap.py "
                      + " ".join(args.checkpoints)
                      + f" --examples {args.examples} --out {args.out}",
           "rows": rows}
    write_bytes_atomic(args.out, json.dumps(out, indent=2, allow_nan=False).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
