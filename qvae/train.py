"""The training loop for the DVAE with an RBM prior. Read it top to bottom.

One step: a minibatch, one call to the backend for the prior's negative phase, the relaxed bound,
Adam. Every random draw is seeded from (seed, rank, step), so an interrupted run resumed from its
checkpoint continues exactly as the uninterrupted run would have.
Multi-process: launch with `torchrun --nproc_per_node N -m qvae train ...`; each rank draws its own
negative samples and its own slice of every batch, and DistributedDataParallel averages gradients.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import backends
from qvae import checkpoint
from qvae.config import Config, sampler_options
from qvae.datasets import load_dataset
from qvae.dvae import DVAE
from qvae.sde import SDEVAE

#: Below this many units in the smaller RBM layer, log Z is exact and cheap: log the true ELBO.
CHEAP_LOGZ_UNITS = 16


# ------------------------------------------------------------------------ schedules
def lr_factor(cfg: Config, step: int) -> float:
    t, total, ratio = step, max(cfg.train.steps, 1), cfg.train.lr_final / cfg.train.lr
    if cfg.train.lr_schedule == "constant":
        return 1.0
    if cfg.train.lr_schedule == "exponential":
        return ratio ** (t / total)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))


def tau_at(cfg: Config, step: int) -> float:
    frac = min(step / max(cfg.train.steps - 1, 1), 1.0)
    return cfg.train.tau_start * (cfg.train.tau_end / cfg.train.tau_start) ** frac


def kl_weight_at(cfg: Config, step: int) -> float:
    warm = cfg.train.kl_warmup_steps
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct, reproducible seed for each (run, rank, step)."""
    return (seed * 1_000_003 + rank * 9_176_867 + step * 7_919) % (2**31 - 1)


# ---------------------------------------------------------------------- plumbing
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


class LossModule(nn.Module):
    """Routes the bound through forward() so DistributedDataParallel can sync gradients."""

    def __init__(self, model: DVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, negative: torch.Tensor | None, **kw: Any):
        return self.model.loss(x, negative, **kw)


def batch_at(data: torch.Tensor, cfg: Config, step: int, ctx: Dist) -> torch.Tensor:
    """The minibatch of global step `step`: epoch permutations seeded by (seed, epoch)."""
    per_epoch = len(data) // cfg.data.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the dataset has {len(data)} examples, fewer than data.batch_size="
            f"{cfg.data.batch_size}; lower the batch size"
        )
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    rows = perm[index * cfg.data.batch_size : (index + 1) * cfg.data.batch_size]
    return data[rows[ctx.rank :: ctx.world]]


