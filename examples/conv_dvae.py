"""A convolutional DVAE on binarized MNIST, trained by qvae's own trainer from Python.

The encoder and decoder are ordinary torch modules of your choosing; qvae supplies the RBM
prior, the negative phase from a sampler backend, the relaxed bound, checkpoints, metrics,
plots and the test evaluation (`qvae.train` is the trainer that `qvae train` runs).

    python examples/conv_dvae.py                  # 2,000 steps, 100 + 100 latent units
    python examples/conv_dvae.py --steps 500 --out runs/conv
    python examples/conv_dvae.py --tiny           # seconds: what CI runs

A checkpoint holds weights, never code, so a model with your own networks is reloaded by
building it again and loading the state dict (the end of this script does exactly that);
`qvae evaluate RUN` on such a run says so in one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import qvae
from qvae import checkpoint, datasets, logz

IMAGE = (1, 28, 28)


def conv_encoder(n_latent: int) -> nn.Module:
    """x (B, 1, 28, 28) -> posterior logits (B, n_latent)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),   # 14 × 14
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # 7 × 7
        nn.Flatten(), nn.Linear(32 * 7 * 7, n_latent),
    )


def conv_decoder(n_latent: int) -> nn.Module:
    """z (B, n_latent) -> pixel logits (B, 1, 28, 28) (the DVAE flattens them)."""
    return nn.Sequential(
        nn.Linear(n_latent, 32 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (32, 7, 7)),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
    )


def build(cfg: qvae.Config) -> qvae.DVAE:
    """The model, from the config's latent sizes and seed: called again to reload it."""
    n_latent = cfg.model.n_visible + cfg.model.n_hidden
    torch.manual_seed(cfg.seed)  # the networks' initial weights
    return qvae.DVAE(n_pixels=784, n_visible=cfg.model.n_visible, n_hidden=cfg.model.n_hidden,
                     encoder=conv_encoder(n_latent), decoder=conv_decoder(n_latent),
                     input_shape=IMAGE, seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--tiny", action="store_true",
                   help="8 + 8 latent units, 5 steps, a 20-image evaluation: seconds (CI)")
    p.add_argument("--out", type=Path, default=Path("runs/conv-dvae"), help="run directory")
    args = p.parse_args(argv)

    overrides = ["name=conv-dvae", f"train.steps={5 if args.tiny else args.steps}"]
    if args.tiny:
        overrides += ["model.n_visible=8", "model.n_hidden=8",
                      "data.batch_size=20", "backend.num_samples=20", "train.log_every=1",
                      "train.sample_grid=4", "eval.max_examples=20", "eval.num_iw=5",
                      "backend.options={num_sweeps: 2, burn_in: 5}"]
    if (args.out / checkpoint.CHECKPOINT_NAME).exists():
        raise SystemExit(f"{args.out} already holds a run; choose another --out")
    cfg = qvae.load_config("quickstart", overrides)  # the shipped config, any directory
    result = qvae.train(cfg, args.out, model=build(cfg), progress=False)
    ev = result.evaluation or {}
    print(f"trained {result.step} steps into {args.out}: test NLL {ev.get('nll', float('nan')):.2f}"
          f" (K={ev.get('num_iw')}, {ev.get('num_examples')} images)")

    # Reload: rebuild the networks, load the weights (the checkpoint holds no code).
    again = build(cfg)
    again.load_state_dict(checkpoint.load(args.out)["model"])
    again.eval()
    x = datasets.load_dataset("mnist", "test")[:10]
    log_z = logz.log_partition(again.prior, num_betas=200, num_runs=16, seed=0).log_z
    elbo = float(again.discrete_elbo(x, log_z, generator=torch.Generator().manual_seed(0)).mean())
    (args.out / "reloaded.json").write_text(json.dumps({"elbo_10_test_images": elbo}))
    print(f"reloaded from {args.out / 'last.pt'}: ELBO on 10 test images {elbo:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
