"""The `dwave` backend's own cost per QPU call, its chain breaks and β recovery, on the emulator.

    python benchmarks/qpu_path.py                  # 100x100 RBM, 1,000 reads, Pegasus(16)
    python benchmarks/qpu_path.py --calls 5 --topology-shape 6 --n 32   # a quick look

Everything the backend does around the sampler counts as overhead: the RBM → spin Ising
conversion, scaling by 1/β_eff, embedding lookup, chain splitting, clipping, BQM construction
(`preprocess`), and reordering, majority-vote unembedding, conversion to torch, energies and
β re-estimation (`postprocess`). `sample` is the emulated QPU itself (and would be the network
and the QPU on Leap). Also reported: the time of the first embedding (an empty embedding cache;
minorminer's busclique keeps its own per-topology cache in ~/.local/share, which the first run
on a machine fills), the chain-break fraction against chain strength, and the calibrated β_eff
against the emulated β. Writes JSON (default benchmarks/results/qpu_path.json).
"""

from __future__ import annotations

import os

# one BLAS/OpenMP thread: these are small matrices, and spare threads only spin on a busy machine
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import backends  # noqa: E402
from backends.testing import random_rbm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="visible = hidden units")
    p.add_argument("--reads", type=int, default=1000)
    p.add_argument("--calls", type=int, default=10, help="timed calls after a warm-up call")
    p.add_argument("--topology", default="pegasus")
    p.add_argument("--topology-shape", type=int, default=16, help="16: Advantage-size Pegasus")
    p.add_argument("--scale", type=float, default=0.2, help="coupling std of the random RBM")
    p.add_argument("--emulated-beta", type=float, default=6.0)
    p.add_argument("--chain-strengths", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/qpu_path.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    rbm = random_rbm(args.n, args.n, scale=args.scale, seed=0)
    cache = tempfile.mkdtemp(prefix="qvae-emb-")
    common = {"solver": "emulator", "topology": args.topology,
              "topology_shape": args.topology_shape, "emulated_beta": args.emulated_beta,
              "embedding_cache": cache}

    # 1. first embedding (empty cache) and a cache hit from a fresh sampler
    start = time.perf_counter()
    first = backends.get_sampler("dwave", beta_eff=args.emulated_beta, **common)
    out = first.sample(rbm, 10, seed=0)
    first_call_s = time.perf_counter() - start
    embedding = {"first_s": out.info["embedding_seconds"], "first_status":
                 out.info["embedding_cache"], "first_call_total_s": first_call_s,
                 "num_qubits": out.info["num_qubits"],
                 "max_chain_length": out.info["max_chain_length"]}
    start = time.perf_counter()
    again = backends.get_sampler("dwave", beta_eff=args.emulated_beta, **common)
    hit = again.sample(rbm, 10, seed=0)
    embedding.update(second_status=hit.info["embedding_cache"],
                     second_call_total_s=time.perf_counter() - start)

    # 2. overhead per call, at the default beta_every (10) and re-estimating β every call
    overhead = {"reads": args.reads, "calls": args.calls}
    for label, every in (("default", 10), ("beta_every_1", 1)):
        sampler = backends.get_sampler("dwave", beta_eff=args.emulated_beta, beta_every=every,
                                       **common)
        sampler.sample(rbm, args.reads, seed=0)  # warm-up: embedding structure, imports
        rows = [sampler.sample(rbm, args.reads, seed=k + 1).info["timing"]
                for k in range(args.calls)]
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        overhead[label] = {
            "preprocess_ms": 1e3 * med["preprocess_s"],
            "postprocess_ms": 1e3 * med["postprocess_s"],
            "overhead_ms": 1e3 * statistics.median(r["preprocess_s"] + r["postprocess_s"]
                                                   for r in rows),
            "overhead_mean_ms": 1e3 * statistics.mean(r["preprocess_s"] + r["postprocess_s"]
                                                      for r in rows),
            "overhead_min_ms": 1e3 * min(r["preprocess_s"] + r["postprocess_s"] for r in rows),
            "sample_ms": 1e3 * med["sample_s"], "total_ms": 1e3 * med["total_s"]}

    # 3. chain breaks against chain strength (β known), 4. β recovery from calibration
    breaks = {}
    for cs in args.chain_strengths:
        s = backends.get_sampler("dwave", beta_eff=args.emulated_beta, chain_strength=cs,
                                 **common)
        breaks[str(cs)] = s.sample(rbm, args.reads, seed=0).info["chain_break_fraction"]
    calibrated = backends.get_sampler("dwave", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = calibrated.sample(rbm, args.reads, seed=0).info
    beta = {"emulated": args.emulated_beta, "estimated": info["beta_eff"],
            "relative_error": info["beta_eff"] / args.emulated_beta - 1,
            "calibration": info["calibration"], "calibration_total_s": info["timing"]["total_s"]}

    result = {"rbm": f"{args.n}x{args.n}, couplings ~ N(0, {args.scale}^2)",
              "emulator": f"{args.topology}({args.topology_shape})", "embedding": embedding,
              "overhead_per_call": overhead, "chain_break_fraction_by_chain_strength": breaks,
              "beta": beta, "machine": platform.platform(), "python": platform.python_version(),
              "torch_threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"dwave backend, {result['rbm']}, {args.reads} reads/call, emulator "
          f"{result['emulator']}, {embedding['num_qubits']} qubits, max chain "
          f"{embedding['max_chain_length']}")
    print(f"{'what':44s} {'value':>12s}")
    table = [
        ("first embedding, empty cache (s)", embedding["first_s"]),
        ("first call incl. embedding + setup (s)", embedding["first_call_total_s"]),
        (f"fresh sampler, cache {embedding['second_status']} (s)",
         embedding["second_call_total_s"]),
        ("preprocess per call (ms)", overhead["default"]["preprocess_ms"]),
        ("postprocess per call (ms)", overhead["default"]["postprocess_ms"]),
        ("backend overhead per call, median (ms)", overhead["default"]["overhead_ms"]),
        ("  min (ms)", overhead["default"]["overhead_min_ms"]),
        ("  mean, with beta_every=10 (ms)", overhead["default"]["overhead_mean_ms"]),
        ("  median, beta re-estimated every call (ms)", overhead["beta_every_1"]["overhead_ms"]),
        ("emulated QPU per call (ms)", overhead["default"]["sample_ms"]),
        *((f"chain-break fraction, chain_strength {cs}", f) for cs, f in breaks.items()),
        ("beta_eff emulated", beta["emulated"]),
        (f"beta_eff calibrated ({info['calibration']['rounds']} rounds)", beta["estimated"]),
        ("beta_eff relative error", beta["relative_error"]),
    ]
    for name, value in table:
        print(f"{name:44s} {value:12.4g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
