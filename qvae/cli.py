"""`qvae` command line: train, evaluate, sample, backends, config.

Run `qvae COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EPILOG = """examples:
  qvae train --config configs/quickstart.yaml            # short MNIST run on the local backend
  qvae train --config configs/mnist.yaml --backend neal --set train.steps=20000
  qvae train --out runs/my-run --resume                  # continue an interrupted run
  qvae evaluate runs/my-run --num-iw 5000                # test NLL with K = 5000
  qvae sample runs/my-run --backend gibbs -n 64 --out grid.png
  qvae compare runs/my-run --backends exact,gibbs,neal -n 2000 --out cmp
  qvae backends                                          # what can sample here, and why not
  qvae config                                            # every config key, default and meaning
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvae",
        description="Train VAEs whose latent prior is an RBM sampled by a pluggable backend "
        "(exact, gibbs, neal; D-Wave QPU and Langevin/MALA as they land).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (then evaluate it on the test set)",
                       description="Train a DVAE with an RBM prior. The negative phase of the "
                       "prior is drawn from --backend at every step.")
    t.add_argument("--config", type=Path, help="YAML experiment file (default: built-in defaults, "
                   "the full MNIST model; see `qvae config`)")
    t.add_argument("--backend", help="sampler for the negative phase (overrides backend.name; "
                   "see `qvae backends`)")
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
    e.add_argument("--logz", choices=["auto", "exact", "ais"], help="how to compute log Z")
    e.add_argument("--ais-betas", type=int, help="AIS intermediate temperatures")
    e.add_argument("--ais-runs", type=int, help="AIS runs")
    e.add_argument("--split", choices=["valid", "test"], help="data split (default: test)")
    e.add_argument("--max-examples", type=int, help="evaluate only the first N examples")
    e.add_argument("--out", type=Path, help="JSON output (default: RUN/eval.json)")
    e.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="decode prior samples from a backend into an image grid")
    s.add_argument("checkpoint", type=Path, help="run directory or .pt checkpoint")
    s.add_argument("--backend", default="gibbs", help="sampler to draw the prior with")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. --option num_sweeps=1000 (repeatable)")
    s.add_argument("-n", "--num-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write")

    m = sub.add_parser("compare", help="compare backends on a checkpoint's prior: speed, "
                       "energies, moments, TV, fitted β, plots")
    m.add_argument("checkpoint", type=Path, help="run directory or .pt checkpoint")
    m.add_argument("--backends", default="exact,gibbs,neal",
                   help="comma-separated backends (default: exact,gibbs,neal); exact needs a "
                   "small RBM")
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
        "configs/service.yaml\n  curl localhost:8700/healthz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--config", type=Path, help="service YAML (default: built-in defaults; see "
                   "configs/service.yaml)")
    v.add_argument("--host", help="bind address (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, help="TCP port (default 8700)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a service config key, e.g. --set limits.cpu_workers=4")
    v.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])

    c = sub.add_parser("config", help="print every config key with its default and meaning, or "
                       "the validated config of a file")
    c.add_argument("--config", type=Path, help="validate and print this file")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from qvae import checkpoint
    from qvae.config import load_config, validate_config
    from qvae.train import train

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"backend.name={args.backend}")
    if args.no_eval:
        overrides.append("eval.at_end=false")
    if args.resume:
        if args.out is None:
            raise SystemExit("qvae train: --resume needs --out RUN_DIR (the run to continue)")
        if args.config is None:  # the checkpoint's own config, plus any --set
            from qvae.config import apply_overrides

            saved = checkpoint.load(args.out)["config"]
            cfg = validate_config(apply_overrides(saved, overrides))
        else:
            cfg = load_config(args.config, overrides)
    else:
        cfg = load_config(args.config, overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"{cfg.name}-{cfg.backend.name}-{stamp}"
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}; checkpoint saved. Continue with:\n"
              f"  qvae train --out {out} --resume", file=sys.stderr)
        return 130
    print(f"\ntrained {result.step} steps with backend {cfg.backend.name!r}; run directory {out}")
    for name, path in result.files.items():
        print(f"  {name:15s} {path}")
    if result.evaluation:
        ev = result.evaluation
        logz = (f"log Z {ev['method']} {ev['log_z']:.2f} ± {ev['log_z_std']:.2f}"
                if ev["log_z"] is not None else ev["method"])
        print(f"  test ELBO {ev['elbo']:.2f} nats, NLL {ev['nll']:.2f} ± "
              f"{ev['nll_stderr_examples']:.2f} (K={ev['num_iw']}, {ev['num_examples']} examples, "
              f"{logz})")
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
    from qvae.config import apply_overrides, validate_config
    from qvae.evaluate import evaluate_model

    model, cfg, _ = _load_model(args.checkpoint)
    mapping = {"num_iw": args.num_iw, "logz": args.logz, "ais_betas": args.ais_betas,
               "ais_runs": args.ais_runs, "split": args.split, "max_examples": args.max_examples}
    sets = [f"eval.{k}={v}" for k, v in mapping.items() if v is not None]
    cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), sets))
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.out or run_dir / "eval.json"
    result = evaluate_model(model, cfg, out, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import backends
    from qvae.report import decoded_prior_samples, save_image_grid

    model, _, _ = _load_model(args.checkpoint)
    sampler = backends.get_sampler(args.backend, **_parse_options(args.option, "--option"))
    images = decoded_prior_samples(model, sampler, args.num_samples, args.seed)
    save_image_grid(images, args.out, title=f"decoded prior samples ({args.backend})")
    print(f"wrote {args.out} ({args.num_samples} samples from {args.backend!r})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qvae.compare import compare_backends, table
    from qvae.report import decode, plot_energy_histograms, plot_mean_scatter, save_image_grid

    model, _, _ = _load_model(args.checkpoint)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    options: dict[str, dict] = {}
    for key, value in _parse_options(args.option, "--option").items():
        if "." not in key:
            raise SystemExit(f"qvae compare: --option needs BACKEND.KEY=VALUE, got {key!r}")
        backend, opt = key.split(".", 1)
        options.setdefault(backend, {})[opt] = value
    result = compare_backends(model.prior, names, num_samples=args.num_samples, options=options,
                              seed=args.seed, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = result.pop("_samples")
    files = {"energy_histograms": plot_energy_histograms(result, args.out / "energies.png"),
             "mean_scatter": plot_mean_scatter(result, args.out / "means.png")}
    for name, out in samples.items():
        images = decode(model, out)[: args.grid]
        files[f"grid_{name}"] = save_image_grid(images, args.out / f"samples_{name}.png",
                                                title=f"decoded prior samples ({name})")
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

    config = load_service_config(args.config, args.overrides)
    try:
        serve(config, host=args.host, port=args.port, log_level=args.log_level)
    except ValueError as exc:  # e.g. no API keys
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
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"qvae {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad input named by the code that found it
        print(f"qvae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
