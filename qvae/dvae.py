"""Discrete VAE whose prior is an RBM over all latent units z = [v, h] (GumBolt-style training).

Training maximises the relaxed bound (DESIGN.md, "DVAE / QVAE objective")

    L̃(x) = E_L[log p(x|ζ) - E(ζ) - log q̃(ζ|x)] - log Z,   ζ = σ((α + L)/τ), L ~ Logistic(0, 1),

where log Z enters only through its gradient -E_p[∇E], supplied by prior samples from a backend.
Evaluation uses hard z ~ q(z|x): the discrete ELBO, the importance-weighted bound, and (for tiny
latent spaces) the exact log p(x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qvae.rbm import RBM, enumerate_states
from qvae.relax import sample_logistic

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU,
}
MAX_EXACT_LATENT = 20


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _log_bernoulli(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ t log σ(l) + (1 - t) log σ(-l) over the last axis (t may be relaxed, in [0, 1])."""
    return (target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).sum(-1)


def _logistic_noise(shape: tuple[int, ...], like: torch.Tensor, generator: Any) -> torch.Tensor:
    """Logistic(0, 1) noise drawn on the generator's device, returned on `like`'s."""
    device = generator.device if generator is not None else like.device
    return sample_logistic(shape, generator, device=device, dtype=like.dtype).to(like.device)


