"""The training loop for a latent-variable model with an RBM prior. Read it top to bottom.

It trains any `qvae.model.LatentVariableModel` (the DVAE, the SDE-VAE, a model of your own) the
same way, asking the model rather than its kind. One step: a minibatch, one call to the backend
for the negative phase of the prior whose log Z is in the model's bound (if any), the bound, Adam.
Every random draw is seeded from (seed, rank, step), so an interrupted run resumed from its
checkpoint continues exactly as the uninterrupted run would have.
Multi-process: launch with `torchrun --nproc_per_node N -m qvae train ...`; each rank draws its own
negative samples and its own slice of every batch, and DistributedDataParallel averages gradients.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import backends
from qvae import checkpoint
from qvae.atomic import write_bytes_atomic
from qvae.callable_module import make_callable
from qvae.config import Config, sampler_options
from qvae.datasets import load_dataset
from qvae.dvae import DVAE
from qvae.model import LatentVariableModel, check_metrics, metrics_to_floats, mismatch
from qvae.networks import l2_penalty
from qvae.priors import enumerated_units
from qvae.rbm import RBM
from qvae.sde import SDEVAE

#: The validation-selected checkpoint, written beside checkpoint.CHECKPOINT_NAME.
BEST_NAME = "best.pt"
#: Below this many enumerated units (the smaller RBM layer, or a Boltzmann machine's units
#: outside its largest colour class), log Z is exact and cheap: log the true ELBO.
CHEAP_LOGZ_UNITS = 16


# ------------------------------------------------------------------------ schedules
#: The DVAE reference's piecewise-constant schedule (vae.py): lr × factor after each boundary,
#: boundaries as fractions of the run.
PIECEWISE_BOUNDARIES = (0.02, 0.6, 0.75, 0.95)
PIECEWISE_FACTORS = (0.1, 1.0, 1 / 3, 0.1, 1 / 33)


def lr_factor(cfg: Config, step: int) -> float:
    t, total, ratio = step, max(cfg.train.steps, 1), cfg.train.lr_final / cfg.train.lr
    if cfg.train.lr_schedule == "constant":
        return 1.0
    if cfg.train.lr_schedule == "piecewise":  # tf.train.piecewise_constant: step <= boundary
        passed = sum(t > int(b * total) for b in PIECEWISE_BOUNDARIES)
        return PIECEWISE_FACTORS[passed]
    if cfg.train.lr_schedule == "exponential":
        return ratio ** (t / total)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))


def tau_at(cfg: Config, step: int) -> float:
    frac = min(step / max(cfg.train.steps - 1, 1), 1.0)
    return cfg.train.tau_start * (cfg.train.tau_end / cfg.train.tau_start) ** frac


def kl_weight_at(cfg: Config, step: int) -> float:
    warm = cfg.train.kl_warmup_steps
    if cfg.train.kl_warmup_fraction > 0:
        warm = max(1, round(cfg.train.kl_warmup_fraction * cfg.train.steps))
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

    def __init__(self, model: LatentVariableModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, negative: torch.Tensor | None, **kw: Any
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(x, negative, **kw)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int) -> torch.Tensor:
    """One epoch's order, drawn once per epoch rather than once per step (a 50,000-long randperm
    was 6 % of a 1-layer step); the cached tensor is only ever indexed, never written."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def batch_at(data: torch.Tensor, cfg: Config, step: int, ctx: Dist) -> torch.Tensor:
    """The minibatch of global step `step`: epoch permutations seeded by (seed, epoch)."""
    per_epoch = len(data) // cfg.data.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the dataset has {len(data)} examples, fewer than data.batch_size="
            f"{cfg.data.batch_size}; lower the batch size"
        )
    epoch, index = divmod(step, per_epoch)
    perm = _epoch_permutation(len(data), cfg.seed + epoch)
    rows = perm[index * cfg.data.batch_size : (index + 1) * cfg.data.batch_size]
    return data[rows[ctx.rank :: ctx.world]]


