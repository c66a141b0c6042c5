"""Pictures at the end of a run: the training curve and decoded prior samples."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from backends.base import Sampler  # noqa: E402
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
    ax1.plot(steps, [-r["bound_minus_logz"] for r in rows], label="−(bound + log Z)")
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
def decoded_prior_samples(model: DVAE, sampler: Sampler, n: int, seed: int) -> torch.Tensor:
    z = sampler.sample(model.prior, n, seed=seed).states
    return model.generate(z.to(next(model.parameters()).device))


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
