"""Backend registry: `available()`, `get_sampler(name, **options)`, `availability()`.

Backends register themselves by name; `get_sampler` checks the name and the option names before
constructing anything, and says which ones are valid when they are not.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from backends.base import Sampler

# name -> "module:Class"; imported lazily so a backend's heavy imports cost nothing until used.
_REGISTRY: dict[str, str] = {
    "exact": "backends.exact:ExactSampler",
    "gibbs": "backends.gibbs:GibbsSampler",
    "neal": "backends.neal:NealSampler",
    "dwave": "backends.dwave:DWaveBackend",
    "langevin": "backends.langevin:LangevinSampler",
    "mala": "backends.mala:MALASampler",
    "remote": "backends.remote:RemoteSampler",
    "dimod": "backends.dimod_backend:DimodBackend",
}


def register(name: str, target: str) -> None:
    """Register a backend class given as "module:Class" under `name`."""
    if not name.isidentifier():
        raise ValueError(f"backend name must be an identifier, got {name!r}")
    _REGISTRY[name] = target


def registered() -> list[str]:
    return list(_REGISTRY)


def sampler_class(name: str) -> type[Sampler]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def option_names(name: str) -> list[str]:
    """Keyword options the backend's constructor accepts."""
    params = inspect.signature(sampler_class(name).__init__).parameters
    return [p for p, spec in params.items() if p != "self" and spec.kind is spec.KEYWORD_ONLY]


def availability() -> dict[str, tuple[bool, str]]:
    """For every registered backend: (usable here?, reason when not)."""
    out = {}
    for name in _REGISTRY:
        try:
            out[name] = sampler_class(name).availability()
        except ImportError as exc:  # a missing optional dependency
            out[name] = (False, f"cannot import it: {exc}")
    return out


def available() -> list[str]:
    """Names of the registered backends that can run here."""
    return [name for name, (ok, _) in availability().items() if ok]


def get_sampler(name: str, **options: Any) -> Sampler:
    """Construct backend `name` with `options`; ValueError naming any unknown name or option.

    >>> import backends
    >>> backends.get_sampler("gibbs", num_sweeps=10).name
    'gibbs'
    """
    cls = sampler_class(name)
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for backend {name!r}; valid options: {valid}"
        )
    return cls(**options)