def build_model(
    cfg: Config, pixel_mean: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> DVAE | SDEVAE:
    m = cfg.model
    common = dict(
        n_pixels=int(pixel_mean.numel()) if pixel_mean is not None else 784,
        n_visible=m.n_visible,
        n_hidden=m.n_hidden,
        encoder_hidden=tuple(m.encoder_hidden),
        decoder_hidden=tuple(m.decoder_hidden),
        activation=m.activation,
        rbm_init_std=m.rbm_init_std,
        pixel_mean=pixel_mean,
        seed=cfg.seed,
    )
    if m.kind == "sde":
        if mask is not None:
            raise ValueError("model.kind=sde does not support a sparse (native) RBM mask yet")
        return SDEVAE(**common, control_hidden=tuple(m.control_hidden), num_steps=m.sde_steps,
                      horizon=m.sde_horizon, tau=cfg.train.tau_end)
    return DVAE(**common, rbm_mask=mask)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    interrupted: bool = False
    train_seconds: float = 0.0  # wall time of all training steps so far, across resumes
    files: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


# --------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir` (checkpoint, metrics.jsonl, plots, eval.json).

    `callback(step, metrics)` runs after every step (tests use it to interrupt a run).
    """
    out_dir = Path(out_dir)
    ctx = init_distributed(cfg.device)
    device = torch.device(cfg.device)
    data = load_dataset(cfg.data.dataset, "train").to(device)
    backend_name, backend_options = sampler_options(cfg.backend)
    sampler = backends.get_sampler(backend_name, **backend_options)
    mask = sampler.connectivity_mask(cfg.model.n_visible, cfg.model.n_hidden)
    model = build_model(cfg, pixel_mean=data.mean(0), mask=mask).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    start, train_seconds = 0, 0.0

    ckpt_path = out_dir / checkpoint.CHECKPOINT_NAME
    if resume:
        state = checkpoint.load(ckpt_path)
        checkpoint.check_compatible(checkpoint.config_of(state), cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler_states = state.get("sampler_states") or []
        if ctx.rank < len(sampler_states) and state.get("backend") == cfg.backend.name:
            sampler.load_state_dict(sampler_states[ctx.rank])
        start, train_seconds = state["step"], float(state.get("train_seconds", 0.0))
    elif ckpt_path.exists() and ctx.main:
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue it, or choose another --out"
        )

    net: nn.Module = LossModule(model)
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(net)

    def save(step: int) -> None:
        sampler_states = [sampler.state_dict()]
        if ctx.world > 1:  # every rank's persistent chains go into the one file
            gathered: list[Any] = [None] * ctx.world
            dist.all_gather_object(gathered, sampler_states[0])
            sampler_states = gathered
        if ctx.main:
            checkpoint.save_atomic(
                {
                    "config": cfg.model_dump(mode="json"),
                    "model_args": model.config_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "train_seconds": train_seconds,
                    "backend": cfg.backend.name,
                    "sampler_states": sampler_states,
                },
                ckpt_path,
            )

    metrics_file = out_dir / "metrics.jsonl"
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(metrics_file, after_step=start)  # rows a hard kill left past the ckpt
        tensorboard = _tensorboard(out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    bar = _progress(start, cfg.train.steps, enabled=progress and ctx.main)
    gen = torch.Generator(device=device)
    sampler_seconds = 0.0
    fallbacks = 0
    step = start
    interrupted = False
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            x = batch_at(data, cfg, step, ctx)
            tau, kl_w = tau_at(cfg, step), kl_weight_at(cfg, step)
            gen.manual_seed(step_seed(cfg.seed, ctx.rank, step))

            # The one place the backend enters training: the prior's negative phase.
            # (The SDE-VAE's path-KL needs no log Z, so it has no negative phase.)
            negative, info = None, {}
            if model.needs_negative_phase:
                neg = sampler.sample(model.prior, cfg.backend.num_samples,
                                     seed=step_seed(cfg.seed + 1, ctx.rank, step))
                negative, info = neg.states.to(device), neg.info
                sampler_seconds += info["timing"]["total_s"]
                fallbacks += bool(info.get("fallback"))

            loss, metrics = net(x, negative, tau=tau, kl_weight=kl_w,
                                num_samples=cfg.train.num_iw, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1

            step_s = time.perf_counter() - t0
            train_seconds += step_s
            row = {"step": step, "tau": tau, "kl_weight": kl_w,
                   "lr": optimizer.param_groups[0]["lr"], "step_s": step_s,
                   "train_seconds": train_seconds,
                   "sampler_s_total": sampler_seconds, "fallbacks": fallbacks, **metrics,
                   **backend_scalars(info)}
            if ctx.main:
                log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
                if "elbo" in metrics:  # models without log Z report their ELBO directly
                    row["elbo_relaxed"] = metrics["elbo"]
                elif log_now and min(cfg.model.n_visible, cfg.model.n_hidden) <= CHEAP_LOGZ_UNITS:
                    row["log_z"] = float(model.prior.log_partition())
                    row["elbo_relaxed"] = metrics["bound_minus_logz"] - row["log_z"]
                if "elbo_relaxed" in row:
                    shown = {"elbo": f"{row['elbo_relaxed']:.1f}"}
                else:  # log Z too costly every step: show the bound without it
                    shown = {"elbo+logZ": f"{metrics['bound_minus_logz']:.1f}"}
                if fallbacks:
                    shown["fallbacks"] = str(fallbacks)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.1f}", **shown,
                                sampler=f"{sampler_seconds:.0f}s", refresh=False)
                if log_now:
                    _append_jsonl(metrics_file, row)
                    if tensorboard is not None:
                        for key, value in row.items():
                            tensorboard.add_scalar(key, value, step)
            if step % cfg.train.checkpoint_every == 0:
                save(step)
            if callback is not None:
                callback(step, row)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    save(step)
    result = TrainResult(out_dir, step, interrupted, train_seconds,
                         {"checkpoint": str(ckpt_path)})
    if interrupted or not ctx.main:
        return result

    from qvae.report import write_training_report

    result.files.update(write_training_report(model, sampler, cfg, out_dir))
    if cfg.eval.at_end:
        from qvae.evaluate import evaluate_model

        result.evaluation = evaluate_model(model, cfg, out_dir / "eval.json", progress=progress)
        result.files["eval"] = str(out_dir / "eval.json")
    return result


def backend_scalars(info: dict[str, Any]) -> dict[str, float]:
    """The backend's numeric facts (β_eff, acceptance, chain breaks, ...) as `backend/KEY`."""
    return {f"backend/{k}": float(v) for k, v in info.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _truncate_jsonl(path: Path, after_step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(r + "\n" for r in rows))


def _tensorboard(out_dir: Path):
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")
