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
from qvae.dvae import DVAE  # noqa: E402


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
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats")
    ax1.legend()
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


def save_image_grid(images: torch.Tensor, out: Path, *, title: str = "") -> Path:
    """Save (N, 784) pixel probabilities as a square grid of 28×28 images."""
    n = images.shape[0]
    side = int(images.shape[1] ** 0.5)
    cols = max(1, int(n**0.5))
    rows = -(-n // cols)
    grid = torch.ones(rows * (side + 1), cols * (side + 1))
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (side + 1) : r * (side + 1) + side, c * (side + 1) : c * (side + 1) + side] = (
            images[k].reshape(side, side)
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
def decode(model: torch.nn.Module, out: SampleSet) -> torch.Tensor:
    """Pixel probabilities for binary prior samples z = [v, h] (the DVAE decodes all of z; the
    SDE-VAE, whose latent is the visible layer, keeps v: one-step generation)."""
    return model.generate(out.states.to(next(model.parameters()).device))


def decoded_prior_samples(model: DVAE, sampler: Sampler, n: int, seed: int) -> torch.Tensor:
    return decode(model, sampler.sample(model.prior, n, seed=seed))


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


def write_training_report(model: DVAE, sampler: Sampler, cfg: Config, out_dir: Path) -> dict:
    files = {}
    curve = plot_training_curve(out_dir / "metrics.jsonl", out_dir / "training_curve.png")
    if curve is not None:
        files["training_curve"] = str(curve)
    if cfg.train.sample_grid:
        images = decoded_prior_samples(model, sampler, cfg.train.sample_grid, cfg.seed)
        grid = save_image_grid(images, out_dir / "samples.png",
                               title=f"decoded prior samples ({sampler.name})")
        files["samples"] = str(grid)
    files["metrics"] = str(out_dir / "metrics.jsonl")
    return files
