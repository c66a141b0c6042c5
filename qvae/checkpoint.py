"""Checkpoints, written atomically (`qvae.atomic`): a crash mid-write keeps the previous one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qvae.atomic import write_atomic
from qvae.config import Config, ConfigError, validate_config

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    return write_atomic(path, lambda fh: torch.save({"format_version": FORMAT_VERSION, **state},
                                                    fh))


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or the `last.pt` inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first with `qvae train --out {path.parent}`"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a qvae checkpoint (format {FORMAT_VERSION})")
    return state


def config_of(state: dict[str, Any]) -> Config:
    return validate_config(state["config"])


#: model.kind -> "module:Class"
MODEL_CLASSES = {"dvae": "qvae.dvae:DVAE", "sde": "qvae.sde:SDEVAE"}


def model_class(kind: str) -> type:
    import importlib

    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(path: str | Path) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint (eval mode) with its config."""
    state = load(path)
    cfg = config_of(state)
    model = model_class(cfg.model.kind)(**state["model_args"])
    model.load_state_dict(state["model"])
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
