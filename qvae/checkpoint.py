"""Checkpoints: tensors and plain data only, checksummed, written atomically (`qvae.atomic`).

A checkpoint is a `torch.save` file of one dict holding only tensors, dicts, lists, tuples, str,
int, float, bool and None (the config as its JSON dump, sampler states as tensors and numbers).
It is read with `torch.load(weights_only=True)`, whose unpickler refuses anything else, so a file
from someone else can never run code here. Format 2 adds `checksum`: SHA-256 over every value
(tensor bytes, dtypes and shapes included), checked on load, so flipped bytes inside a tensor
are refused instead of evaluating to NaN. Format-1 files (no checksum) still load, read just as
safely, but unverified; the next save of a resumed run writes format 2.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qvae.atomic import write_atomic
from qvae.config import Config, ConfigError, validate_config

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 2
#: Formats this version reads: 1 (no checksum) and 2.
READABLE_FORMATS = (1, 2)
_PLAIN = (str, int, float, bool, bytes, type(None))


class CheckpointError(ValueError):
    """A file that is not an intact qvae checkpoint; one line naming the file and what to do."""


def _feed(h: Any, value: Any, where: str) -> None:
    """Hash `value` canonically (type-tagged, dict keys sorted) into `h`."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(h, key, where)
            _feed(h, value[key], f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for i, item in enumerate(value):
            _feed(h, item, f"{where}[{i}]")
    elif isinstance(value, _PLAIN):
        text = repr(value).encode()
        h.update(f"{type(value).__name__}{len(text)}:".encode() + text)
    else:
        raise TypeError(
            f"checkpoint value {where} is a {type(value).__name__}; checkpoints hold only "
            "tensors and plain data (dict, list, tuple, str, int, float, bool, None)"
        )


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's contents, the `checksum` entry itself excluded."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"}, "state")
    return h.hexdigest()


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` (tensors and plain data) with its format version and checksum."""
    body = {"format_version": FORMAT_VERSION, **state}
    body["checksum"] = checksum(body)  # also refuses, before writing, anything not plain data
    return write_atomic(path, lambda fh: torch.save(body, fh))


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line error for a file torch.load could not read safely."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text:
        # weights_only refused an import: the file asks to run or build arbitrary objects
        detail = text[text.find("Trying to load"):].split(" Check the documentation")[0]
        return CheckpointError(
            f"{path}: refused: the file asks to load code ({detail.rstrip('.')}); qvae "
            "checkpoints hold only tensors and plain data, so it was not written by qvae or was "
            "tampered with. Do not load it; retrain, or get a clean copy from its source"
        )
    return CheckpointError(
        f"{path}: not a readable checkpoint (truncated, corrupted or another kind of file: "
        f"{type(exc).__name__}); restore it from a copy or retrain with `qvae train`"
    )


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        # The run directory to train into: the path itself unless it names a file (.pt).
        run = path.parent if path.suffix == ".pt" or path.name == CHECKPOINT_NAME else path
        others = sorted(p.name for p in run.glob("*.pt")) if run.is_dir() else []
        if others:  # a finished run may keep only best.pt: name what is there
            raise FileNotFoundError(f"no checkpoint at {path}; {run} has "
                                    f"{', '.join(others)}: give one, e.g. {run / others[0]}")
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first with `qvae train --out {run}`"
        )
    return path


def load(path: str | Path, *, require: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint file (or the `last.pt` inside a run directory), safely.

    Never unpickles code (weights_only); verifies the checksum of format-2 files; raises
    CheckpointError (a ValueError) naming the file for anything else, and when a key in
    `require` is missing.
    """
    path = _resolve(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError, zipfile.BadZipFile,
            MemoryError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(
            f"{path}: not a qvae checkpoint (a torch file holding a {type(state).__name__}); "
            "pass a run directory or the last.pt that `qvae train` wrote"
        )
    version = state["format_version"]
    if version not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path}: checkpoint format {version!r} is not one this qvae reads "
            f"{READABLE_FORMATS}; use the qvae version that wrote it (or a newer one)"
        )
    if version >= 2:
        try:
            actual = checksum(state)
        except TypeError:
            actual = None
        if actual is None or state.get("checksum") != actual:
            raise CheckpointError(
                f"{path}: checksum mismatch: its contents changed after it was written (disk or "
                "transfer corruption); do not use it: restore it from a copy or retrain"
            )
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: a qvae checkpoint without {missing}: not a training checkpoint; pass the "
            "last.pt that `qvae train` wrote"
        )
    return state


def config_of(state: dict[str, Any], path: str | Path | None = None) -> Config:
    """The checkpoint's config, validated; a ConfigError names the file when `path` is given."""
    try:
        return validate_config(state["config"])
    except ConfigError as exc:
        if path is None:
            raise
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:])
        raise CheckpointError(
            f"{path}: its saved config does not validate with this qvae ({detail}); use the "
            "qvae version that wrote it"
        ) from None


def check_finite(tensors: dict[str, Any], path: str | Path) -> None:
    """CheckpointError naming the first tensor holding NaN/inf (a diverged run's checkpoint)."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(
            torch.isfinite(value).all()
        ):
            raise CheckpointError(
                f"{path}: parameter {name} holds NaN/inf (saved by a diverged run); use an "
                "earlier checkpoint or retrain with a lower train.lr / larger train.tau_end"
            )


#: model.kind -> "module:Class"
MODEL_CLASSES = {"dvae": "qvae.dvae:DVAE", "sde": "qvae.sde:SDEVAE"}
#: What a checkpoint needs to rebuild its model, and to resume training.
MODEL_KEYS = ("config", "model_args", "model")
TRAINING_KEYS = (*MODEL_KEYS, "optimizer", "scheduler", "step")


def model_class(kind: str) -> type:
    import importlib

    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(path: str | Path) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint (eval mode) with its config."""
    path = _resolve(path)
    state = load(path, require=MODEL_KEYS)
    cfg = config_of(state, path)
    check_finite(state["model"], path)
    custom = state.get("custom_modules") or {}
    if custom:  # weights only: the classes of the user's own networks are not in the file
        names = ", ".join(f"{k}={v}" for k, v in sorted(custom.items()))
        raise CheckpointError(
            f"{path}: the model was trained with your own network(s) ({names}), which a "
            "checkpoint cannot rebuild (it holds weights, never code); rebuild the model in "
            "Python as you built it and load the weights: "
            f"model.load_state_dict(qvae.checkpoint.load('{path}')['model'])"
        )
    try:
        model = model_class(cfg.model.kind)(**state["model_args"])
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: its model does not rebuild with this qvae ({type(exc).__name__}: {first}); "
            "use the qvae version that wrote it"
        ) from None
    model.eval()
    return model, cfg, state


def check_compatible(saved: Config, requested: Config) -> None:
    """Resuming needs the same model shape and data; training length etc. may change."""
    diffs = []
    for section in ("model", "data"):
        old, new = getattr(saved, section).model_dump(), getattr(requested, section).model_dump()
        diffs += [f"{section}.{k}: checkpoint {old[k]!r} vs config {new[k]!r}"
                  for k in old if old[k] != new[k]]
    if diffs:
        raise ConfigError(
            "cannot resume: the checkpoint was trained with a different model/data config:\n  "
            + "\n  ".join(diffs)
            + "\nresume without --config (the checkpoint's config is used), or start a new --out"
        )