def build_model(
    cfg: Config, pixel_mean: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    sampler: Any = None,
) -> LatentVariableModel:
    """The model `cfg.model` describes. `pixel_mean`: the training data's column means (a
    conditional model's data rows end in label_units label columns, which are not pixels);
    `sampler`: the training backend (a qpu_native prior on its solver graph)."""
    m = cfg.model
    labels = m.conditional.label_units
    if pixel_mean is not None and labels:
        pixel_mean = pixel_mean[:-labels]
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
    prior = None
    if m.prior.kind != "rbm":
        from qvae.priors import build_prior

        prior, mask = build_prior(m.prior, m.n_visible + m.n_hidden, seed=cfg.seed,
                                  sampler=sampler), None
    return DVAE(**common, rbm_mask=mask, groups=m.groups, batch_norm=m.batch_norm,
                prior=prior, label_units=labels, relaxation=m.relaxation,
                power_beta=m.power_beta)


def check_given_model(
    model: Any, cfg: Config, data: torch.Tensor, mask: torch.Tensor | None
) -> LatentVariableModel:
    """A model passed to train(): a qvae model of the config's kind or a model of your own
    (an nn.Module implementing qvae.model.LatentVariableModel), with the prior shape, data
    width and connectivity that the config, the data and the backend imply; a ValueError
    naming the mismatch and the fix."""
    kinds = {"dvae": DVAE, "sde": SDEVAE}
    wanted = kinds[cfg.model.kind]
    reason = mismatch(model)
    if reason is not None or (isinstance(model, (DVAE, SDEVAE)) and not isinstance(model, wanted)):
        why = f" ({reason})" if reason is not None else ""
        raise ValueError(
            f"model must be a qvae {wanted.__name__} for model.kind={cfg.model.kind} (pass your "
            "networks as DVAE(..., encoder=..., decoder=...)) or a torch.nn.Module of your own "
            f"implementing qvae.model.LatentVariableModel, got {type(model).__name__}{why}"
        )
    prior = model.prior
    if not isinstance(prior, RBM):
        n = cfg.model.n_visible + cfg.model.n_hidden
        if cfg.model.prior.kind == "rbm" or prior.n_units != n:
            raise ValueError(
                f"the model's prior is a {type(prior).__name__} of {prior.n_units} units; the "
                f"config says model.prior.kind={cfg.model.prior.kind} over {n} latent units "
                "(model.n_visible + model.n_hidden); make them agree"
            )
    elif cfg.model.prior.kind != "rbm":
        raise ValueError(f"the model's prior is an RBM but the config says "
                         f"model.prior.kind={cfg.model.prior.kind}; make them agree")
    elif (prior.n_visible, prior.n_hidden) != (cfg.model.n_visible, cfg.model.n_hidden):
        raise ValueError(
            f"the model's RBM prior is {prior.n_visible} x {prior.n_hidden} but the config says "
            f"model.n_visible={cfg.model.n_visible}, model.n_hidden={cfg.model.n_hidden}; set "
            "them to the model's (they size the backend's work and the evaluation)"
        )
    width = getattr(model, "n_inputs", model.n_pixels)
    if width != data[0].numel():
        raise ValueError(
            f"the model takes {width} values per example but {cfg.data.dataset!r} has "
            f"{data[0].numel()}"
        )
    if getattr(model, "label_units", 0) != cfg.model.conditional.label_units:
        raise ValueError("the model's label_units differ from model.conditional.label_units; "
                         "make them agree")
    if mask is not None and isinstance(prior, RBM) and (prior.mask is None
                             or not torch.equal(prior.mask.cpu().float(), mask.cpu().float())):
        raise ValueError(
            f"backend {cfg.backend.name!r} samples a sparse RBM: build the model with "
            "rbm_mask=backends.get_sampler(...).connectivity_mask(n_visible, n_hidden)"
        )
    return model


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    interrupted: bool = False
    train_seconds: float = 0.0  # wall time of all training steps so far, across resumes
    files: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    #: Who actually drew the negative phase: calls per serving backend, fallbacks and the
    #: last fallback's reason, across resumes (see SamplerCounters).
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerCounters:
    """Which backend served the negative-phase calls: plain data, kept in every checkpoint so
    that `fallbacks` and `sampler_s_total` continue across `--resume`."""

    backend: str
    calls: int = 0
    fallbacks: int = 0
    sampler_s_total: float = 0.0
    served_by: dict[str, int] = field(default_factory=dict)
    fallback_reason: str | None = None

    def count(self, info: dict[str, Any]) -> None:
        self.calls += 1
        self.sampler_s_total += float(info["timing"]["total_s"])
        server = str(info.get("served_by") or self.backend)
        self.served_by[server] = self.served_by.get(server, 0) + 1
        if info.get("fallback"):
            self.fallbacks += 1
            self.fallback_reason = str(info["fallback"])

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "calls": self.calls, "fallbacks": self.fallbacks,
                "sampler_s_total": self.sampler_s_total, "served_by": dict(self.served_by),
                "fallback_reason": self.fallback_reason}

    @classmethod
    def from_dict(cls, backend: str, state: dict[str, Any] | None) -> SamplerCounters:
        state = state or {}
        return cls(str(state.get("backend") or backend), int(state.get("calls", 0)),
                   int(state.get("fallbacks", 0)), float(state.get("sampler_s_total", 0.0)),
                   {str(k): int(v) for k, v in (state.get("served_by") or {}).items()},
                   state.get("fallback_reason"))

    def fallback_servers(self) -> list[str]:
        """The backends that served calls in place of the one asked for (e.g. ['neal'])."""
        own = {self.backend, "emulator"}  # dwave's emulator is what an emulator run asked for
        return sorted(name for name in self.served_by if name not in own)

    def summary(self) -> str:
        """One line: e.g. "dwave: 0 of 20 calls; neal fallback served 20 (reason: ...)"."""
        if not self.calls:
            return f"{self.backend}: no sampler calls"
        if not self.fallbacks and not self.fallback_servers():
            servers = ", ".join(f"{k} {v}" for k, v in sorted(self.served_by.items()))
            return f"{self.backend}: served all {self.calls} calls ({servers})"
        own = self.calls - sum(self.served_by.get(n, 0) for n in self.fallback_servers())
        others = ", ".join(f"{n} fallback served {self.served_by[n]}"
                           for n in self.fallback_servers())
        reason = f" (reason: {self.fallback_reason})" if self.fallback_reason else ""
        return f"{self.backend}: {own} of {self.calls} calls; {others}{reason}"


