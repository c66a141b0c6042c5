"""QPU-native 4-partite Boltzmann machine against an embedded dense (complete 4-partite) one
with the same logical units, on the `dwave` backend's emulator (Pegasus(16), Advantage-sized).

Per model: qubits used, mean/max chain length, chain-break fraction of a sampling call, β_eff
error (the calibrated β̂ against the emulator's known β, and one call's re-estimate), the
estimated QPU access time per call (the published timing model; the emulator has no real QPU
time), the emulator's wall time per call against the work model's prediction, and the
embedding search time. Couplings ~ N(0, 1/degree) and biases ~ N(0, 0.5²), so local fields are
of order 1 in both models (the native one has ~10 couplings per unit, the dense one 3/4 of n).

    python benchmarks/dwave_bm.py [--quick]     # table on stdout, JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import backends
from backends.base import ProblemShape
from backends.dwave import DWaveBackend
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import multipartite, qpu_native

OUT = Path(__file__).resolve().parent / "results" / "dwave_bm.json"
BETA = 6.0  # the emulator's β_eff
#: torch-kernel update-equivalents per second the work model's "work" is priced at
WORK_PER_SECOND = 1e10


def scaled(bm: BoltzmannMachine, seed: int) -> BoltzmannMachine:
    """Couplings ~ N(0, 1/mean degree), biases ~ N(0, 0.25): local fields of order 1."""
    gen = torch.Generator().manual_seed(seed)
    degree = 2 * bm.n_edges / bm.n_units
    with torch.no_grad():
        bm.coupling.copy_(torch.randn(bm.n_edges, generator=gen) / math.sqrt(degree))
        bm.bias.copy_(torch.randn(bm.n_units, generator=gen) * 0.5)
    return bm


def case(kind: str, per_part: int, options: dict[str, Any], reads: int,
         seed: int) -> dict[str, Any]:
    sampler = backends.get_sampler("dwave", **options)
    if kind == "native":
        bm = qpu_native(None, 4, graph=sampler.working_graph(), qubits_per_partition=per_part,
                        seed=seed)
    else:
        bm = multipartite([per_part] * 4, seed=seed)
    bm = scaled(bm, seed)
    start = time.perf_counter()
    first = sampler.sample(bm, 10, seed=seed)  # calibration (β_eff unknown) + embedding
    first_s = time.perf_counter() - start
    out = sampler.sample(bm, reads, seed=seed + 1)  # beta_every=1: this call re-estimates β
    info = out.info
    shape = ProblemShape(bm.n_units, 0, bm.n_edges, bipartite=False)
    work = DWaveBackend.work({**options, "beta_eff": BETA}, shape, reads)["work"].value
    cal = first.info["calibration"]
    return {
        "model": f"{kind} 4x{per_part}", "mode": info["mode"], "units": bm.n_units,
        "couplings": bm.n_edges, "qubits": info["num_qubits"],
        "mean_chain": info["mean_chain_length"], "max_chain": info["max_chain_length"],
        "chain_break_fraction": info["chain_break_fraction"],
        "beta_calibrated": first.info["beta_eff"],
        "beta_calibrated_rel_err": first.info["beta_eff"] / BETA - 1,
        "beta_calibration_rel_se": cal["relative_se"], "calibration_rounds": cal["rounds"],
        "beta_reestimate": info["beta_eff_estimate"],
        "beta_reestimate_rel_err": (None if info["beta_eff_estimate"] is None
                                    else info["beta_eff_estimate"] / BETA - 1),
        "reads": reads, "qpu_access_s_per_call": info["qpu_access_time_s"],
        "qpu_access_estimated": info["qpu_access_time_estimated"],
        "emulator_s_per_call": info["timing"]["sample_s"],
        "work_model_s": work / WORK_PER_SECOND,
        "embedding_s": first.info["embedding_seconds"], "first_call_s": first_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4x16 only (about a minute)")
    parser.add_argument("--reads", type=int, default=1000, help="reads per sampling call")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sizes = [16] if args.quick else [16, 32]
    rows = []
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"solver": "emulator", "topology": "pegasus", "topology_shape": 16,
                   "emulated_beta": BETA, "calibration_reads": 2000, "beta_every": 1,
                   "embedding_cache": cache}
        for per_part in sizes:
            for kind in ("native", "dense"):
                rows.append(case(kind, per_part, options, args.reads, seed=per_part))
    print(f"emulator: Pegasus(16), emulated β_eff {BETA}, {args.reads} reads per call, "
          f"calibration {options['calibration_reads']} reads per round")
    head = (f"{'model':14} {'mode':8} {'units':>5} {'coupl.':>6} {'qubits':>6} "
            f"{'chain mean/max':>14} {'breaks':>8} {'β̂ err':>7} {'±se':>5} {'re-est err':>10} "
            f"{'QPU s/call':>10} {'emu s':>6} {'model s':>7} {'embed s':>7}")
    print(head)
    for r in rows:
        re_err = ("-" if r["beta_reestimate_rel_err"] is None
                  else f"{r['beta_reestimate_rel_err']:+.1%}")
        print(f"{r['model']:14} {r['mode']:8} {r['units']:5d} {r['couplings']:6d} "
              f"{r['qubits']:6d} {r['mean_chain']:7.2f}/{r['max_chain']:<6d} "
              f"{r['chain_break_fraction']:8.1e} {r['beta_calibrated_rel_err']:+7.1%} "
              f"{r['beta_calibration_rel_se']:5.1%} {re_err:>10} "
              f"{r['qpu_access_s_per_call']:10.3f} {r['emulator_s_per_call']:6.2f} "
              f"{r['work_model_s']:7.2f} {r['embedding_s']:7.2f}")
    print("QPU s/call: the published timing model (15 ms + 0.2 ms per read), estimated on the "
          "emulator; emu s: emulator wall time of the call; model s: the work model's "
          f"prediction at {WORK_PER_SECOND:.0e} updates/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"emulated_beta": BETA, "options": {
        k: v for k, v in options.items() if k != "embedding_cache"}, "reads": args.reads,
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
