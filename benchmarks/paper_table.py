"""Train one cell of the DVAE# MNIST table (structure × objective) and print the table.

    python benchmarks/paper_table.py train 1-layer-nonlin            # k = 1, from the start
    python benchmarks/paper_table.py train 1-layer-nonlin --resume   # continue it exactly
    python benchmarks/paper_table.py train 2-layer-nonlin --k 5      # importance-weighted k = 5
    python benchmarks/paper_table.py table                           # the table of all cells
    python benchmarks/paper_table.py record runs/beat/X --change "what differs"  # a beat-it row
    python benchmarks/paper_table.py plot                            # curves.png: NLL vs steps

A cell trains `configs/paper/<structure>.yaml` (the reference protocol: 10⁶ steps, validation
NLL every 20,000 steps selecting `best.pt`, test NLL with K = 4,000 and AIS log Z) in
`runs/paper/<cell>/`, and keeps `benchmarks/paper/<cell>.json` current: the validation NLL
against steps (the curve), steps done, training seconds, steps/second, the machine, the exact
command and, once the run is complete, the test evaluation of the selected checkpoint.
A run is "complete" only when it reached the protocol's step count with no --set overrides;
anything else is labelled "in progress" or "not the protocol" in the JSON and the table.

--minutes N stops the run cleanly (checkpoint written) after N minutes; SIGTERM does the same,
so a run killed by the end of a session resumes exactly with --resume.

"Beat it" rows are runs of `qvae train` on the same structures (configs/beat/<structure>.yaml,
qvae's own recipe, or with --set changes), evaluated like a cell (K = 4,000, AIS log Z).
`record RUN_DIR --change TEXT` writes benchmarks/paper/beat/<run name>.json from the run's
config.json, metrics.jsonl, validation.jsonl and evaluation JSON, with the exact command that
reproduces the run (`qvae train --config beat/<structure> --set ...`, the differences from the
base config read from the saved config), and `table` prints those rows as a second table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ("1-layer-lin", "1-layer-nonlin", "2-layer-nonlin", "4-layer-nonlin")
JSON_DIR = ROOT / "benchmarks/paper"
BEAT_DIR = JSON_DIR / "beat"
#: Model fields that make a structure (the paper configs' values identify it).
STRUCTURE_FIELDS = ("n_visible", "n_hidden", "groups", "encoder_hidden", "decoder_hidden")
RUN_ROOT = ROOT / "runs/paper"


def cell_name(structure: str, k: int) -> str:
    return f"{structure}-k{k}"


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    import torch

    return {"host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(cell: str, cfg, run_dir: Path, *, command: str, protocol: bool,
                 step: int, train_seconds: float, evaluation: dict | None,
                 json_dir: Path) -> Path:
    """benchmarks/paper/<cell>.json from the run directory's validation rows and the state."""
    from qvae.atomic import write_bytes_atomic

    curve = [{k: r.get(k) for k in ("step", "nll", "nll_stderr_examples", "log_z", "log_z_std",
                                    "log_z_method", "num_examples", "num_iw", "seconds")}
             for r in _rows(run_dir / "validation.jsonl")]
    done = step >= cfg.train.steps
    status = "complete" if done and protocol else ("in progress" if protocol else
                                                   "not the protocol")
    report = {
        "cell": cell,
        "structure": cell.rsplit("-k", 1)[0],
        "objective": "k=1 bound" if cfg.train.num_iw == 1 else
                     f"importance-weighted bound, k={cfg.train.num_iw}",
        "status": status,
        "protocol": protocol,
        "steps_done": step,
        "steps_protocol": cfg.train.steps,
        "train_seconds": train_seconds,
        "steps_per_second": step / train_seconds if train_seconds > 0 else None,
        "backend": cfg.backend.name,
        "machine": machine(),
        "command": command,
        "run_dir": str(run_dir),
        "validation_curve": curve,
        "best_valid": min(curve, key=lambda r: r["nll"]) if curve else None,
        "test": evaluation if done else None,
        "config": cfg.model_dump(mode="json"),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = json_dir / f"{cell}.json"
    write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from qvae.config import ConfigError, load_config
    from qvae.train import train

    torch.set_num_threads(args.threads)
    cell = cell_name(args.structure, args.k)
    overrides = [f"train.num_iw={args.k}", *args.overrides]
    try:
        cfg = load_config(ROOT / f"configs/paper/{args.structure}.yaml", overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = args.run_root / cell
    if not args.resume and (run_dir / "last.pt").exists():
        print(f"error: {run_dir}/last.pt exists: pass --resume to continue it", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/paper_table.py", *args.argv])
    protocol = not args.overrides
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf

    def on_step(step: int, row: dict[str, Any]) -> None:
        if cfg.train.validate_every and step % cfg.train.validate_every == 0:
            write_report(cell, cfg, run_dir, command=command, protocol=protocol, step=step,
                         train_seconds=row["train_seconds"], evaluation=None,
                         json_dir=args.json_dir)
        if time.monotonic() > deadline:
            raise KeyboardInterrupt  # train() writes the checkpoint and returns

    def on_term(signum, frame):  # a session's end: stop like Ctrl-C, with a checkpoint
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = train(cfg, run_dir, resume=args.resume, progress=args.progress,
                       callback=on_step)
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = write_report(cell, cfg, run_dir, command=command, protocol=protocol,
                        step=result.step, train_seconds=result.train_seconds,
                        evaluation=result.evaluation, json_dir=args.json_dir)
    rate = result.step / result.train_seconds if result.train_seconds else float("nan")
    state = "stopped (resume with --resume)" if result.interrupted else "finished"
    print(f"{cell}: {state} at step {result.step}/{cfg.train.steps}, {rate:.2f} steps/s; "
          f"wrote {path}")
    return 0


def _fmt_nll(test: dict | None) -> str:
    if not test:
        return "—"
    return (f"{test['nll']:.2f} ± {test['nll_stderr_examples']:.2f} (IW) "
            f"± {test.get('log_z_std') or 0.0:.2f} (log Z)")


#: The table's objective columns: the k = 1 bound and the IW bound at the k the paper reports.
TABLE_KS = (1, 5)


def table(json_dir: Path) -> str:
    """Every cell of the structure × objective grid, started or not, so the gaps are visible.

    "full run at this rate (h)" is the cell's step count (10⁶ for the protocol) at its measured
    rate: how far the run is from a protocol result on the machine it ran on.
    """
    lines = ["| structure | objective | test NLL (nats) | best valid NLL (step) | steps | "
             "train h | steps/s | full run at this rate (h) | machine | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    reports = {p.stem: json.loads(p.read_text()) for p in json_dir.glob("*.json")}
    cells = [cell_name(s, k) for s in STRUCTURES for k in TABLE_KS]
    cells += sorted(set(reports) - set(cells))  # another k someone ran: still shown, last
    for cell in cells:
        r = reports.get(cell)
        if r is None:
            structure, k = cell.rsplit("-k", 1)
            objective = "k=1 bound" if k == "1" else f"importance-weighted bound, k={k}"
            lines.append(f"| {structure} | {objective} | — | — | 0 | — | — | — | — | "
                         "not started |")
            continue
        best = r.get("best_valid")
        best_s = f"{best['nll']:.2f} ({best['step']})" if best else "—"
        m = r["machine"]
        where = m.get("cuda") or f"{m.get('processor')}, {m.get('torch_threads')} thread(s)"
        rate = r.get("steps_per_second")
        hours = r["train_seconds"] / 3600
        whole = f"{r['steps_protocol'] / rate / 3600:.1f}" if rate else "—"
        lines.append(
            f"| {r['structure']} | {r['objective']} | {_fmt_nll(r.get('test'))} | {best_s} | "
            f"{r['steps_done']:,} / {r['steps_protocol']:,} | {hours:.2f} | "
            f"{f'{rate:.1f}' if rate else '—'} | {whole} | {where} | {r['status']} |")
    return "\n".join(lines)


def structure_of(model: dict[str, Any]) -> str | None:
    """Which DVAE# structure a run's model config is (None: none of them)."""
    from qvae.config import load_config

    for name in STRUCTURES:
        ref = load_config(ROOT / f"configs/paper/{name}.yaml").model.model_dump(mode="json")
        if all(model.get(f) == ref[f] for f in STRUCTURE_FIELDS):
            return name
    return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith("options") and k != "remote":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def reproduce_command(saved: dict[str, Any], base: str) -> str:
    """`qvae train --config BASE --set ...` giving `saved` (a run's config.json) exactly."""
    from qvae.config import load_config
    from qvae.configs_path import resolve_config_path

    ref = _flat(load_config(resolve_config_path(base)).model_dump(mode="json"))
    sets = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
            for k, v in _flat(saved).items() if ref.get(k) != v]
    argv = ["qvae", "train", "--config", base]
    for item in sets:
        argv += ["--set", item]
    return shlex.join(argv)


def log_z_check(run_dir: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's log Z against a certified lower bound (`qvae.logz_pt`): the one the
    evaluation recorded, or, for an evaluation made before the check existed, one computed now
    from the checkpoint it scored. A log Z the bound refutes is refused: its NLL is too low."""
    from qvae.logz_pt import LogZBelowBound, LogZBound, check_above_bound, log_z_lower_bound

    if evaluation.get("method") == "exact":
        return {"log_z_lower_bound": None, "checked_by": "exact log Z: nothing to check"}
    if "log_z_lower_bound" in evaluation:
        bound = LogZBound(evaluation["log_z_lower_bound"],
                          evaluation.get("log_z_lower_bound_method", ""), 0, 0.0)
        by = "the evaluation"
    else:
        from qvae.checkpoint import load_model

        name = evaluation.get("checkpoint") or (
            "best.pt" if (run_dir / "best.pt").exists() else "last.pt")
        model, cfg, _ = load_model(run_dir / name)
        bound = log_z_lower_bound(model.log_z_prior(), seed=cfg.seed)
        by = f"paper_table.py record, from {name}"
    try:
        check_above_bound(evaluation["log_z"], evaluation.get("log_z_std") or 0.0, bound,
                          evaluation.get("method", "log Z"))
    except LogZBelowBound as exc:
        raise SystemExit(f"error: {run_dir}: not recorded: {exc}") from None
    return {"log_z_lower_bound": bound.value, "log_z_lower_bound_method": bound.method,
            "checked_by": by}


def record(run_dir: Path, change: str, eval_name: str, base: str | None,
           beat_dir: Path) -> Path:
    """benchmarks/paper/beat/<run name>.json: one "beat it" row from a finished run."""
    from qvae.atomic import write_bytes_atomic

    for need in (run_dir / "config.json", run_dir / eval_name):
        if not need.is_file():
            raise SystemExit(f"error: {need} not found: record takes a `qvae train` run "
                             "directory and the name of its evaluation JSON (--eval)")
    saved = json.loads((run_dir / "config.json").read_text())
    evaluation = json.loads((run_dir / eval_name).read_text())
    metrics = _rows(run_dir / "metrics.jsonl")
    structure = structure_of(saved["model"])
    if structure is None:
        raise SystemExit(f"error: {run_dir}: its model is none of the structures {STRUCTURES}")
    base = base or f"beat/{structure}"
    checked = log_z_check(run_dir, evaluation)
    last = metrics[-1] if metrics else {}
    curve = _rows(run_dir / "validation.jsonl")
    report = {
        "name": run_dir.name,
        "structure": structure,
        "change": change,
        "objective": "k=1 bound" if saved["train"]["num_iw"] == 1 else
                     f"importance-weighted bound, k={saved['train']['num_iw']}",
        "relaxation": saved["model"].get("relaxation", "gumbolt"),
        "steps_done": last.get("step"),
        "train_seconds": last.get("train_seconds"),
        "threads": last.get("threads"),
        # the machine the run trained on, with its own thread count, not this process's
        "machine": {**machine(), "torch_threads": last.get("threads")},
        "command": "OMP_NUM_THREADS=1 " + reproduce_command(saved, base),
        "evaluation_file": eval_name,
        "test": evaluation,
        "log_z_check": checked,
        "validation_curve": [{k: r.get(k) for k in ("step", "nll", "nll_stderr_examples",
                                                    "log_z", "log_z_std")} for r in curve],
        "config": saved,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    beat_dir.mkdir(parents=True, exist_ok=True)
    path = beat_dir / f"{run_dir.name}.json"
    write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def beat_table(beat_dir: Path) -> str:
    lines = ["| structure | change from qvae's recipe | objective | test NLL (nats) | K | "
             "log Z (method) ≥ certified bound | checkpoint (step) | steps | train min |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for p in sorted(beat_dir.glob("*.json")):
        row = json.loads(p.read_text())
        if not {"structure", "test", "change"} <= set(row):
            raise SystemExit(f"{p}: not a beat row (no structure/test/change); rows are written "
                             "by `paper_table.py record`, so move other JSON elsewhere")
        rows.append(row)
    for r in sorted(rows, key=lambda r: (STRUCTURES.index(r["structure"]), r["test"]["nll"])):
        t = r["test"]
        minutes = (r.get("train_seconds") or 0) / 60
        bound = (r.get("log_z_check") or {}).get("log_z_lower_bound")
        log_z = (f"{t['log_z']:.2f} ({t['method'].split(' ')[0]}) ≥ "
                 f"{f'{bound:.2f}' if bound is not None else 'unchecked'}")
        lines.append(
            f"| {r['structure']} | {r['change']} | {r['objective']} | {_fmt_nll(t)} | "
            f"{t['num_iw']:,} | {log_z} | "
            f"{t.get('checkpoint', '—')} ({t.get('checkpoint_step', '—'):,}) | "
            f"{r['steps_done']:,} | {minutes:.0f} |")
    return "\n".join(lines)


def plot_curves(json_dir: Path, beat_dir: Path, out: Path) -> Path:
    """Validation NLL against steps: protocol cells solid, beat-it rows dashed, on one axis, so
    where each partial run is heading (and how it compares) can be read at a glance."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for style, folder, label_of in (("-", json_dir, lambda r: f"protocol {r['cell']}"),
                                    ("--", beat_dir, lambda r: f"beat: {r['name']}")):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            r = json.loads(path.read_text())
            curve = r.get("validation_curve") or []
            if not curve:
                continue
            ax.plot([c["step"] for c in curve], [c["nll"] for c in curve], style, marker=".",
                    label=label_of(r))
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise SystemExit(f"error: no validation curves in {json_dir} or {beat_dir}: train a cell "
                         "first (python benchmarks/paper_table.py train 1-layer-nonlin)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NLL (nats, K = 100, AIS log Z)")
    ax.set_title("DVAE# MNIST structures: validation NLL against steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or --resume) one cell")
    t.add_argument("structure", choices=STRUCTURES)
    t.add_argument("--k", type=int, default=1, help="training objective: 1, or IW with k > 1")
    t.add_argument("--resume", action="store_true", help="continue runs/paper/<cell>")
    t.add_argument("--minutes", type=float, help="stop cleanly (checkpoint) after N minutes")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override; the cell is then labelled 'not the protocol'")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.add_argument("--run-root", type=Path, default=RUN_ROOT)
    t.add_argument("--json-dir", type=Path, default=JSON_DIR)
    t.add_argument("--progress", action="store_true", help="show a progress bar")
    s = sub.add_parser("table", help="print the table of benchmarks/paper/*.json, then the "
                       "beat-it rows of benchmarks/paper/beat/*.json")
    s.add_argument("--json-dir", type=Path, default=JSON_DIR)
    s.add_argument("--beat-dir", type=Path, default=BEAT_DIR)
    c = sub.add_parser("plot", help="plot every validation curve (protocol cells and beat-it "
                       "rows) against steps")
    c.add_argument("--json-dir", type=Path, default=JSON_DIR)
    c.add_argument("--beat-dir", type=Path, default=BEAT_DIR)
    c.add_argument("--out", type=Path, default=JSON_DIR / "curves.png")
    r = sub.add_parser("record", help="write a beat-it row from a finished `qvae train` run")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--change", required=True, help="what this run changes, for the table")
    r.add_argument("--eval", default="eval.json", help="the run's evaluation JSON to report")
    r.add_argument("--base", help="config the command is written against "
                   "(default: beat/<structure>)")
    r.add_argument("--beat-dir", type=Path, default=BEAT_DIR)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.command == "train":
        if not 1 <= args.k <= 1000:
            p.error("--k must be between 1 and 1000")
        if args.minutes is not None and not args.minutes > 0:
            p.error("--minutes must be > 0")
        return cmd_train(args)
    if args.command == "plot":
        print(f"wrote {plot_curves(args.json_dir, args.beat_dir, args.out)}")
        return 0
    if args.command == "record":
        print(f"wrote {record(args.run_dir, args.change, args.eval, args.base, args.beat_dir)}")
        return 0
    print(table(args.json_dir))
    if args.beat_dir.is_dir() and any(args.beat_dir.glob("*.json")):
        print("\nBeat it: the same structures and evaluation, other recipes\n")
        print(beat_table(args.beat_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
