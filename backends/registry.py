"""Backend registry: `registered()`, `sampler_class(name)`, `get_sampler(name, **options)`.

Built-in backends are listed below; third-party backends register through the `qvae.backends`
entry-point group of their package, without editing this file:

    [project.entry-points."qvae.backends"]
    mybackend = "mypackage.sampler:MySampler"

The entry point's name is the backend's name (its class's `name`). Entry points are read on the
first lookup and a class is imported only when it is used, so a heavy or broken third-party
package costs nothing until someone asks for it; one that cannot be loaded gives a one-line
error naming its entry point, and the other backends work as before. What a backend accepts is
its `Options` model, which checks every option where it enters (`Sampler.parse_options`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

from backends.base import Sampler
from backends.options import BackendOptions

#: The entry-point group third-party backends register in.
ENTRY_POINT_GROUP = "qvae.backends"

# name -> "module:Class"; imported lazily so a backend's heavy imports cost nothing until used.
_BUILTIN: dict[str, str] = {
    "exact": "backends.exact:ExactSampler",
    "gibbs": "backends.gibbs:GibbsSampler",
    "neal": "backends.neal:NealSampler",
    "dwave": "backends.dwave:DWaveBackend",
    "langevin": "backends.langevin:LangevinSampler",
    "mala": "backends.mala:MALASampler",
    "remote": "backends.remote:RemoteSampler",
    "dimod": "backends.dimod_backend:DimodBackend",
}
_REGISTRY: dict[str, str] = dict(_BUILTIN)  # plus `register(...)` calls
_plugins: dict[str, importlib.metadata.EntryPoint] | None = None  # read on first lookup


class BackendLoadError(ValueError):
    """A third-party backend's entry point that cannot be used; the message names it."""


def register(name: str, target: str) -> None:
    """Register a backend class given as "module:Class" under `name` (in this process; a
    package does it for every process with a `qvae.backends` entry point)."""
    if not name.isidentifier():
        raise ValueError(f"backend name must be an identifier, got {name!r}")
    _REGISTRY[name] = target


def refresh() -> None:
    """Read the `qvae.backends` entry points again (after installing a package in-process)."""
    global _plugins
    _plugins = None


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    global _plugins
    if _plugins is None:
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(ep.name, ep)  # the first on sys.path wins, as for imports
        _plugins = found
    return _plugins


def registered() -> list[str]:
    """Built-in and registered backends, then those from `qvae.backends` entry points."""
    return list(_REGISTRY) + [n for n in _entry_points() if n not in _REGISTRY]


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" of package {dist.name!r}" if dist is not None and dist.name else ""
    return f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP}{where})"


def _load_plugin(ep: importlib.metadata.EntryPoint) -> type[Sampler]:
    what = _describe(ep)
    if not ep.name.isidentifier():
        raise BackendLoadError(f"backend {ep.name!r} from {what}: its name must be an "
                               "identifier; rename the entry point")
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001 - any failure of someone else's import, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackendLoadError(f"backend {ep.name!r} cannot be loaded from {what}: "
                               f"{type(exc).__name__}: {first}; fix or uninstall that "
                               "package") from None
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise BackendLoadError(f"backend {ep.name!r} from {what} is a {type(cls).__name__}, "
                               "not a backends.base.Sampler subclass")
    if cls.name != ep.name:
        raise BackendLoadError(f"backend {ep.name!r} from {what} loads a class named "
                               f"{cls.name!r}; the entry point's name must equal the class's "
                               "`name`")
    return cls


def sampler_class(name: str) -> type[Sampler]:
    """The class of backend `name`; ValueError naming the valid names when it is unknown, and
    `BackendLoadError` (a ValueError) naming the entry point when it cannot be loaded."""
    if isinstance(name, str) and name in _REGISTRY:
        module, cls = _REGISTRY[name].split(":")
        return getattr(importlib.import_module(module), cls)
    plugins = _entry_points()
    if not isinstance(name, str) or name not in plugins:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(registered())}")
    return _load_plugin(plugins[name])


def option_names(name: str) -> list[str]:
    """The options backend `name` declares (its `Options` model's fields)."""
    return sampler_class(name).option_names()


def parse_options(name: str, options: Mapping[str, Any] | BackendOptions) -> BackendOptions:
    """`options` checked by backend `name`'s `Options` model: the parsed options, or an
    `OptionError` naming the backend, the option, its value and what it must be."""
    return sampler_class(name).parse_options(options)


def servable() -> list[str]:
    """Registered backends a sampler service may offer (`capabilities.servable`); one whose
    class cannot be imported or loaded here is left out."""
    out = []
    for name in registered():
        try:
            if sampler_class(name).capabilities.servable:
                out.append(name)
        except (ImportError, ValueError):
            continue
    return out


def availability() -> dict[str, tuple[bool, str]]:
    """For every registered backend: (usable here?, reason when not)."""
    out = {}
    for name in registered():
        try:
            out[name] = sampler_class(name).availability()
        except (ImportError, BackendLoadError) as exc:  # a missing dependency, a broken plugin
            out[name] = (False, f"cannot import it: {exc}" if isinstance(exc, ImportError)
                         else str(exc))
    return out


def available() -> list[str]:
    """Names of the registered backends that can run here."""
    return [name for name, (ok, _) in availability().items() if ok]


def get_sampler(name: str, **options: Any) -> Sampler:
    """Construct backend `name` with `options`: its `Options` model checks them (an
    `OptionError`, a ValueError, naming any unknown or bad one).

    >>> import backends
    >>> backends.get_sampler("gibbs", num_sweeps=10).name
    'gibbs'
    """
    return sampler_class(name)(**options)
