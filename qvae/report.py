"""Pictures at the end of a run: the training curve and decoded prior samples."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from backends.base import Sampler, SampleSet  # noqa: E402
from qvae.config import Config  # noqa: E402
from qvae.model import LatentVariableModel  # noqa: E402


def plot_training_curve(metrics_file: Path, out: Path) -> Path | None:
    if not metrics_file.exists():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [r["loss"] for r in rows], label="loss")
    ax1.plot(steps, [-r["bound_minus_logz"] for r in rows], label="−(relaxed ELBO + log Z)")
    if all("elbo_relaxed" in r for r in rows):  # exact log Z was cheap enough to log
        ax1.plot(steps, [-r["elbo_relaxed"] for r in rows], label="−relaxed ELBO")
    # Held-out curves: the same bound on a fixed validation batch at each metrics row, and the
    # NLL estimates of train.validate_every when they were made.
    held = [r for r in rows if "valid_bound_minus_logz" in r]
    if held:
        ax1.plot([r["step"] for r in held], [-r["valid_bound_minus_logz"] for r in held],
                 label="validation −(relaxed ELBO + log Z)", linestyle="--")
    if held and all("valid_elbo_relaxed" in r for r in held):
        ax1.plot([r["step"] for r in held], [-r["valid_elbo_relaxed"] for r in held],
                 label="validation −relaxed ELBO", linestyle="--")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats")
    ax1.legend(fontsize=8)
    valid_nll = _jsonl_rows(metrics_file.parent / "validation.jsonl")
    if valid_nll:  # log Z included: another scale than −(ELBO + log Z), so its own axis
        nll_ax = ax1.twinx()
        nll_ax.plot([r["step"] for r in valid_nll], [r["nll"] for r in valid_nll], marker="o",
                    color="black", label="validation NLL (right axis)")
        nll_ax.set_ylabel("validation NLL (nats)")
        nll_ax.legend(loc="upper center", fontsize=8)
    ax1.set_title("training objective")
    ax2.plot(steps, [r["positive_energy"] for r in rows], label="E under q (positive)")
    ax2.plot(steps, [r["negative_energy"] for r in rows], label="E under sampler (negative)")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.set_title("prior energies")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _jsonl_rows(path: Path) -> list[dict]:
    """The rows of a metrics-style file that has a "nll" and a "step" ([] when absent)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if isinstance(r, dict) and "nll" in r and "step" in r]


def save_image_grid(
    images: torch.Tensor, out: Path, *, title: str = "", shape: tuple[int, int] | None = None,
    cols: int | None = None,
) -> Path:
    """Save (N, H·W) pixel probabilities as a grid of H×W images (`shape`; default
    `qvae.datasets.grid_shape`: 28×28 for MNIST's 784, 6×10 for 60, ...), `cols` per row
    (default: about √N)."""
    from qvae.datasets import grid_shape

    n = images.shape[0]
    h, w = shape or grid_shape(int(images.shape[1]))
    cols = cols or max(1, int(n**0.5))
    rows = -(-n // cols)
    grid = torch.ones(rows * (h + 1), cols * (w + 1))
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = (
            images[k].reshape(h, w)
        )
    fig = plt.figure(figsize=(cols * 0.5 + 0.5, rows * 0.5 + 0.8))
    plt.imshow(grid.cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
    plt.axis("off")
    if title:
        plt.title(title, fontsize=9)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


@torch.no_grad()
def decode(model: LatentVariableModel, out: SampleSet) -> torch.Tensor:
    """Pixel probabilities for binary prior samples z = [v, h] (the DVAE decodes all of z; the
    SDE-VAE, whose latent is the visible layer, keeps v: one-step generation)."""
    return model.generate(out.states.to(next(model.parameters()).device))


def decoded_prior_samples(
    model: LatentVariableModel, sampler: Sampler, n: int, seed: int
) -> torch.Tensor:
    return decode(model, sampler.sample(model.prior, n, seed=seed))


#: Decoded samples per class in the class-conditional grid (one row per class).
PER_CLASS = 8


def label_clamp(label_units: int, label: int) -> dict[int, int]:
    """The `clamp` of class `label`: the label units (the first `label_units` latent units)
    one-hot."""
    if not 0 <= label < label_units:
        raise ValueError(f"label must be in [0, {label_units}), got {label}")
    return {i: int(i == label) for i in range(label_units)}


def class_samples(
    model: LatentVariableModel, sampler: Sampler, per_class: int, seed: int
) -> list[SampleSet]:
    """Prior samples of each class of a class-conditional model: the label units clamped to
    the class's one-hot code (`clamp=`), the rest drawn from the prior's conditional."""
    units = int(getattr(model, "label_units", 0))
    if not units:
        raise ValueError("class samples need a class-conditional model (model.conditional."
                         "label_units > 0)")
    return [sampler.sample(model.prior, per_class, seed=seed + c, clamp=label_clamp(units, c))
            for c in range(units)]


def class_conditional_grid(
    model: LatentVariableModel, sampler: Sampler, out: Path, *, seed: int,
    per_class: int = PER_CLASS, shape: tuple[int, int] | None = None,
) -> Path:
    """A PNG of decoded prior samples, one row per class (label units clamped)."""
    rows = [decode(model, s) for s in class_samples(model, sampler, per_class, seed)]
    return save_image_grid(torch.cat(rows), out, shape=shape, cols=per_class,
                           title=f"decoded prior samples per class, rows 0-{len(rows) - 1} "
                           f"({sampler.name}, label units clamped)")


def plot_energy_histograms(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, row in result["backends"].items():
        ax.hist(row["energies"], bins=40, histtype="step", density=True, linewidth=1.4,
                label=f"{name} (mean {row['mean_energy']:.2f})")
    ax.set_xlabel("E(v, h)")
    ax.set_ylabel("density")
    ax.set_title("energies of the samples under the prior")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_mean_scatter(result: dict, out: Path) -> Path:
    ref = result["reference_means"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
    for name, row in result["backends"].items():
        ax.scatter(ref, row["means"], s=8, alpha=0.7, label=name)
    ax.set_xlabel(f"reference mean ({result['reference'].split(' ')[0]})")
    ax.set_ylabel("backend mean")
    ax.set_title("unit means: backend vs reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_training_report(
    model: LatentVariableModel, sampler: Sampler, cfg: Config, out_dir: Path
) -> dict:
    files = {}
    curve = plot_training_curve(out_dir / "metrics.jsonl", out_dir / "training_curve.png")
    if curve is not None:
        files["training_curve"] = str(curve)
    if cfg.train.sample_grid:
        images = decoded_prior_samples(model, sampler, cfg.train.sample_grid, cfg.seed)
        from qvae.datasets import image_shape

        grid = save_image_grid(images, out_dir / "samples.png",
                               shape=image_shape(cfg.data.dataset, int(images.shape[1])),
                               title=f"decoded prior samples ({sampler.name})")
        files["samples"] = str(grid)
        if getattr(model, "label_units", 0):
            files["samples_by_class"] = str(class_conditional_grid(
                model, sampler, out_dir / "samples_by_class.png", seed=cfg.seed,
                shape=image_shape(cfg.data.dataset, int(images.shape[1]))))
    files["metrics"] = str(out_dir / "metrics.jsonl")
    return files
