"""A qvae sampler backend inside a hand-written PyTorch training loop.

A DVAE (encoder → 16 + 16 binary latents with an RBM prior → decoder) trained with your own
loop: each step asks a backend for samples of the current prior (the negative phase, whose mean
energy carries the gradient of log Z) and takes an Adam step on the relaxed bound. Swap
`--backend gibbs` for `neal`, `exact`, `dwave` (with `--option solver=emulator` offline) or
`remote`: the loop does not change.

    python examples/own_loop.py                   # 300 steps, a minute or so on a CPU
    python examples/own_loop.py --backend neal --option num_sweeps=100
    python examples/own_loop.py --tiny            # seconds: what CI runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

import backends
import qvae
from qvae import datasets, logz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    p.add_argument("--backend", default="gibbs", help="sampler backend (default gibbs)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, e.g. num_sweeps=20 (repeatable)")
    p.add_argument("--tiny", action="store_true", help="5 steps on 200 images: seconds (CI)")
    p.add_argument("--out", type=Path, default=Path("runs/own-loop.json"), help="result JSON")
    args = p.parse_args(argv)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    steps = 5 if args.tiny else args.steps

    torch.manual_seed(0)
    train_x = datasets.load_dataset("mnist", "train")[: 200 if args.tiny else 10_000]
    test_x = datasets.load_dataset("mnist", "test")[:100]
    model = qvae.DVAE(n_pixels=784, n_visible=16, n_hidden=16, encoder_hidden=[256],
                      decoder_hidden=[256], pixel_mean=train_x.mean(0), seed=0)
    sampler = backends.get_sampler(args.backend, **options)  # ValueError lists valid options
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    losses = []
    for step in range(steps):
        x = train_x[torch.randint(len(train_x), (50,), generator=gen)]
        # The negative phase: samples z ~ exp(-E(z)) / Z of the current prior, from the backend.
        out = sampler.sample(model.prior, num_samples=64, seed=step)   # a backends.SampleSet
        tau = 1.0 * (0.5 / 1.0) ** (step / max(steps - 1, 1))           # anneal the relaxation
        # loss = -(relaxed bound + log Z) - mean E(negative): its gradient is -∇(relaxed bound)
        loss, metrics = model.loss(x, out.states, tau=tau, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(metrics["loss"]))  # metrics are 0-dim tensors
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {metrics['loss']:.1f}, sampler "
                  f"{out.info['timing']['total_s'] * 1000:.1f} ms")

    # 16 + 16 units: log Z is exact (2^16 terms), so the test ELBO is a true bound.
    log_z = logz.log_partition(model.prior).log_z
    elbo = float(model.discrete_elbo(test_x, log_z, generator=gen).mean())
    print(f"test ELBO on {len(test_x)} images: {elbo:.2f} nats (log Z = {log_z:.2f}, exact)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": args.backend, "steps": steps, "losses": losses,
                                    "test_elbo": elbo, "log_z": log_z}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