# --------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    model: LatentVariableModel | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir` (checkpoint, metrics.jsonl, plots, eval.json).

    `callback(step, row)` runs after every step (tests use it to interrupt a run); `row` is
    the step's metrics row, its model metrics Python floats on logged steps (train.log_every)
    and 0-dim tensors on the others (reading one, float(v), is a device sync on an accelerator).
    `model`: train this model (e.g. a DVAE with your own encoder and decoder, or any nn.Module
    implementing qvae.model.LatentVariableModel) instead of the one `cfg.model` describes; its
    prior must have cfg.model's n_visible and n_hidden and it must fit the data (checked
    before the first step). To resume, pass the same architecture again.
    Runs with `cfg.threads` torch threads (unset: qvae.threads' choice for a training step of
    this size), restoring the caller's setting afterwards.
    """
    from qvae import threads

    with threads.torch_threads(threads.resolve(cfg.threads, threads.training_macs(cfg))):
        return _train(cfg, out_dir, resume=resume, progress=progress, callback=callback,
                      given=model)


def _train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool,
    progress: bool,
    callback: Callable[[int, dict[str, Any]], None] | None,
    given: LatentVariableModel | None = None,
) -> TrainResult:
    out_dir = Path(out_dir)
    ctx = init_distributed(cfg.device)
    device = torch.device(cfg.device)
    data = load_dataset(cfg.data.dataset, "train").to(device)
    # Everything the end of the run needs is checked now, before the first step.
    preflight(cfg, data, out_dir)
    backend_name, backend_options = sampler_options(cfg.backend)
    sampler = backends.get_sampler(backend_name, **backend_options)
    mask = (sampler.connectivity_mask(cfg.model.n_visible, cfg.model.n_hidden)
            if cfg.model.prior.kind == "rbm" else None)  # a BM prior brings its own graph
    if given is None:
        model = build_model(cfg, pixel_mean=data.mean(0), mask=mask, sampler=sampler).to(device)
    else:
        model = check_given_model(given, cfg, data, mask).to(device)
    # The data's values are checked once, here: the per-step loss checks only shapes (reading a
    # value back is a device sync on an accelerator).
    try:
        data = model.check_input(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data.dataset {cfg.data.dataset}, 'train' split: {exc}") from None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    start, train_seconds = 0, 0.0
    # Validation-based model selection: the best validation NLL so far and its step (plain
    # numbers, saved in every checkpoint so a resumed run keeps selecting against it).
    best: dict[str, Any] = {"nll": math.inf, "step": -1}
    validated = {"step": 0}  # the last step whose validation finished (its row is written)
    # remote: counted against its target, so a dwave target served by neal reads as a fallback
    counters = SamplerCounters(cfg.backend.target or cfg.backend.name)
    valid = _validation_set(cfg, device)
    curve_batch = _curve_batch(cfg, device, valid)

    ckpt_path = out_dir / checkpoint.CHECKPOINT_NAME
    if resume:
        state = checkpoint.load(ckpt_path, require=checkpoint.TRAINING_KEYS)
        checkpoint.check_compatible(checkpoint.config_of(state, ckpt_path), cfg)
        checkpoint.check_finite(state["model"], ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler_states = state.get("sampler_states") or []
        if ctx.rank < len(sampler_states) and state.get("backend") == cfg.backend.name:
            sampler.load_state_dict(sampler_states[ctx.rank])
        start, train_seconds = state["step"], float(state.get("train_seconds", 0.0))
        best = dict(state.get("best_valid") or best)
        done = state.get("validated_step")
        validated["step"] = (done if isinstance(done, int) and not isinstance(done, bool) else
                             _last_logged_step(out_dir / "validation.jsonl", start))
        if state.get("backend") == cfg.backend.name:  # a switched backend starts a new count
            counters = SamplerCounters.from_dict(counters.backend, state.get("sampler_counters"))
    elif ckpt_path.exists() and ctx.main:
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue it, or choose another --out"
        )

    net: nn.Module = LossModule(model)
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(net)

    last_saved = {"step": start if resume else None}  # the last good last.pt

    def save(step: int, path: Path = ckpt_path) -> None:
        bad = first_nonfinite(model.named_parameters())
        if bad is not None:  # never overwrite a good checkpoint with a diverged model
            raise TrainingDiverged(_diverged_message(
                cfg, step, f"parameter {bad}", optimizer, last_saved["step"], ckpt_path))
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
                    "custom_modules": custom_modules(model),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "train_seconds": train_seconds,
                    "backend": cfg.backend.name,
                    "sampler_states": sampler_states,
                    "best_valid": dict(best),
                    "validated_step": validated["step"],
                    "sampler_counters": counters.as_dict(),
                },
                path,
            )
            if path == ckpt_path:
                last_saved["step"] = step

    metrics_file = out_dir / "metrics.jsonl"
    created = ctx.main and not out_dir.exists()  # removed again if the start fails
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(metrics_file, after_step=start)  # rows a hard kill left past the ckpt
        _truncate_jsonl(out_dir / "validation.jsonl", after_step=start)
        tensorboard = _tensorboard(out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    # A bar only on a terminal; otherwise (a log file, --no-progress) one plain line per
    # metrics row, so a log holds readable lines rather than carriage-return updates.
    on_tty = progress and _stderr_is_tty()
    bar = _progress(start, cfg.train.steps, enabled=on_tty and ctx.main)
    gen = torch.Generator(device=device)
    step = start
    interrupted = False

    def run_validation(step: int) -> None:
        vrow = validate(model, cfg, valid, step)
        if vrow["nll"] < best["nll"]:
            best.update(nll=vrow["nll"], step=step)
            save(step, out_dir / BEST_NAME)
        if ctx.main:
            _append_jsonl(out_dir / "validation.jsonl", {**vrow, "best_nll": best["nll"],
                                                        "best_step": best["step"]})
        validated["step"] = step

    try:
        # A run stopped during the validation of its checkpoint's step validates it first, so
        # the resumed run's selection sees every point the uninterrupted one did.
        if (valid is not None and 0 < start and start % cfg.train.validate_every == 0
                and validated["step"] < start):
            run_validation(start)
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            x = batch_at(data, cfg, step, ctx)
            tau, kl_w = tau_at(cfg, step), kl_weight_at(cfg, step)
            gen.manual_seed(step_seed(cfg.seed, ctx.rank, step))

            # The one place the backend enters training: the negative phase of the prior whose
            # log Z the model's bound contains (none for a bound without log Z: the SDE-VAE's).
            negative, info = None, {}
            log_z_prior = model.log_z_prior()
            if log_z_prior is not None:
                neg = sampler.sample(log_z_prior, cfg.backend.num_samples,
                                     seed=step_seed(cfg.seed + 1, ctx.rank, step))
                negative, info = neg.states.to(device), neg.info
                counters.count(info)

            loss, metrics = net(x, negative, tau=tau, kl_weight=kl_w,
                                num_samples=cfg.train.num_iw, generator=gen)
            if step == start:
                check_metrics(metrics, model)
            if cfg.train.weight_decay > 0:
                loss = loss + cfg.train.weight_decay * l2_penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Stop at the first non-finite number, before it reaches the parameters or a
            # checkpoint. Checked after backward: DDP's all-reduce spreads a NaN gradient to
            # every rank, so all ranks stop together.
            bad = ("the loss" if not torch.isfinite(loss.detach()).all() else
                   first_nonfinite((n, p.grad) for n, p in model.named_parameters()))
            if bad is not None:
                what = bad if bad == "the loss" else f"the gradient of {bad}"
                raise TrainingDiverged(_diverged_message(
                    cfg, step + 1, what, optimizer, last_saved["step"], ckpt_path, tau))
            if cfg.train.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            bad = first_nonfinite(model.named_parameters())
            if bad is not None:
                raise TrainingDiverged(_diverged_message(
                    cfg, step + 1, f"parameter {bad} after the update", optimizer,
                    last_saved["step"], ckpt_path, tau))
            scheduler.step()
            step += 1

            step_s = time.perf_counter() - t0
            train_seconds += step_s
            log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
            # The model's metrics stay tensors except where they are read, in one transfer: a
            # logged row, and the progress bar of every step on a terminal.
            if ctx.main and (log_now or on_tty):
                metrics = metrics_to_floats(metrics)
            row = {"step": step, "tau": tau, "kl_weight": kl_w,
                   "lr": optimizer.param_groups[0]["lr"], "step_s": step_s,
                   "train_seconds": train_seconds, "threads": torch.get_num_threads(),
                   "sampler_s_total": counters.sampler_s_total,
                   "fallbacks": counters.fallbacks, **metrics, **backend_scalars(info),
                   **{f"served_by/{k}": v for k, v in counters.served_by.items()}}
            if ctx.main:
                if "elbo" in metrics:  # a model whose bound has no log Z may report its ELBO
                    row["elbo_relaxed"] = metrics["elbo"]
                elif log_now and log_z_prior is not None and (
                        enumerated_units(log_z_prior) <= CHEAP_LOGZ_UNITS):
                    row["log_z"] = float(log_z_prior.log_partition())
                    row["elbo_relaxed"] = metrics["bound_minus_logz"] - row["log_z"]
                if log_now and curve_batch is not None:
                    row.update(curve_point(model, curve_batch, tau, cfg.seed, step,
                                           row.get("log_z")))
                # One bound, every step, under one name (see BAR_BOUND).
                label, key = BAR_BOUND["elbo" if "elbo" in metrics else "bound_minus_logz"]
                bar.update(1)
                if on_tty:
                    shown = {label: f"{metrics[key]:.1f}"}
                    if counters.fallbacks:
                        shown["fallbacks"] = str(counters.fallbacks)
                    bar.set_postfix(loss=f"{metrics['loss']:.1f}", **shown,
                                    sampler=f"{counters.sampler_s_total:.0f}s", refresh=False)
                if log_now and not on_tty:
                    print(plain_line(row, cfg.train.steps, label, key), file=sys.stderr,
                          flush=True)
                if log_now:
                    _append_jsonl(metrics_file, row)
                    if tensorboard is not None:
                        for key, value in row.items():
                            tensorboard.add_scalar(key, value, step)
            if valid is not None and step % cfg.train.validate_every == 0:
                run_validation(step)
            if step % cfg.train.checkpoint_every == 0:
                save(step)
            if callback is not None:
                callback(step, row)
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        if created and step == start:  # a failed start leaves no run directory behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
    save(step)
    result = TrainResult(out_dir, step, interrupted, train_seconds,
                         {"checkpoint": str(ckpt_path)}, sampling=counters.as_dict())
    if interrupted or not ctx.main:
        return result

    from qvae.report import write_training_report

    result.files.update(write_training_report(model, sampler, cfg, out_dir))
    if cfg.eval.at_end:
        from qvae.evaluate import evaluate_model

        selected = {"checkpoint": checkpoint.CHECKPOINT_NAME, "checkpoint_step": step,
                    "training_sampler": counters.as_dict()}
        if (out_dir / BEST_NAME).exists() and best["step"] >= 0:  # evaluate the selected model
            model.load_state_dict(checkpoint.load(out_dir / BEST_NAME)["model"])
            result.files["best"] = str(out_dir / BEST_NAME)
            selected = {"checkpoint": BEST_NAME, "checkpoint_step": best["step"],
                        "checkpoint_valid_nll": best["nll"],
                        "training_sampler": counters.as_dict()}
        from qvae import threads

        # The evaluation's own thread count: its batches (× K) are far bigger than a step's.
        n_eval = threads.resolve(cfg.threads, threads.evaluation_macs(cfg))
        from qvae.logz_pt import LogZBelowBound

        with threads.torch_threads(n_eval):
            try:
                result.evaluation = evaluate_model(model, cfg, out_dir / "eval.json",
                                                   progress=progress and _stderr_is_tty(),
                                                   extra=selected)
            except LogZBelowBound as exc:  # the training is kept: say how to evaluate it
                raise LogZBelowBound(f"training finished and was saved in {out_dir}, but its "
                                     f"evaluation was refused: {exc}: qvae evaluate {out_dir} "
                                     "--logz pt") from None
        result.files["eval"] = str(out_dir / "eval.json")
    return result


#: The bound the progress bar shows, as (label, metrics key), one per model kind so that a run
#: never switches: the DVAE's relaxed ELBO of the minibatch *without* subtracting log Z (exact
#: log Z is too costly every step), the SDE-VAE's ELBO (its prior needs no log Z).
BAR_BOUND = {"bound_minus_logz": ("elbo+logZ", "bound_minus_logz"), "elbo": ("elbo", "elbo")}
#: Validation examples of the curve in training_curve.png: one fixed batch, scored at every
#: metrics row; a forward pass without gradients, about the cost of one training step.
CURVE_EXAMPLES = 200


def _curve_batch(
    cfg: Config, device: torch.device, valid: torch.Tensor | None
) -> torch.Tensor | None:
    """The fixed validation batch of the training curve: the first CURVE_EXAMPLES of the
    validation split (None, with a note, when the data set has none)."""
    if valid is None:
        try:
            valid = load_dataset(cfg.data.dataset, "valid")
        except (ValueError, FileNotFoundError) as exc:
            print(f"note: no validation curve in training_curve.png ({exc})", file=sys.stderr)
            return None
    return valid[:CURVE_EXAMPLES].to(device)


@torch.no_grad()
def curve_point(
    model: LatentVariableModel, x: torch.Tensor, tau: float, seed: int, step: int,
    log_z: float | None,
) -> dict[str, float]:
    """The training bound (K = 1, full KL weight, the step's τ) on the fixed validation batch:
    `valid_bound_minus_logz`, and `valid_elbo_relaxed` when the row has an exact log Z. Seeded
    by the step and run in eval mode, so it neither changes training nor depends on resuming."""
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator(device=x.device).manual_seed(step_seed(seed + 3, 0, step))
        # The negative phase only enters the loss, not the bound: any one state will do.
        prior = model.log_z_prior()
        negative = (None if prior is None
                    else torch.zeros(1, prior.n_units, device=x.device, dtype=x.dtype))
        _, m = model.loss(x, negative, tau=tau, kl_weight=1.0, num_samples=1, generator=gen)
    finally:
        model.train(was_training)
    m = metrics_to_floats(m)
    point = {"valid_bound_minus_logz": m["bound_minus_logz"]}
    if "elbo" in m:
        point["valid_elbo_relaxed"] = m["elbo"]
    elif log_z is not None:
        point["valid_elbo_relaxed"] = m["bound_minus_logz"] - log_z
    return point


def custom_modules(model: LatentVariableModel) -> dict[str, str]:
    """What a checkpoint of `model` cannot rebuild, by class path: the caller's own networks
    inside a qvae model, or the whole model when its class is not qvae's (load_model refuses
    such a run with what to do instead)."""
    if isinstance(model, (DVAE, SDEVAE)):
        return dict(model.custom_modules)
    return {"model": f"{type(model).__module__}.{type(model).__qualname__}"}


def plain_line(row: dict[str, Any], total: int, label: str, key: str) -> str:
    """One log line for a metrics row (no terminal: no bar)."""
    parts = [f"step {row['step']}/{total}", f"loss {row['loss']:.2f}", f"{label} {row[key]:.2f}"]
    if "valid_bound_minus_logz" in row:
        parts.append(f"valid {label} {row['valid_bound_minus_logz']:.2f}")
    parts += [f"{row['step_s'] * 1000:.0f} ms/step", f"sampler {row['sampler_s_total']:.0f}s"]
    if row.get("fallbacks"):
        parts.append(f"fallbacks {row['fallbacks']}")
    return "train: " + ", ".join(parts)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _validation_set(cfg: Config, device: torch.device) -> torch.Tensor | None:
    """The validation examples of train.validate_every (None when it is off); loaded before
    the first step so a dataset without a validation split fails at once."""
    if cfg.train.validate_every == 0:
        return None
    data = load_dataset(cfg.data.dataset, "valid")
    if cfg.train.validate_examples is not None:
        data = data[: cfg.train.validate_examples]
    return data.to(device)


def preflight(cfg: Config, data: torch.Tensor, out_dir: Path) -> None:
    """Refuse, before the first step, a run whose end would fail: the evaluation split missing
    or of another width than the training data, an output directory that cannot be written.
    (Image grids need no check: `qvae.datasets.image_shape` lays out any width.)"""
    if cfg.eval.at_end:
        try:
            test = load_dataset(cfg.data.dataset, cfg.eval.split)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{exc}. The evaluation at the end of training needs the {cfg.eval.split!r} "
                "split: give data.dataset as a directory with train/valid/test files, or "
                "pass --no-eval (--set eval.at_end=false) to train without it"
            ) from None
        if test.shape[1:] != data.shape[1:]:
            raise ValueError(
                f"data.dataset {cfg.data.dataset}: the {cfg.eval.split!r} split has "
                f"{test.shape[1]} values per example, the 'train' split {data.shape[1]}; "
                "they must match"
            )
    _check_writable(out_dir)


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir}: exists and is not a directory; choose another")
    probe = out_dir
    while not probe.exists():  # the nearest existing ancestor is where mkdir will write
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--out {out_dir}: cannot write in {probe} (no permission); choose a writable "
            "--out directory"
        )


def validate(
    model: LatentVariableModel, cfg: Config, data: torch.Tensor, step: int
) -> dict[str, Any]:
    """One validation row at `step`: the cheap NLL (qvae.evaluate.validation_nll), seeded by
    the step so that a resumed run draws exactly what the uninterrupted one did."""
    from qvae.evaluate import validation_nll

    return {"step": step, **validation_nll(model, cfg, data, step_seed(cfg.seed + 2, 0, step))}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter; the message names the step and likely causes."""


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor holding NaN/inf (None when all are finite), one sync."""
    pairs = [(name, t) for name, t in named if t is not None]
    if not pairs:
        return None
    # Fast path: a tensor whose sum is finite holds no NaN or inf (either would make the sum
    # non-finite). Summing is vectorised where isfinite is not, and this check ran twice a step
    # (15 % of a 1-layer step). A finite tensor whose sum overflows falls through to the exact
    # element-wise test below, so the answer is the same.
    sums = torch.stack([t.detach().sum() for _, t in pairs]).cpu()
    if bool(torch.isfinite(sums).all()):
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in pairs]).cpu()
    if bool(finite.all()):
        return None
    return pairs[int((~finite).nonzero()[0])][0]


def _diverged_message(
    cfg: Config, step: int, what: str, optimizer: torch.optim.Optimizer, last_saved: int | None,
    ckpt_path: Path, tau: float | None = None,
) -> str:
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_path}"
            if last_saved is not None else "no checkpoint was written")
    t = cfg.train
    lr = optimizer.param_groups[0]["lr"]
    if cfg.model.kind == "dvae" and cfg.model.relaxation == "power":
        sharp = f"a relaxation too sharp (model.power_beta = {cfg.model.power_beta:g})"
        fix = "lower model.power_beta"
    else:
        tau_text = f"τ = {tau:.3g}" if tau is not None else f"train.tau_end = {t.tau_end}"
        sharp, fix = f"a relaxation temperature too low ({tau_text})", "raise train.tau_end"
    return (
        f"training diverged at step {step}: {what} is NaN or infinite; {kept}. Likely causes: "
        f"a learning rate too high (lr now {lr:.3g}, train.lr = {t.lr}), {sharp}, or extreme "
        f"data; lower train.lr, {fix} or set train.grad_clip, then resume with "
        "`qvae train --out DIR --resume`"
    )


def backend_scalars(info: dict[str, Any]) -> dict[str, float]:
    """The backend's numeric facts (β_eff, acceptance, chain breaks, ...) as `backend/KEY`."""
    return {f"backend/{k}": float(v) for k, v in info.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Keep the rows up to `after_step` (a hard kill may have logged past the checkpoint).

    A half-written last line (killed mid-append) is dropped with a note; any other line that is
    not a row is an error naming the file and line.
    """
    if not path.exists():
        return
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise OSError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(step)
        except (ValueError, KeyError, TypeError):
            if i == last:
                print(f"note: {path}: dropped its half-written last line (a run killed while "
                      "writing it)", file=sys.stderr)
                break
            raise ValueError(
                f"{path}, line {i + 1}: not a metrics row ({line[:40]!r}); delete that line "
                "(the file is a log, the checkpoint holds the run) and resume again"
            ) from None
        if step <= after_step:
            rows.append(line)
    write_bytes_atomic(path, "".join(r + "\n" for r in rows).encode())


def _last_logged_step(path: Path, at_most: int) -> int:
    """The last step (<= at_most) with a row in a jsonl log, 0 without one: where a checkpoint
    written before `validated_step` was saved says how far its validation got."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool) and step <= at_most:
            steps.append(step)
    return max(steps, default=0)


def _tensorboard(out_dir: Path):
    """A SummaryWriter when the tensorboard package is installed, else None (and one line
    saying how to get one: metrics.jsonl holds the same numbers either way)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import sys

        print(f'note: no TensorBoard logs in {out_dir / "tensorboard"} (tensorboard is not '
              'installed); pip install "qvae[tensorboard]" to get them', file=sys.stderr)
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")


# `qvae.train(cfg, out_dir, model=...)` calls train() above (qvae.callable_module says why).
make_callable(__name__, train)
