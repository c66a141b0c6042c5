"""Modules that are also their main function: `qvae.train(cfg, out)`, `qvae.evaluate(model, cfg)`.

The package's entry points have the names of the modules that hold them, and code imports those
modules (`from qvae import train; train.build_model(...)`), so `qvae.train` must stay the module.
Python lets a module set its `__class__` to a ModuleType subclass (the supported way to customise
a module); the subclass here only adds `__call__`, so the module calls its function.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module `module_name` callable as `function` (its attributes are unchanged)."""

    class CallableModule(types.ModuleType):
        __call__ = staticmethod(function)

    sys.modules[module_name].__class__ = CallableModule