def init_output_bias(decoder: nn.Sequential, pixel_mean: Any, n_pixels: int) -> None:
    """Start the decoder at the data's pixel means (logit of the clamped mean): a standard trick
    that saves the first epochs from learning the background."""
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).reshape(-1)
    if mean.numel() != n_pixels or not torch.isfinite(mean).all():
        raise ValueError(f"pixel_mean must be {n_pixels} finite values")
    with torch.no_grad():
        decoder[-1].bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class DVAE(nn.Module):
    """Encoder → Bernoulli latents z = [v, h] with an RBM prior → factorial Bernoulli decoder.

    The default shape is the published "1-layer nonlinear" MNIST model: 784-200-200-200 encoder,
    200 latent units (100 visible + 100 hidden RBM units), mirrored decoder.

    >>> import torch
    >>> m = DVAE(n_pixels=8, n_visible=3, n_hidden=2, encoder_hidden=[16], decoder_hidden=[16],
    ...          seed=0)
    >>> x = torch.bernoulli(torch.full((4, 8), 0.5))
    >>> loss, metrics = m.loss(x, torch.zeros(10, 5), tau=0.5)
    >>> loss.backward(); sorted(metrics)[:3]
    ['bound_minus_logz', 'elbo_surrogate', 'kl_minus_logz']
    >>> m.exact_log_px(x, float(m.prior.log_partition())).shape
    torch.Size([4])
    """

    #: The prior enters through log Z, whose gradient needs samples from a backend.
    needs_negative_phase = True

    def __init__(
        self,
        n_pixels: int = 784,
        n_visible: int = 100,
        n_hidden: int = 100,
        encoder_hidden: Sequence[int] = (200, 200),
        decoder_hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        rbm_init_std: float = 0.01,
        rbm_mask: torch.Tensor | None = None,
        pixel_mean: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_count(n_pixels, "n_pixels")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}"
            )
        enc, dec = [int(s) for s in encoder_hidden], [int(s) for s in decoder_hidden]
        if any(s < 1 for s in enc + dec):
            raise ValueError(f"hidden layer sizes must be >= 1, got {enc} and {dec}")
        if rbm_mask is not None:
            rbm_mask = torch.as_tensor(rbm_mask, dtype=torch.float32)
        self.n_pixels, self.activation, self.seed = n_pixels, activation, seed
        self.encoder_hidden, self.decoder_hidden = enc, dec
        self.rbm_init_std = float(rbm_init_std)
        n_latent = n_visible + n_hidden
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.encoder = _mlp([n_pixels, *enc, n_latent], activation)
            self.decoder = _mlp([n_latent, *dec, n_pixels], activation)
        self.prior = RBM(n_visible, n_hidden, mask=rbm_mask, init_std=rbm_init_std, seed=seed)
        if pixel_mean is not None:
            init_output_bias(self.decoder, pixel_mean, n_pixels)

    @property
    def n_latent(self) -> int:
        return self.prior.n_units

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values) to rebuild the model; load the state dict
        for the weights. The mask, if any, is stored as nested lists; pixel_mean only initialises
        a bias that the state dict holds, so it is left out."""
        mask = self.prior.mask
        return {
            "n_pixels": self.n_pixels, "n_visible": self.prior.n_visible,
            "n_hidden": self.prior.n_hidden, "encoder_hidden": list(self.encoder_hidden),
            "decoder_hidden": list(self.decoder_hidden), "activation": self.activation,
            "rbm_init_std": self.rbm_init_std,
            "rbm_mask": None if mask is None else mask.int().tolist(), "seed": self.seed,
        }

    # ------------------------------------------------------------------ checks
    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.n_pixels:
            raise ValueError(f"x must have shape (batch, {self.n_pixels}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        if ((x < 0) | (x > 1)).any():
            raise ValueError("x must lie in [0, 1] (Bernoulli likelihood)")
        return x.to(self.prior.weight.dtype)

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior logits α(x), shape (B, n_latent)."""
        return self.encoder(self._check_x(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits for latents z (any leading shape), shape (..., n_pixels)."""
        return self.decoder(z)

    def relaxed_sample(
        self, logits: torch.Tensor, tau: float, num_samples: int = 1, generator: Any = None
    ) -> torch.Tensor:
        """ζ = σ((α + L)/τ) with L ~ Logistic(0, 1), shape (S, B, n_latent)."""
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        _check_count(num_samples, "num_samples")
        noise = _logistic_noise((num_samples, *logits.shape), logits, generator)
        return torch.sigmoid((logits + noise) / tau)

    def _hard_sample(self, logits: torch.Tensor, num_samples: int, generator: Any) -> torch.Tensor:
        noise = _logistic_noise((num_samples, *logits.shape), logits, generator)
        return (logits + noise > 0).to(logits.dtype)

    def prior_energy(self, z: torch.Tensor) -> torch.Tensor:
        """E(z) for z = [v, h] under the prior, for any leading shape (..., n_latent) -> (...)."""
        if z.shape[-1] != self.n_latent:
            raise ValueError(f"z must end in {self.n_latent} units, got shape {tuple(z.shape)}")
        flat = z.reshape(-1, self.n_latent)
        nv = self.prior.n_visible
        return self.prior.energy(flat[:, :nv], flat[:, nv:]).reshape(z.shape[:-1])

    def _log_weights(self, x: torch.Tensor, logits: torch.Tensor, z: torch.Tensor):
        """(log p(x|z), E(z), log q(z|x)), each (S, B), for z of shape (S, B, n_latent)."""
        log_px = -F.binary_cross_entropy_with_logits(
            self.decode(z), x.expand(z.shape[0], *x.shape), reduction="none"
        ).sum(-1)
        return log_px, self.prior_energy(z), _log_bernoulli(logits, z)

    # ------------------------------------------------------------------ training
    def loss(
        self, x: torch.Tensor, negative: torch.Tensor, *, tau: float, kl_weight: float = 1.0,
        num_samples: int = 1, generator: Any = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss (batch mean) whose gradient is -∇L̃, and metrics.

        `negative` (M, n_latent): prior samples (e.g. `SampleSet.states`), detached here; the
        term -kl_weight·mean_j E(z_j) has gradient kl_weight·∇log Z. With num_samples K > 1 the
        bound is the importance-weighted log mean_k exp(w_k), w_k = log p(x|ζ_k) -
        kl_weight·(E(ζ_k) + log q̃(ζ_k|x)); kl_weight = 1 gives the proper IW bound, other values
        a tempered one (and K = 1 reduces to the usual KL-weighted bound).
        Metrics: loss, bound_minus_logz (L̃ + log Z at kl_weight; alias elbo_surrogate), recon,
        kl_minus_logz (E[E(ζ) + log q̃]), positive_energy (E[E(ζ)]), negative_energy.
        """
        x = self._check_x(x)
        if not isinstance(negative, torch.Tensor):
            raise TypeError(f"negative must be a torch.Tensor, got {type(negative).__name__}")
        if negative.dim() != 2 or negative.shape[1] != self.n_latent or negative.shape[0] < 1:
            raise ValueError(
                f"negative must have shape (M >= 1, {self.n_latent}), got {tuple(negative.shape)}"
            )
        if not torch.isfinite(negative).all():
            raise ValueError("negative samples contain NaN or infinite values")
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight)) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        logits = self.encoder(x)
        zeta = self.relaxed_sample(logits, tau, num_samples, generator)
        log_px, energy, log_q = self._log_weights(x, logits, zeta)
        kl = energy + log_q
        weights = log_px - kl_weight * kl  # (K, B)
        bound = torch.logsumexp(weights, 0) - math.log(num_samples)
        neg_energy = self.prior_energy(negative.detach().to(x.dtype)).mean()
        loss = -bound.mean() - kl_weight * neg_energy
        bound_value = float(bound.detach().mean())
        metrics = {
            "loss": float(loss.detach()), "bound_minus_logz": bound_value,
            "elbo_surrogate": bound_value, "recon": float(log_px.detach().mean()),
            "kl_minus_logz": float(kl.detach().mean()),
            "positive_energy": float(energy.detach().mean()),
            "negative_energy": float(neg_energy.detach()),
        }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def discrete_elbo(
        self, x: torch.Tensor, log_z: float, num_samples: int = 1, generator: Any = None
    ) -> torch.Tensor:
        """E_q[log p(x|z) - E(z) - log q(z|x)] - log Z with hard z ~ q(z|x), shape (B,)."""
        x = self._check_x(x)
        logits = self.encoder(x)
        z = self._hard_sample(logits, _check_count(num_samples, "num_samples"), generator)
        log_px, energy, log_q = self._log_weights(x, logits, z)
        return (log_px - energy - log_q).mean(0) - float(log_z)

    @torch.no_grad()
    def iw_bound(
        self, x: torch.Tensor, log_z: float, num_samples: int = 1000, batch_chunk: int = 100,
        generator: Any = None,
    ) -> torch.Tensor:
        """log (1/K) Σ_k p(x|z_k) exp(-E(z_k)) / (Z q(z_k|x)), z_k ~ q(z|x); shape (B,).

        The K samples are drawn `batch_chunk` at a time to bound memory."""
        x = self._check_x(x)
        _check_count(num_samples, "num_samples")
        _check_count(batch_chunk, "batch_chunk")
        logits = self.encoder(x)
        parts = []
        for start in range(0, num_samples, batch_chunk):
            z = self._hard_sample(logits, min(batch_chunk, num_samples - start), generator)
            log_px, energy, log_q = self._log_weights(x, logits, z)
            parts.append(torch.logsumexp((log_px - energy - log_q).double(), 0))
        total = torch.logsumexp(torch.stack(parts), 0)
        return (total - math.log(num_samples) - float(log_z)).to(x.dtype)

    @torch.no_grad()
    def exact_log_px(self, x: torch.Tensor, log_z: float, chunk: int = 4096) -> torch.Tensor:
        """log p(x) = log Σ_z p(x|z) exp(-E(z)) / Z by enumerating all 2^n_latent states, (B,)."""
        x = self._check_x(x)
        n = self.n_latent
        if n > MAX_EXACT_LATENT:
            raise ValueError(
                f"exact_log_px enumerates 2^{n} latent states, over the limit of "
                f"2^{MAX_EXACT_LATENT}; use iw_bound for a model this size"
            )
        dev, parts = x.device, []
        for start in range(0, 2**n, chunk):
            z = enumerate_states(n, start, min(start + chunk, 2**n), x.dtype).to(dev)
            logits = self.decode(z)  # (C, P): log p(x|z) = x·logσ(l) + (1-x)·logσ(-l)
            log_px = x @ F.logsigmoid(logits).T + (1 - x) @ F.logsigmoid(-logits).T
            parts.append((log_px - self.prior_energy(z)).double())
        return (torch.logsumexp(torch.cat(parts, 1), 1) - float(log_z)).to(x.dtype)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities σ(decode(z)) for latent states z (e.g. prior samples)."""
        if z.shape[-1] != self.n_latent:
            raise ValueError(f"z must end in {self.n_latent} units, got shape {tuple(z.shape)}")
        return torch.sigmoid(self.decode(z.to(self.prior.weight.dtype)))
