"""How many torch threads a command uses: one setting, a default chosen from the work's size.

torch's default is one intra-op thread per core. That pays off for big matrix products, but a
training step of the shipped models is hundreds of small ops, and every multithreaded op ends
at a barrier where all threads wait for the slowest. When another process holds a core, the
thread sharing it arrives late at every barrier: 1,000 quickstart steps took 814 s with the
default threads and 13.7 s with one (2-core machine, other work running). So the default here
is one thread until a step holds enough arithmetic for the barriers not to matter, then one
thread per `MACS_PER_THREAD` multiply-adds, never more than the cores this process may use.

The setting: the config key `threads` (`--set threads=N`) and `--threads N` on train, evaluate,
compare and sample; unset means `choose_threads(work)`. benchmarks/threads.py measures it.

>>> choose_threads(2e8, available=8)   # a quickstart training step: one thread
1
>>> choose_threads(5e10, available=8)  # an evaluation batch with K = 1000: all 8
8
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qvae.config import Config

#: Multiply-adds of work per unit (a training step, an evaluation batch, a sampling call) that
#: justify one more thread: about 0.1 s of single-core arithmetic, long enough that a thread's
#: barrier waits are a small part of it. Below it the default is one thread.
MACS_PER_THREAD = 1e9


def available_cores() -> int:
    """Cores this process may use: $OMP_NUM_THREADS when set (the user's cap), else the CPU
    affinity mask (what a container or `taskset` allows), else os.cpu_count()."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(macs: float, *, available: int | None = None) -> int:
    """The default thread count for work of `macs` multiply-adds per unit (see module doc)."""
    cap = available_cores() if available is None else max(1, available)
    return int(max(1, min(cap, macs // MACS_PER_THREAD)))


def mlp_macs(widths: list[int]) -> int:
    """Multiply-adds of one example through dense layers of these widths."""
    return sum(a * b for a, b in zip(widths, widths[1:], strict=False))


def rbm_sampling_macs(n_visible: int, n_hidden: int, num_samples: int, sweeps: int = 1) -> float:
    """Multiply-adds of `sweeps` block-Gibbs sweeps (two products each) of `num_samples` chains."""
    return 2.0 * n_visible * n_hidden * num_samples * max(1, sweeps)


def _network_macs(cfg: Config, n_pixels: int) -> int:
    n_latent = cfg.model.n_visible + cfg.model.n_hidden
    return (mlp_macs([n_pixels, *cfg.model.encoder_hidden, n_latent])
            + mlp_macs([n_latent, *cfg.model.decoder_hidden, n_pixels]))


def training_macs(cfg: Config, n_pixels: int = 784) -> float:
    """Multiply-adds of one training step of `cfg`: forward and backward (≈ 3× forward) of the
    networks for batch × K examples, plus the negative phase's sweeps."""
    nets = 3.0 * cfg.data.batch_size * cfg.train.num_iw * _network_macs(cfg, n_pixels)
    sweeps = cfg.backend.options.get("num_sweeps", 1)  # checked by the backend's model at load
    replicas = cfg.backend.options.get("num_replicas", 1)  # gibbs's replica exchange
    return nets + rbm_sampling_macs(cfg.model.n_visible, cfg.model.n_hidden,
                                    cfg.backend.num_samples * replicas, sweeps)


def evaluation_macs(cfg: Config, n_pixels: int = 784) -> float:
    """Multiply-adds of one evaluation batch: eval_batch_size × K forward passes."""
    return float(cfg.data.eval_batch_size * cfg.eval.num_iw * _network_macs(cfg, n_pixels))


def resolve(setting: int | None, macs: float) -> int:
    """`setting` when given, else the default for `macs`."""
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"threads must be an integer >= 1, got {setting!r}; e.g. --threads 1")
        return setting
    return choose_threads(macs)


def apply(setting: int | None, macs: float) -> int:
    """Set torch's intra-op threads for this process from `setting`/`macs`; returns the count."""
    n = resolve(setting, macs)
    torch.set_num_threads(n)
    return n


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` torch intra-op threads (unchanged if None), then restore
    the previous setting. The one helper for temporary thread counts (backends and log Z)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
