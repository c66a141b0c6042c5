"""Test NLL on binarized MNIST: a 4-partite Boltzmann-machine prior against the 100 + 100 RBM.

    python benchmarks/bm_prior_nll.py                  # 4,000 steps each, one thread (~10 min)
    python benchmarks/bm_prior_nll.py --steps 50000    # longer

Both models are configs/mnist.yaml's DVAE (784-200-200-[200 latent]-200-200-784, tanh, batch
100, Adam 3e-3 cosine to 1e-4, τ 1 → 0.1) with 200 latent units and the same seed, schedules,
backend (gibbs, 10 sweeps per step, persistent chains) and number of steps; only the prior
differs:
- rbm:          model.prior.kind=rbm, 100 visible × 100 hidden (10,000 couplers);
- multipartite: model.prior.kind=multipartite, parts=4: complete 4-partite, 4 × 50 units
  (6 · 50² = 15,000 couplers).
The KL weight warms up over the first tenth of the steps. Each trained model is scored by the
importance-weighted bound with K = --num-iw on --examples test images drawn at random (seeded:
the shipped test split is sorted by label, so its first N would be nearly all zeros), with
log Z by AIS (--ais-betas × --ais-runs; `qvae.logz` for the RBM, `qvae.boltzmann_logz` for the
Boltzmann machine). NLL = −mean IW bound, in nats; its spread over examples and the AIS
standard error are reported separately. Writes benchmarks/results/bm_prior_nll.json and
prints a table. torch runs one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qvae.config import load_config
from qvae.datasets import load_dataset
from qvae.evaluate import estimate_log_z
from qvae.priors import describe_prior
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
PRIORS = {
    "rbm": [],
    "multipartite": ["model.prior.kind=multipartite", "model.prior.parts=4"],
}


def config_for(kind: str, args: argparse.Namespace) -> Any:
    return load_config(ROOT / "configs/mnist.yaml", [
        *PRIORS[kind], f"train.steps={args.steps}", f"seed={args.seed}", "threads=1",
        f"train.kl_warmup_steps={max(1, args.steps // 10)}", "train.sample_grid=0",
        f"train.log_every={max(1, args.steps // 10)}", f"train.checkpoint_every={args.steps}",
        "eval.at_end=false", f"eval.ais_betas={args.ais_betas}", f"eval.ais_runs={args.ais_runs}",
        "eval.logz=ais",
    ])


@torch.no_grad()
def score(model: Any, cfg: Any, x: torch.Tensor, num_iw: int, seed: int) -> dict[str, Any]:
    """−IW_K bound on `x` with log Z by AIS."""
    model.eval()
    start = time.perf_counter()
    logz = estimate_log_z(model.log_z_prior(), cfg)
    gen = torch.Generator().manual_seed(seed)
    iw = torch.cat([model.evaluation_iw_bound(x[i : i + 100], logz["log_z"], num_samples=num_iw,
                                              generator=gen).double()
                    for i in range(0, len(x), 100)])
    return {"nll": float(-iw.mean()), "nll_stderr_examples": float(iw.std() / math.sqrt(len(iw))),
            "log_z": logz["log_z"], "log_z_std": logz["log_z_std"], "log_z_method": logz["method"],
            "eval_seconds": time.perf_counter() - start, "_iw": iw}


def run_one(kind: str, args: argparse.Namespace, x: torch.Tensor) -> dict[str, Any]:
    cfg = config_for(kind, args)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = train(cfg, Path(tmp) / kind, progress=False)
        wall = time.perf_counter() - start
        from qvae.checkpoint import load_model

        model, _, _ = load_model(Path(tmp) / kind)
    prior = model.log_z_prior()
    n_couplers = prior.n_edges if hasattr(prior, "n_edges") else prior.n_visible * prior.n_hidden
    return {"prior": describe_prior(prior), "couplers": n_couplers, "steps": res.step,
            "train_seconds": res.train_seconds, "train_wall_s": wall,
            **score(model, cfg, x, args.num_iw, args.seed)}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'prior':13s} {'graph':58s} {'steps':>6s} {'NLL':>8s} {'±ex':>6s} "
             f"{'log Z':>8s} {'±AIS':>6s} {'train s':>8s}"]
    for kind, r in result["runs"].items():
        lines.append(f"{kind:13s} {r['prior']:58s} {r['steps']:6d} {r['nll']:8.2f} "
                     f"{r['nll_stderr_examples']:6.2f} {r['log_z']:8.2f} {r['log_z_std']:6.2f} "
                     f"{r['train_seconds']:8.0f}")
    d = result["nll_multipartite_minus_rbm"]
    lines.append(f"NLL(multipartite) - NLL(rbm) = {d['mean']:.2f} ± "
                 f"{d['stderr_paired_examples']:.2f} (paired over the images) ± "
                 f"{d['log_z_std']:.2f} (AIS)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="training steps of each model")
    p.add_argument("--num-iw", type=int, default=100, help="K of the IW bound")
    p.add_argument("--examples", type=int, default=2000, help="random test images scored")
    p.add_argument("--ais-betas", type=int, default=5000)
    p.add_argument("--ais-runs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bm_prior_nll.json")
    args = p.parse_args()
    for name in ("steps", "num_iw", "examples", "ais_betas", "ais_runs"):
        if getattr(args, name) < 1 or (name == "examples" and args.examples > 10000):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1 (examples <= 10000)")
    torch.set_num_threads(1)
    test = load_dataset("mnist", "test")
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    x = test[pick[: args.examples]]
    result = {"command": "python benchmarks/bm_prior_nll.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "examples": args.examples, "num_iw": args.num_iw, "ais_betas": args.ais_betas,
              "ais_runs": args.ais_runs, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "runs": {}}
    iw = {}
    for kind in PRIORS:
        result["runs"][kind] = run_one(kind, args, x)
        iw[kind] = result["runs"][kind].pop("_iw")
        print(f"{kind}: NLL {result['runs'][kind]['nll']:.2f}", flush=True)
    # Paired over the same test images: the spread of the per-example difference, far smaller
    # than either NLL's spread over examples; the two AIS errors add to it independently.
    diff = iw["rbm"] - iw["multipartite"]  # NLL(multipartite) - NLL(rbm)
    result["nll_multipartite_minus_rbm"] = {
        "mean": float(diff.mean()),
        "stderr_paired_examples": float(diff.std() / math.sqrt(len(diff))),
        "log_z_std": math.hypot(*(r["log_z_std"] for r in result["runs"].values()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
