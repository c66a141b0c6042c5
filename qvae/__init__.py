"""qvae: variational autoencoders with an RBM prior and pluggable samplers.

The Python API (README, "Python API"):

- priors on any graph: `BoltzmannMachine` (labelled units, couplings on an edge list; README,
  "Priors on any graph") and its constructors `multipartite`, `qpu_native`, `from_rbm`;
- models: `RBM` (the prior, an nn.Module), `DVAE` (encoder → Bernoulli latents with an RBM
  prior → decoder; pass your own `encoder=` / `decoder=` nn.Modules), `SDEVAE`;
- training: `qvae.train(cfg, out_dir, model=None)` is the CLI's trainer (checkpoints, metrics,
  plots, evaluation), `load_config(path_or_shipped_name, ["key=value", ...])` its config;
- evaluation: `qvae.evaluate(model, cfg, out_path=None)` (test ELBO and NLL with log Z),
  `load_model(run_dir)` rebuilds a trained model from its checkpoint;
- samplers: `get_sampler(name, **options).sample(rbm, num_samples, seed=...)` returns a
  `SampleSet` (torch tensors); the `backends` package holds them all, `backends.as_dimod` for
  Ocean.

Everything but `RBM` is imported on first use, so `import qvae` stays cheap (no service, no
pydantic, no plotting). `qvae.train` and `qvae.evaluate` are the modules of those names, made
callable (`qvae.callable_module`), so `from qvae import train; train.build_model` still works.
"""

from __future__ import annotations

import importlib
from typing import Any

from qvae.rbm import RBM

__version__ = "0.1.0"

#: Public name -> (module, attribute; None: the module itself), imported on first access.
_LAZY: dict[str, tuple[str, str | None]] = {
    "DVAE": ("qvae.dvae", "DVAE"),
    "SDEVAE": ("qvae.sde", "SDEVAE"),
    "train": ("qvae.train", None),
    "evaluate": ("qvae.evaluate", None),
    "load_config": ("qvae.config", "load_config"),
    "Config": ("qvae.config", "Config"),
    "load_model": ("qvae.checkpoint", "load_model"),
    "get_sampler": ("backends", "get_sampler"),
    "SampleSet": ("backends.base", "SampleSet"),
    "BoltzmannMachine": ("qvae.boltzmann", "BoltzmannMachine"),
    "multipartite": ("qvae.boltzmann_graphs", "multipartite"),
    "qpu_native": ("qvae.boltzmann_graphs", "qpu_native"),
    "from_rbm": ("qvae.boltzmann_graphs", "from_rbm"),
}

__all__ = ["RBM", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'qvae' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
