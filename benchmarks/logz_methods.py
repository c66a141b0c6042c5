"""log Z by AIS and by replica exchange (pt), side by side: accuracy against exact enumeration,
the certified lower bound, and time, on priors where AIS works and on ones where it cannot.

    OMP_NUM_THREADS=1 python benchmarks/logz_methods.py      # table, benchmarks/logz_methods.json
    OMP_NUM_THREADS=1 python benchmarks/logz_methods.py --checkpoint runs/X/best.pt   # add a model
    OMP_NUM_THREADS=1 python benchmarks/logz_methods.py --checkpoint runs/X/best.pt \
        --checkpoints-only --out X-logz.json                 # that model only

Rows: a random 20 + 20 RBM (exact by enumerating 2^20 states), the "trap" RBM of
tests/test_logz_pt.py at 20 + 20 (all couplings 1, biases −6: the all-on state holds the mass,
and AIS's path from the bias-only base never reaches it), a random 100 + 100 RBM (no exact
value), two Boltzmann machines on non-bipartite graphs (a random complete 4-partite 4 × 5 and a
complete 3-partite 3 × 8 trap, every coupling 1 and bias −5: exact by summing out one class),
and any checkpoints given. AIS runs with the evaluation's defaults (10⁴ temperatures ×
100 runs) and pt with its defaults (200 temperatures × 100 chains, 1,000 + 2,000 sweeps), so the
time ratio is the one `qvae evaluate` sees. One torch thread throughout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvae import RBM  # noqa: E402
from qvae.boltzmann import BoltzmannMachine  # noqa: E402
from qvae.boltzmann_graphs import multipartite  # noqa: E402
from qvae.evaluate import log_z_functions  # noqa: E402
from qvae.logz_pt import log_z_lower_bound, pt_log_partition, trap_rbm  # noqa: E402


def random_rbm(nv: int, nh: int, std: float, seed: int) -> RBM:
    rbm = RBM(nv, nh, init_std=std, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rbm.visible_bias.normal_(0, 1.0, generator=gen)
        rbm.hidden_bias.normal_(0, 1.0, generator=gen)
    return rbm


def trap_bm(sizes: list[int], a: float) -> BoltzmannMachine:
    bm = multipartite(sizes, scale=1.0, seed=0)
    with torch.no_grad():
        bm.coupling.fill_(1.0)
        bm.bias.fill_(-a)
    return bm


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def row(name: str, rbm: RBM | BoltzmannMachine, *, exact: bool, ais_betas: int,
        pt_kwargs: dict) -> dict:
    exact_log_partition, ais_log_partition, _ = log_z_functions(rbm)
    ex = exact_log_partition(rbm) if exact else None
    bound, t_bound = timed(lambda: log_z_lower_bound(rbm))
    ais, t_ais = timed(lambda: ais_log_partition(rbm, num_betas=ais_betas, num_runs=100))
    pt, t_pt = timed(lambda: pt_log_partition(rbm, **pt_kwargs))
    return {"rbm": name, "exact": ex, "bound": bound.value, "bound_s": t_bound,
            "ais": ais.log_z, "ais_std": ais.log_z_std, "ais_s": t_ais,
            "pt": pt.log_z, "pt_std": pt.log_z_std, "pt_s": t_pt,
            "pt_min_swap_acceptance": min(pt.swap_acceptance)}


def fmt(r: dict) -> str:
    ex = f"{r['exact']:.3f}" if r["exact"] is not None else "—"
    refuted = " (refuted)" if r["ais"] + 3 * r["ais_std"] < r["bound"] else ""
    return (f"| {r['rbm']} | {ex} | {r['bound']:.3f} | {r['ais']:.3f} ± {r['ais_std']:.3f}"
            f"{refuted} | {r['pt']:.3f} ± {r['pt_std']:.3f} | {r['ais_s']:.0f} | "
            f"{r['pt_s']:.0f} | {r['pt_s'] / r['ais_s']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], type=Path,
                   help="also a trained model's prior (repeatable)")
    p.add_argument("--checkpoints-only", action="store_true",
                   help="only the --checkpoint rows (a trained prior's cross-check)")
    p.add_argument("--quick", action="store_true",
                   help="10x fewer AIS temperatures and pt sweeps (a smoke run, not the table)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/logz_methods.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ais_betas = 1000 if args.quick else 10000
    pt_kwargs = ({"num_replicas": 60, "num_chains": 50, "burn_in": 100, "num_sweeps": 200}
                 if args.quick else {})
    cases = [("random 20+20", random_rbm(20, 20, 0.3, 0), True),
             ("trap 20+20", trap_rbm(20, 6.0), True),
             ("random 100+100", random_rbm(100, 100, 0.1, 1), False),
             ("random 4-partite 4×5", multipartite([5, 5, 5, 5], scale=0.5, seed=0), True),
             ("trap 3-partite 3×8", trap_bm([8, 8, 8], 5.0), True)]
    if args.checkpoints_only:
        if not args.checkpoint:
            p.error("--checkpoints-only needs at least one --checkpoint")
        cases = []
    if args.checkpoint:
        from qvae.checkpoint import load_model

        for path in args.checkpoint:
            cases.append((str(path), load_model(path)[0].log_z_prior(), False))
    rows = []
    print("| prior | exact log Z | certified bound | AIS | pt | AIS s | pt s | pt/AIS time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rbm, exact in cases:
        rows.append(row(name, rbm, exact=exact, ais_betas=ais_betas, pt_kwargs=pt_kwargs))
        print(fmt(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": platform.machine(), "threads": 1,
                                    "quick": args.quick, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
