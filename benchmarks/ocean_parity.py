"""Our hand-written QPU helpers against Ocean's own, on the same data: same answer? how fast?

1. β_eff estimation: `backends.dwave_temperature.mpl_estimate` (with `bipartite_fields`) against
   `dwave.system.temperatures.maximum_pseudolikelihood_temperature`, given either the BQM and the
   samples (Ocean computes the effective fields) or our fields as `en1` (Ocean only solves).
   Samples: the logical Ising of an RBM sampled at a known β by the emulator's thermal kernel.
2. Spin-reversal transforms: the gauge code of `QPUProgram.bqm` (numpy: h·g, J·g_i·g_j, one
   `from_numpy_vectors`, spins·g back) against `dwave.preprocessing.SpinReversalTransformComposite`
   given the same transforms (`srts`), on an Advantage-sized problem (Pegasus(16), random h, J).
   The child is dimod's `TrackingComposite` over a real sampler, so the programmed BQMs and the
   returned spins can be compared exactly; child time is measured alone and reported apart.

    python benchmarks/ocean_parity.py [--quick]      # table on stdout, JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import dimod
import dwave.graphs as dnx
import numpy as np
from dwave.preprocessing import SpinReversalTransformComposite
from dwave.samplers import SimulatedAnnealingSampler
from dwave.system.temperatures import maximum_pseudolikelihood_temperature

from backends.dwave import logical_ising
from backends.dwave_emulator import ThermalIsingSampler
from backends.dwave_temperature import QPUProgram, bipartite_fields, mpl_estimate
from backends.testing import random_rbm

OUT = Path(__file__).resolve().parent / "results" / "ocean_parity.json"


def best_time(fn: Any, repeats: int) -> tuple[float, Any]:
    """(fastest wall time of `repeats` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


# ------------------------------------------------------------------------------ β estimation
def beta_case(nv: int, nh: int, scale: float, beta: float, reads: int, repeats: int,
              seed: int) -> dict[str, Any]:
    rbm = random_rbm(nv, nh, scale=scale, seed=seed)
    h, w = logical_ising(rbm)
    j = -w / 4
    labels = list(range(nv + nh))
    rows, cols = np.nonzero(j)
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(h, (rows, cols + nv, j[rows, cols]),
                                                        0.0, dimod.SPIN, variable_order=labels)
    ss = ThermalIsingSampler().sample(bqm, num_reads=reads, seed=seed, beta=beta, num_sweeps=200)
    spins = ss.record.sample[:, [ss.variables.index(v) for v in labels]].astype(np.float32)

    def ours() -> tuple[float, float]:
        fv, fh = bipartite_fields(spins[:, :nv], spins[:, nv:], h[:nv], h[nv:], j)
        return mpl_estimate(spins, np.concatenate([fv, fh], 1))

    def ocean_full() -> float:
        t, _ = maximum_pseudolikelihood_temperature(bqm, (spins, labels))
        return 1 / t

    fv, fh = bipartite_fields(spins[:, :nv], spins[:, nv:], h[:nv], h[nv:], j)
    en1 = 2.0 * spins * np.concatenate([fv, fh], 1).astype(np.float64)

    def ocean_en1() -> float:
        t, _ = maximum_pseudolikelihood_temperature(en1=en1)
        return 1 / t

    t_ours, (b_ours, info) = best_time(ours, repeats)
    t_full, b_full = best_time(ocean_full, max(1, repeats // 3))
    t_en1, b_en1 = best_time(ocean_en1, repeats)
    return {"problem": f"RBM {nv}x{nh} (scale {scale}), {reads} reads at beta {beta}",
            "beta_true": beta, "beta_ours": b_ours, "beta_ocean": b_full,
            "beta_ocean_en1": b_en1, "rel_diff": abs(b_full / b_ours - 1),
            "rel_se_ours": 1 / (b_ours * np.sqrt(info)),
            "s_ours": t_ours, "s_ocean_full": t_full, "s_ocean_en1": t_en1}


# ------------------------------------------------------------------- spin-reversal transforms
def srt_case(shape: int, reads: int, transforms: int, seed: int, repeats: int) -> dict[str, Any]:
    graph = dnx.pegasus_graph(shape)
    rng = np.random.default_rng(seed)
    labels = sorted(graph.nodes)
    index = {q: i for i, q in enumerate(labels)}
    edges = np.array([(index[a], index[b]) for a, b in graph.edges])
    program = QPUProgram(rng.uniform(-1, 1, len(labels)), edges[:, 0], edges[:, 1],
                         rng.uniform(-1, 1, len(edges)))
    gauges = np.where(rng.random((transforms, len(labels))) < 0.5, -1.0, 1.0)
    child_seeds = [int(s) for s in rng.integers(2**31, size=transforms)]
    child = SimulatedAnnealingSampler()
    kwargs = {"num_sweeps": 2, "beta_range": [1.0, 1.0], "beta_schedule_type": "linear"}

    def ours() -> tuple[np.ndarray, list[dimod.BinaryQuadraticModel]]:
        # the gauge lines of QPUClient.run, per transform
        out, programmed = [], []
        for gauge, s in zip(gauges, child_seeds, strict=True):
            bqm = program.bqm(labels, gauge)
            programmed.append(bqm)
            result = child.sample(bqm, num_reads=reads, seed=s, **kwargs)
            got = list(result.variables)
            spins = result.record.sample
            if got != labels:
                spins = spins[:, [got.index(q) for q in labels]]
            out.append(spins * gauge.astype(np.int8))
        return np.concatenate(out), programmed

    base = program.bqm(labels)

    def ocean() -> tuple[np.ndarray, list[dimod.BinaryQuadraticModel]]:
        # one composite call per transform, as QPUClient.run calls the QPU once per part (own seed,
        # own retries and QPU-time record); srts gives the composite the same transforms
        out, programmed = [], []
        for gauge, s in zip(gauges, child_seeds, strict=True):
            tracker = dimod.TrackingComposite(child)
            srt = SpinReversalTransformComposite(tracker)
            result = srt.sample(base, srts=(gauge < 0)[None, :], num_reads=reads, seed=s,
                                **kwargs)
            programmed.append(tracker.input["bqm"])
            out.append(result.record.sample[:, [result.variables.index(q) for q in labels]])
        return np.concatenate(out), programmed

    def child_only() -> None:
        for s in child_seeds:
            child.sample(base, num_reads=reads, seed=s, **kwargs)

    t_child, _ = best_time(child_only, repeats)
    t_ours, (spins_ours, prog_ours) = best_time(ours, repeats)
    t_ocean, (spins_ocean, prog_ocean) = best_time(ocean, repeats)
    same_bqm = all(a == b for a, b in zip(prog_ours, prog_ocean, strict=True))
    return {"problem": f"Pegasus({shape}): {len(labels)} qubits, {len(edges)} couplers, "
                       f"{transforms} transforms x {reads} reads",
            "same_programmed_bqms": bool(same_bqm),
            "same_spins": bool(np.array_equal(spins_ours, spins_ocean)),
            "s_child": t_child, "s_ours": t_ours, "s_ocean": t_ocean,
            "overhead_ours_s": t_ours - t_child, "overhead_ocean_s": t_ocean - t_child}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    beta_cases = [(8, 8, 1.0, 6.0, 10000), (100, 100, 0.1, 6.0, 1000 if args.quick else 5000)]
    srt_cases = [(6, 100, 4)] if args.quick else [(6, 100, 4), (16, 100, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        betas = [beta_case(*c, repeats=repeats, seed=i) for i, c in enumerate(beta_cases)]
        srts = [srt_case(*c, seed=i, repeats=max(1, repeats // 2))
                for i, c in enumerate(srt_cases)]
    print("beta_eff estimation (maximum pseudo-likelihood)")
    print(f"{'problem':52} {'true':>5} {'ours':>8} {'ocean':>8} {'rel.diff':>9} "
          f"{'ours s':>8} {'ocean s':>8} {'ocean(en1) s':>12}")
    for r in betas:
        print(f"{r['problem']:52} {r['beta_true']:5.1f} {r['beta_ours']:8.4f} "
              f"{r['beta_ocean']:8.4f} {r['rel_diff']:9.1e} {r['s_ours']:8.4f} "
              f"{r['s_ocean_full']:8.4f} {r['s_ocean_en1']:12.4f}")
    print("\nspin-reversal transforms (same transforms, same child seeds)")
    print(f"{'problem':62} {'same':>5} {'child s':>8} {'ours +s':>8} {'ocean +s':>9}")
    for r in srts:
        same = r["same_programmed_bqms"] and r["same_spins"]
        print(f"{r['problem']:62} {str(same):>5} {r['s_child']:8.3f} "
              f"{r['overhead_ours_s']:8.3f} {r['overhead_ocean_s']:9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"beta": betas, "spin_reversal": srts}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
