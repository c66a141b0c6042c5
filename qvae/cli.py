"""`qvae` command line: train, evaluate, sample, backends, config.

Run `qvae COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

EPILOG = """examples:
  qvae train --config quickstart                         # short MNIST run on the local backend
  qvae train --config mnist --backend neal --set train.steps=20000
  qvae train --out runs/my-run --resume                  # continue an interrupted run
  qvae evaluate runs/my-run --num-iw 5000                # test NLL with K = 5000
  qvae sample runs/my-run --backend gibbs -n 64 --out grid.png
  qvae compare runs/my-run --backends exact,gibbs,neal -n 2000 --out cmp
  qvae backends                                          # what can sample here, and why not
  qvae config                                            # every config key, default and meaning
"""


def _version() -> str:
    """The installed distribution's version; the source tree's when qvae is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qvae")
    except PackageNotFoundError:  # run from a checkout on sys.path without `pip install`
        from qvae import __version__

        return f"{__version__} (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvae",
        description="Train VAEs whose latent prior is an RBM sampled by a pluggable backend "
        "(exact, gibbs, neal, dwave [QPU or its emulator], langevin, mala, dimod [any Ocean "
        "sampler], remote [a `qvae serve` service]; `qvae backends` says which run here).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qvae {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (then evaluate it on the test set)",
                       description="Train a DVAE with an RBM prior. The negative phase of the "
                       "prior is drawn from --backend at every step.")
    t.add_argument("--config", type=Path, help="YAML experiment file, or the name of a shipped "
                   "one from any directory: quickstart, smoke, mnist, paper/... (default: "
                   "built-in defaults, "
                   "the full MNIST model; see `qvae config`)")
    t.add_argument("--backend", help="sampler for the negative phase (overrides backend.name; "
                   "a switch drops the file's backend.options, which belong to its backend: "
                   "give the new one's with --set backend.options.KEY=VALUE; see `qvae "
                   "backends`)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=500 (repeatable)")
    t.add_argument("--out", type=Path, help="run directory (default: runs/NAME-BACKEND-TIME)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="test ELBO and importance-weighted NLL of a checkpoint")
    e.add_argument("checkpoint", type=Path, help="run directory or .pt checkpoint")
    e.add_argument("--num-iw", type=int, help="K importance samples per example (≤ 5000)")
    e.add_argument("--logz", choices=["auto", "exact", "ais", "pt"],
                   help="how to compute log Z: exact, ais, pt (replica exchange, for a "
                   "prior AIS misses a mode of), or auto (exact when small, else AIS, else pt "
                   "when AIS falls below the certified lower bound)")
    e.add_argument("--ais-betas", type=int, help="AIS intermediate temperatures")
    e.add_argument("--ais-runs", type=int, help="AIS runs")
    e.add_argument("--pt-replicas", type=int,
                   help="pt: temperatures from 1 to 0 (default 200; more when the swap "
                   "acceptance reported is low)")
    e.add_argument("--pt-chains", type=int,
                   help="pt: chains per temperature, a multiple of 10 (default 100)")
    e.add_argument("--pt-burn-in", type=int, help="pt: sweeps before measuring (default 1000)")
    e.add_argument("--pt-sweeps", type=int, help="pt: sweeps measured (default 2000)")
    e.add_argument("--split", choices=["valid", "test"], help="data split (default: test)")
    e.add_argument("--max-examples", type=int,
                   help="evaluate N examples drawn at random (seed 0, the same N in every run; "
                   "the test split is sorted by label, so not the first N)")
    e.add_argument("--out", type=Path, help="JSON output (default: RUN/eval.json, or "
                   "RUN/eval-TIME.json when that exists: nothing is overwritten)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: refuse)")
    e.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="decode prior samples from a backend into an image grid")
    s.add_argument("checkpoint", type=Path, help="run directory or .pt checkpoint")
    s.add_argument("--backend", default="gibbs", help="sampler to draw the prior with")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. --option num_sweeps=1000 (repeatable)")
    s.add_argument("-n", "--num-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write")
    s.add_argument("--label", type=int, help="class-conditional model: clamp the label units "
                   "to this class (default: one row per class)")

    m = sub.add_parser("compare", help="compare backends on a checkpoint's prior: speed, "
                       "energies, moments, TV, fitted β, plots")
    m.add_argument("checkpoint", type=Path, help="run directory or .pt checkpoint")
    m.add_argument("--backends", default=None,
                   help="comma-separated backends (default: those of exact,gibbs,neal that can "
                   "run on the model: exact only for a small RBM)")
    m.add_argument("-n", "--num-samples", type=int, default=1000)
    m.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                   help="backend option, e.g. --option gibbs.num_sweeps=50 (repeatable)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--grid", type=int, default=36, help="decoded samples per backend grid")
    m.add_argument("--out", type=Path, default=Path("compare"), help="output directory")

    sub.add_parser("backends", help="list sampler backends, whether they run here, and options")

    v = sub.add_parser(
        "serve", help="run the sampler service: every backend behind one HTTP API",
        description="Serve POST /v1/sample, GET /v1/jobs/{id}, /v1/backends, /healthz and "
        "/metrics. API keys come from the config's `keys:` and from $QVAE_API_KEYS "
        "(comma-separated); clients send them as 'Authorization: Bearer KEY'. Trainers use it "
        "with `qvae train --backend remote --set backend.url=http://HOST:PORT --set "
        "backend.target=dwave`.",
        epilog="example:\n  QVAE_API_KEYS=$(openssl rand -hex 16) qvae serve --config "
        "service\n  curl localhost:8700/healthz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--config", type=Path, help="service YAML, or `service` for the shipped "
                   "example (default: built-in defaults)")
    v.add_argument("--host", help="bind address (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, help="TCP port (default 8700)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a service config key, e.g. --set limits.cpu_workers=4")
    v.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])

    c = sub.add_parser("config", help="print every config key with its default and meaning, or "
                       "the validated config of a file")
    c.add_argument("--config", type=Path, help="validate and print this file (or shipped name)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for computing in (t, e, s, m):
        computing.add_argument(
            "--threads", type=_positive_int, metavar="N",
            help="torch CPU threads (train/evaluate: the config key `threads`); default: "
            "chosen from the work's size, 1 for small work (see README, Threads)")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from qvae import checkpoint
    from qvae.config import load_config, switched, validate_config
    from qvae.train import SamplerCounters, train

    overrides = list(args.overrides)
    if args.no_eval:
        overrides.append("eval.at_end=false")
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    notes: list[str] = []  # what --backend dropped from the file (options of another backend)
    if args.resume:
        if args.out is None:
            raise SystemExit("qvae train: --resume needs --out RUN_DIR (the run to continue)")
        if args.config is None:  # the checkpoint's own config, plus any --set
            saved = checkpoint.load(args.out, require=("config",))["config"]
            cfg = validate_config(switched(saved, overrides, args.backend, notes))
        else:
            cfg = load_config(args.config, overrides, backend=args.backend, notes=notes)
    else:
        cfg = load_config(args.config, overrides, backend=args.backend, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if cfg.model.conditional.label_units:
        from qvae.evaluate import conditional_note

        print(f"note: {conditional_note(cfg)}", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"{cfg.name}-{cfg.backend.name}-{stamp}"
    terminated = []

    def on_term(signum, frame):  # a scheduler's or a session's end: stop like Ctrl-C
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    counters = SamplerCounters.from_dict(cfg.backend.name, result.sampling)
    if args.out is None and counters.fallback_servers():
        # A default name says who sampled: `smoke-dwave-...` served by neal is not a dwave run.
        via = "+".join(counters.fallback_servers())
        renamed = out.with_name(f"{cfg.name}-{cfg.backend.name}-fallback-{via}-{stamp}")
        out.rename(renamed)
        result.files = {k: str(renamed / Path(v).relative_to(out)) if Path(v).is_relative_to(out)
                        else v for k, v in result.files.items()}
        out = renamed
    if result.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\n{how} at step {result.step}; checkpoint saved. Continue with:\n"
              f"  qvae train --out {out} --resume", file=sys.stderr)
        return 143 if terminated else 130
    print(f"\ntrained {result.step} steps with backend {cfg.backend.name!r}; run directory {out}")
    print(f"  sampling: {counters.summary()}")
    for name, path in result.files.items():
        print(f"  {name:15s} {path}")
    if result.evaluation:
        ev = result.evaluation
        logz = (f"log Z {ev['method']} {ev['log_z']:.2f} ± {ev['log_z_std']:.2f}"
                if ev["log_z"] is not None else ev["method"])
        print(f"  test ELBO {ev['elbo']:.2f} nats, NLL {ev['nll']:.2f} ± "
              f"{ev['nll_stderr_examples']:.2f} (K={ev['num_iw']}, {ev['num_examples']} examples, "
              f"{logz})")
        if ev.get("note"):
            print(f"  note: {ev['note']}")
    print(f"next: qvae evaluate {out} --num-iw 5000   |   qvae sample {out} --backend neal")
    return 0


def _load_model(path: Path):
    from qvae import checkpoint

    return checkpoint.load_model(path)


def _parse_options(items: list[str], flag: str) -> dict:
    import yaml

    options = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"qvae: {flag} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qvae import threads
    from qvae.checkpoint import CHECKPOINT_NAME
    from qvae.config import apply_overrides, validate_config
    from qvae.evaluate import evaluate_model

    model, cfg, state = _load_model(args.checkpoint)
    mapping = {"num_iw": args.num_iw, "logz": args.logz, "ais_betas": args.ais_betas,
               "ais_runs": args.ais_runs, "pt_replicas": args.pt_replicas,
               "pt_chains": args.pt_chains, "pt_burn_in": args.pt_burn_in,
               "pt_sweeps": args.pt_sweeps, "split": args.split,
               "max_examples": args.max_examples}
    sets = [f"eval.{k}={v}" for k, v in mapping.items() if v is not None]
    if args.threads is not None:
        sets.append(f"threads={args.threads}")
    cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), sets))
    threads.apply(cfg.threads, threads.evaluation_macs(cfg))
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.out or run_dir / "eval.json"
    if args.out is None and out.exists() and not args.overwrite:  # keep training's eval.json
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        out = run_dir / f"eval-{stamp}.json"
        while out.exists():  # two evaluations in one second
            n += 1
            out = run_dir / f"eval-{stamp}-{n}.json"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or another --out")
    name = (args.checkpoint.name if args.checkpoint.is_file() else CHECKPOINT_NAME)
    extra = {"checkpoint": name, "checkpoint_step": state.get("step")}
    if state.get("sampler_counters"):
        extra["training_sampler"] = state["sampler_counters"]
    # A bar only on a terminal: in a log file its carriage-return updates are noise.
    result = evaluate_model(model, cfg, out, progress=not args.no_progress and sys.stderr.isatty(),
                            extra=extra)
    print(json.dumps(result, indent=2, allow_nan=False))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import backends
    from qvae import threads
    from qvae.datasets import image_shape
    from qvae.priors import sampling_macs
    from qvae.report import (
        class_conditional_grid,
        decode,
        decoded_prior_samples,
        label_clamp,
        save_image_grid,
    )

    model, cfg, _ = _load_model(args.checkpoint)
    units = int(getattr(model, "label_units", 0))
    if args.label is not None and not units:
        raise ValueError("--label needs a class-conditional model (model.conditional)")
    if args.label is not None and not 0 <= args.label < units:
        raise ValueError(f"--label {args.label}: the model's classes are 0..{units - 1}")
    threads.apply(args.threads, sampling_macs(model.prior, args.num_samples))
    sampler = backends.get_sampler(args.backend, **_parse_options(args.option, "--option"))
    shape = image_shape(cfg.data.dataset, model.n_pixels)
    if units and args.label is None:  # one row per class
        class_conditional_grid(model, sampler, args.out, seed=args.seed,
                               per_class=max(1, args.num_samples // units), shape=shape)
        print(f"wrote {args.out} (one row per class, from {args.backend!r})")
        return 0
    if args.label is not None:
        images = decode(model, sampler.sample(model.prior, args.num_samples, seed=args.seed,
                                              clamp=label_clamp(units, args.label)))
    else:
        images = decoded_prior_samples(model, sampler, args.num_samples, args.seed)
    what = "" if args.label is None else f", class {args.label}"
    save_image_grid(images, args.out, title=f"decoded prior samples ({args.backend}{what})",
                    shape=shape)
    print(f"wrote {args.out} ({args.num_samples} samples from {args.backend!r}{what})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qvae import threads
    from qvae.compare import compare_backends, table
    from qvae.datasets import image_shape
    from qvae.report import decode, plot_energy_histograms, plot_mean_scatter, save_image_grid

    model, cfg, _ = _load_model(args.checkpoint)
    if args.backends is None:
        from qvae.compare import default_backends

        names, notes = default_backends(model.prior)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
    options: dict[str, dict] = {}
    for key, value in _parse_options(args.option, "--option").items():
        if "." not in key:
            raise SystemExit(f"qvae compare: --option needs BACKEND.KEY=VALUE, got {key!r}")
        backend, opt = key.split(".", 1)
        options.setdefault(backend, {})[opt] = value
    from qvae.priors import sampling_macs

    threads.apply(args.threads, sampling_macs(model.prior, args.num_samples))
    result = compare_backends(model.prior, names, num_samples=args.num_samples, options=options,
                              seed=args.seed, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = result.pop("_samples")
    files = {"energy_histograms": plot_energy_histograms(result, args.out / "energies.png"),
             "mean_scatter": plot_mean_scatter(result, args.out / "means.png")}
    for name, out in samples.items():
        images = decode(model, out)[: args.grid]
        files[f"grid_{name}"] = save_image_grid(
            images, args.out / f"samples_{name}.png", title=f"decoded prior samples ({name})",
            shape=image_shape(cfg.data.dataset, int(images.shape[1])))
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out / 'compare.json'}")
    for name, path in files.items():
        print(f"  {name:18s} {path}")
    return 0


def cmd_backends(_: argparse.Namespace) -> int:
    from backends.registry import availability, option_names

    print(f"{'backend':10s} {'status':12s} options / reason")
    for name, (ok, reason) in availability().items():
        detail = ", ".join(option_names(name)) if ok else reason
        print(f"{name:10s} {'available' if ok else 'unavailable':12s} {detail}")
        if ok and reason:  # e.g. whether a QPU token is configured
            print(f"{'':23s} note: {reason}")
    print("\nUse one with --backend NAME; set options with --set backend.options.KEY=VALUE.\n"
          "remote samples on a `qvae serve` service: --backend remote --set backend.url=URL "
          "--set backend.target=NAME (key in $QVAE_API_KEY).")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from qvae.config import describe, load_config

    if args.config is None and not args.overrides:
        print(describe())
    else:
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qvae.service.server import serve
    from qvae.service.settings import load_service_config
    from qvae.service.store import StoreError

    config = load_service_config(args.config, args.overrides)
    try:
        serve(config, host=args.host, port=args.port, log_level=args.log_level)
    except (ValueError, StoreError) as exc:  # e.g. no API keys, an unreadable state_db
        print(f"qvae serve: {exc}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"serve": cmd_serve, "train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "compare": cmd_compare, "backends": cmd_backends, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    from qvae.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"qvae {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # our own messages (no checkpoint at ...) or the OS's, with the path
        print(f"qvae {args.command}: {_os_error(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad input named by the code that found it
        print(f"qvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not isinstance(exc, _expected_runtime_errors()):
            raise  # a bug: keep the traceback
        print(f"qvae {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qvae {args.command}: interrupted", file=sys.stderr)
        return 130


def _expected_runtime_errors() -> tuple[type[BaseException], ...]:
    """Failures of the world, not of qvae, each with a message that says what to do: the
    service down or refusing (no key, a 403 for a locked option), the QPU unavailable under
    strict=true or over its budget, a diverged run."""
    from backends.dwave import QPUBudgetExceeded, QPUUnavailable
    from backends.remote import RemoteError
    from qvae.train import TrainingDiverged

    return (TrainingDiverged, RemoteError, QPUUnavailable, QPUBudgetExceeded)


def _os_error(exc: OSError) -> str:
    """One line for an OSError: the OS's reason and the path it concerns."""
    if exc.strerror and exc.filename is not None:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{other}: {exc.strerror}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
