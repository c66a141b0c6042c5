"""SDE-VAE: a latent diffusion whose prior drift is ∇log π_τ of the RBM relaxation (docs/sde.md).

Latent u ∈ ℝ^nv (the RBM's visible layer; hidden units are summed out in F). With the same
diffusion √2 dW on both paths (docs/sde.md):

    prior      du = ∇log π_τ(u) dt + √2 dW,                  u_0 ~ p_0 = Π Logistic(0, 1)
    posterior  du = (∇log π_τ(u) + √2 κ_φ(u, t, x)) dt + √2 dW,  u_0 ~ q_0 = Π Logistic(m, e^s)

with (m, s) from the encoder; the decoder reads v = σ(u_T/τ). The generative model is the
*discretised* prior chain (Euler–Maruyama, N steps of Δt = T/N): per step both transitions are
N(·, 2Δt I) with means that differ by √2 κ_k Δt, so KL of step k is ½‖κ_k‖²Δt and, exactly
for the discretised path laws,

    ELBO = E_Q[log p(x | σ(u_N/τ))] − KL(q_0‖p_0) − E_Q Σ_k ½‖κ_φ(u_k, t_k, x)‖² Δt  ≤  log p_N(x).

No log Z appears anywhere: the RBM parameters enter only through the drift and learn pathwise.
The per-path log-ratio log dQ/dP = Σ_k (½‖κ_k‖²Δt + √Δt κ_k·ξ_k) + log q_0 − log p_0 (ξ_k the
step noise) has the path KL as its mean; it gives the importance-weighted bound (`iw_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qvae import relax
from qvae.networks import (
    ACTIVATIONS,
    PixelInput,
    check_count,
    check_positive,
    costs_no_sync,
    init_output_bias,
    mlp,
    run_custom,
    shape_of,
)
from qvae.rbm import RBM

VectorField = Callable[[torch.Tensor, float], torch.Tensor]


class SDEPath(NamedTuple):
    """`path` (N+1, *u0.shape); `path_kl` Σ_k ½‖κ_k‖²Δt and `log_ratio` the per-path
    log dQ/dP of the transitions, Σ_k (½‖κ_k‖²Δt + √Δt κ_k·ξ_k), both of shape u0.shape[:-1]."""

    path: torch.Tensor
    path_kl: torch.Tensor
    log_ratio: torch.Tensor


def girsanov_path_kl(control_values: torch.Tensor, dt: float) -> torch.Tensor:
    """Σ_k ½‖κ_k‖²Δt for controls of shape (N, ..., d) → (...): the exact KL between two
    Euler–Maruyama chains with diffusion √2 whose drifts differ by √2 κ_k."""
    return 0.5 * dt * control_values.pow(2).sum(-1).sum(0)


def _noise(kind: str, shape: Sequence[int], like: torch.Tensor, generator: Any) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    if kind == "logistic":
        out = relax.sample_logistic(tuple(shape), generator, device=dev, dtype=like.dtype)
    else:
        out = torch.randn(tuple(shape), generator=generator, device=dev, dtype=like.dtype)
    return out.to(like.device)


def euler_maruyama(
    drift_fn: VectorField, u0: torch.Tensor, num_steps: int, dt: float, generator: Any = None,
    control_fn: VectorField | None = None,
) -> SDEPath:
    """Simulate du = (drift(u, t) + √2 κ(u, t)) dt + √2 dW from u0 (κ = 0 without control_fn).

    u_{k+1} = u_k + (drift + √2 κ_k)Δt + √(2Δt) ξ_k, with reparameterised ξ_k ~ N(0, I), so
    everything is differentiable pathwise.

    >>> out = euler_maruyama(lambda u, t: -u, torch.zeros(5, 2), 4, 0.25,
    ...                      control_fn=lambda u, t: torch.ones_like(u))
    >>> out.path.shape, float(out.path_kl[0])   # ½·‖(1, 1)‖²·T = 1.0
    (torch.Size([5, 5, 2]), 1.0)
    """
    check_count(num_steps, "num_steps")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    u, path, controls, noise_dot = u0, [u0], [], u0.new_zeros(u0.shape[:-1])
    for k in range(num_steps):
        t = k * dt
        xi = _noise("normal", u.shape, u, generator)
        step = drift_fn(u, t)
        if control_fn is not None:
            kappa = control_fn(u, t)
            controls.append(kappa)
            noise_dot = noise_dot + math.sqrt(dt) * (kappa * xi).sum(-1)
            step = step + math.sqrt(2.0) * kappa
        u = u + dt * step + math.sqrt(2.0 * dt) * xi
        path.append(u)
    path_kl = girsanov_path_kl(torch.stack(controls), dt) if controls else torch.zeros_like(
        noise_dot)
    return SDEPath(torch.stack(path), path_kl, path_kl + noise_dot)


def rbm_drift(rbm: RBM, u: torch.Tensor, tau: float) -> torch.Tensor:
    """∇log π_τ(u) for u of any leading shape, differentiable in u and the RBM parameters."""
    params = relax.RelaxParams(rbm.effective_weight(), rbm.visible_bias, rbm.hidden_bias)
    flat = u.reshape(-1, u.shape[-1])
    return relax.log_density_and_grad(params, flat, tau)[1].reshape(u.shape)


class SDEVAE(PixelInput, nn.Module):
    """Encoder → q_0 and control κ_φ → posterior SDE on u ∈ ℝ^nv → decoder on σ(u_T/τ).

    `tau` (constructor) is the model's relaxation temperature, used by `elbo`, `iw_bound` and
    `sample_prior_path` when no tau is passed; `loss` takes tau per call like DVAE, so the
    trainer's schedule applies (evaluate at the final training tau). The control net's output
    layer starts at zero: initially the posterior path has the prior's drift. Implements
    `qvae.model.LatentVariableModel` (no log Z: `log_z_prior()` is None).

    >>> m = SDEVAE(n_pixels=6, n_visible=3, n_hidden=2, encoder_hidden=[8], decoder_hidden=[8],
    ...            control_hidden=[8], num_steps=4, seed=0)
    >>> x = torch.bernoulli(torch.full((4, 6), 0.5))
    >>> loss, metrics = m.loss(x, None, tau=0.5); loss.backward()
    >>> m.elbo(x).shape, m.sample_prior_path(7).shape, m.generate(torch.ones(2, 3)).shape
    (torch.Size([4]), torch.Size([7, 3]), torch.Size([2, 6]))
    """

    def __init__(
        self, n_pixels: int = 784, n_visible: int = 100, n_hidden: int = 100,
        encoder_hidden: Sequence[int] = (200, 200), decoder_hidden: Sequence[int] = (200, 200),
        control_hidden: Sequence[int] = (200,), activation: str = "tanh",
        rbm_init_std: float = 0.01, num_steps: int = 20, horizon: float = 1.0, tau: float = 0.5,
        pixel_mean: torch.Tensor | None = None, seed: int | None = None, *,
        encoder: nn.Module | None = None, decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        custom = {name: net for name, net in (("encoder", encoder), ("decoder", decoder))
                  if net is not None}
        for name, net in custom.items():
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(net).__name__}")
        if "decoder" in custom and pixel_mean is not None:
            raise ValueError(
                "pixel_mean initialises the output bias of the built-in MLP decoder; with your "
                "own decoder, initialise it yourself and leave pixel_mean out"
            )
        check_count(n_pixels, "n_pixels")
        check_count(num_steps, "num_steps")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use {sorted(ACTIVATIONS)}")
        if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        hidden = (encoder_hidden, decoder_hidden, control_hidden)
        enc, dec, ctl = ([int(s) for s in h] for h in hidden)
        if any(s < 1 for s in enc + dec + ctl):
            raise ValueError(f"hidden layer sizes must be >= 1, got {enc}, {dec} and {ctl}")
        self.n_pixels, self.activation, self.seed = n_pixels, activation, seed
        self.encoder_hidden, self.decoder_hidden, self.control_hidden = enc, dec, ctl
        self.rbm_init_std, self.num_steps, self.horizon = float(rbm_init_std), num_steps, horizon
        self.tau = self._check_tau(tau)
        act = ACTIVATIONS[activation]
        #: Class paths of the networks passed in (a checkpoint holds their weights, never code).
        self.custom_modules = {name: f"{type(net).__module__}.{type(net).__qualname__}"
                               for name, net in custom.items()}
        feat = (self._feature_size(custom["encoder"], n_pixels) if "encoder" in custom
                else enc[-1] if enc else n_pixels)
        width = ctl[0] if ctl else n_visible
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if "encoder" in custom:
                self.encoder: nn.Module = custom["encoder"]  # h(x), any feature width
            else:
                trunk = mlp([n_pixels, *enc], activation) if enc else nn.Identity()
                self.encoder = nn.Sequential(trunk, act()) if enc else trunk  # h(x)
            self.initial_head = nn.Linear(feat, 2 * n_visible)  # (m, s) of q_0(u_0|x)
            # κ(u, t, x) = MLP([u, t/T, h(x)]), its first layer split so h(x) is mapped once
            self.control_state = nn.Linear(n_visible + 1, width)
            self.control_feature = nn.Linear(feat, width, bias=False)
            self.control_out = nn.Sequential(act(), mlp([*ctl, n_visible], activation)) if ctl \
                else nn.Identity()
            self.decoder = (custom["decoder"] if "decoder" in custom
                            else mlp([n_visible, *dec, n_pixels], activation))
        if "decoder" in custom:
            self._check_decoder(n_visible, n_pixels)
        last = self.control_out[-1][-1] if ctl else self.control_state
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
            if not ctl:
                self.control_feature.weight.zero_()
        self.prior = RBM(n_visible, n_hidden, init_std=rbm_init_std, seed=seed)
        if pixel_mean is not None:
            init_output_bias(self.decoder, pixel_mean, n_pixels)

    n_visible = property(lambda self: self.prior.n_visible, doc="latent size nv")
    dt = property(lambda self: self.horizon / self.num_steps, doc="Euler–Maruyama step T/N")

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments to rebuild the model (pixel_mean lives in the state dict)."""
        return {
            "n_pixels": self.n_pixels, "n_visible": self.n_visible,
            "n_hidden": self.prior.n_hidden, "encoder_hidden": list(self.encoder_hidden),
            "decoder_hidden": list(self.decoder_hidden),
            "control_hidden": list(self.control_hidden), "activation": self.activation,
            "rbm_init_std": self.rbm_init_std, "num_steps": self.num_steps,
            "horizon": self.horizon, "tau": self.tau, "seed": self.seed,
        }

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _feature_size(encoder: nn.Module, n_pixels: int) -> int:
        """Dry run of the caller's encoder: x (2, n_pixels) -> features h(x) of shape (2, F)."""
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                out = run_custom(lambda: encoder(torch.zeros(2, n_pixels)), "encoder",
                                 (2, n_pixels))
        finally:
            encoder.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(
                f"encoder must map x of shape (2, {n_pixels}) to features of shape (2, F) "
                f"(any F; the SDE-VAE's heads read them); it returned {shape_of(out)}"
            )
        return int(out.shape[1])

    def _check_decoder(self, n_visible: int, n_pixels: int) -> None:
        """Dry run of the caller's decoder: v (2, n_visible) -> pixel logits (2, n_pixels)."""
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            with torch.no_grad():
                out = run_custom(lambda: self.decoder(torch.zeros(2, n_visible)), "decoder",
                                 (2, n_visible))
        finally:
            self.decoder.train(was_training)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_pixels):
            raise ValueError(
                f"decoder must map v of shape (2, {n_visible}) to pixel logits of shape "
                f"(2, {n_pixels}); it returned {shape_of(out)}"
            )

    @staticmethod
    def _check_tau(tau: Any) -> float:
        return check_positive(tau, "tau")

    def log_z_prior(self) -> None:
        """None: the path-measure bound has no log Z, so training draws no negative phase and
        evaluation estimates no log Z."""
        return None

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loc, log_scale) of q_0(u_0|x), each (B, nv), and the feature h(x) for κ."""
        return self._encode(self._check_x(x))

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        loc, log_scale = self.initial_head(h).chunk(2, dim=-1)
        return loc, log_scale, h

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        """Pixel logits for visible states v ∈ [0, 1]^nv (any leading shape)."""
        return self.decoder(v)

    def control(self, u: torch.Tensor, t: float, feature_map: torch.Tensor) -> torch.Tensor:
        """κ_φ(u, t, x), with feature_map = control_feature(h(x)) broadcastable to u's batch."""
        tt = u.new_full((*u.shape[:-1], 1), t / self.horizon)
        return self.control_out(self.control_state(torch.cat([u, tt], -1)) + feature_map)

    def _paths(self, x: torch.Tensor, tau: float, num_samples: int, generator: Any):
        """Posterior paths: (log p(x|u_N), KL_0 estimate, log q_0 − log p_0, SDEPath, v_N), for
        a checked x, tau and num_samples."""
        loc, log_scale, h = self._encode(x)
        logistic = _noise("logistic", (num_samples, *loc.shape), loc, generator)
        u0 = loc + torch.exp(log_scale) * logistic
        log_p0 = relax.log_logistic(u0).sum(-1)
        kl0 = -(log_scale + 2.0).sum(-1) - log_p0  # closed-form entropy of q_0, MC cross term
        log_q0 = (relax.log_logistic(logistic) - log_scale).sum(-1)
        fmap = self.control_feature(h)
        sde = euler_maruyama(lambda u, t: rbm_drift(self.prior, u, tau), u0, self.num_steps,
                             self.dt, generator, lambda u, t: self.control(u, t, fmap))
        v = relax.to_visible(sde.path[-1], tau)
        recon = -F.binary_cross_entropy_with_logits(
            self.decode(v), x.expand(num_samples, *x.shape), reduction="none").sum(-1)
        return recon, kl0, log_q0 - log_p0, sde, v

    # ------------------------------------------------------------------ training
    def loss(
        self, x: torch.Tensor, negative: Any = None, *, tau: float, kl_weight: float = 1.0,
        num_samples: int = 1, generator: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss −bound (batch mean) and metrics (0-dim tensors, detached); `negative` is
        accepted and ignored.

        The path KL needs no log Z, so there is no negative phase (`log_z_prior()` is None);
        the RBM parameters learn pathwise through the drift ∇log π_τ. K = num_samples
        = 1: bound = log p(x|u_N) − w·(KL_0 + Σ½‖κ‖²Δt) (w = kl_weight); K > 1: the
        importance-weighted log mean_k exp(log p(x|u_N) − w·log dQ/dP). Metrics: loss,
        bound_minus_logz (the bound at w), elbo (the w = 1 ELBO estimate), recon,
        kl_minus_logz (= kl_initial + kl_path), kl_initial, kl_path, positive_energy
        (E_Q F(σ(u_N/τ))), negative_energy (NaN: nothing is sampled from the prior).
        The values of x are checked as in `DVAE.loss`: for CPU tensors only (no device sync).
        """
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight)) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        values = costs_no_sync(x) if isinstance(x, torch.Tensor) else True
        x, tau = self._check_x(x, values=values), self._check_tau(tau)
        check_count(num_samples, "num_samples")
        recon, kl0, log_r0, sde, v = self._paths(x, tau, num_samples, generator)
        if num_samples == 1:
            bound = (recon - kl_weight * (kl0 + sde.path_kl))[0]
        else:
            w = recon - kl_weight * (log_r0 + sde.log_ratio)
            bound = torch.logsumexp(w, 0) - math.log(num_samples)
        loss = -bound.mean()
        kl_i, kl_p = kl0.detach().mean(), sde.path_kl.detach().mean()
        rec = recon.detach().mean()
        with torch.no_grad():
            energy = -relax.neg_free_energy(self.prior, v.reshape(-1, self.n_visible))
        # Sums in float64: the values Python's float arithmetic gave when these were floats.
        rec64, kl_i64, kl_p64 = rec.double(), kl_i.double(), kl_p.double()
        metrics = {
            "loss": loss.detach(), "bound_minus_logz": bound.detach().mean(),
            "elbo": rec64 - kl_i64 - kl_p64, "recon": rec, "kl_minus_logz": kl_i64 + kl_p64,
            "kl_initial": kl_i, "kl_path": kl_p, "positive_energy": energy.mean(),
            "negative_energy": rec.new_full((), float("nan")),
        }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def elbo(
        self, x: torch.Tensor, num_samples: int = 1, generator: Any = None,
        tau: float | None = None,
    ) -> torch.Tensor:
        """ELBO estimate (mean over num_samples paths) per example, shape (B,); ≤ log p_N(x)."""
        tau = self._check_tau(self.tau if tau is None else tau)
        x = self._check_x(x)
        check_count(num_samples, "num_samples")
        recon, kl0, _, sde, _ = self._paths(x, tau, num_samples, generator)
        return (recon - kl0 - sde.path_kl).mean(0)

    @torch.no_grad()
    def iw_bound(
        self, x: torch.Tensor, num_samples: int = 1000, batch_chunk: int = 100,
        generator: Any = None, tau: float | None = None,
    ) -> torch.Tensor:
        """log (1/K) Σ_k p(x|u_N^k) dP/dQ(path_k), shape (B,): → log p_N(x) as K grows."""
        tau = self._check_tau(self.tau if tau is None else tau)
        x = self._check_x(x)
        check_count(num_samples, "num_samples")
        check_count(batch_chunk, "batch_chunk")
        parts = []
        for start in range(0, num_samples, batch_chunk):
            k = min(batch_chunk, num_samples - start)
            recon, _, log_r0, sde, _ = self._paths(x, tau, k, generator)
            parts.append(torch.logsumexp((recon - log_r0 - sde.log_ratio).double(), 0))
        total = torch.logsumexp(torch.stack(parts), 0) - math.log(num_samples)
        return total.to(self.prior.weight.dtype)

    def evaluation_elbo(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int = 1,
        generator: Any = None,
    ) -> torch.Tensor:
        """`elbo` at the model's tau (`log_z` is None: the bound has no log Z)."""
        return self.elbo(x, num_samples, generator)

    def evaluation_iw_bound(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int, generator: Any = None,
    ) -> torch.Tensor:
        """`iw_bound` at the model's tau (`log_z` is None: the bound has no log Z)."""
        return self.iw_bound(x, num_samples=num_samples, generator=generator)

    @torch.no_grad()
    def sample_prior_path(
        self, n: int, generator: Any = None, tau: float | None = None
    ) -> torch.Tensor:
        """u_N of n discretised prior chains from u_0 ~ Π Logistic(0, 1), shape (n, nv)."""
        tau = self._check_tau(self.tau if tau is None else tau)
        like = self.prior.weight
        u0 = _noise("logistic", (check_count(n, "n"), self.n_visible), like, generator)

        def drift(u: torch.Tensor, t: float) -> torch.Tensor:
            return rbm_drift(self.prior, u, tau)

        return euler_maruyama(drift, u0, self.num_steps, self.dt, generator).path[-1]

    @torch.no_grad()
    def generate(self, v: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities σ(decode(v)) for visible states v (..., nv), e.g. binary samples
        from any backend (the τ → 0 limit of σ(u_T/τ)); (..., nv + nh) states are cut to v."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() >= 1 and v.shape[-1] == self.prior.n_units:
            v = v[..., : self.n_visible]
        if v.dim() < 1 or v.shape[-1] != self.n_visible:
            raise ValueError(f"v must end in {self.n_visible} units, got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all() or ((v < 0) | (v > 1)).any():
            raise ValueError("v must be finite and lie in [0, 1]")
        return torch.sigmoid(self.decode(v.to(self.prior.weight.dtype)))
