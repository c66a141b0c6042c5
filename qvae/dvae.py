"""Discrete VAE whose prior is an RBM over all latent units z = [v, h] (GumBolt-style training).

Training maximises the relaxed bound (docs/bounds.md)

    L̃(x) = E_L[log p(x|ζ) - E(ζ) - log q̃(ζ|x)] - log Z,   ζ = σ((α + L)/τ), L ~ Logistic(0, 1),

where log Z enters only through its gradient -E_p[∇E], supplied by prior samples from a backend.
`relaxation="power"` trains with DVAE#'s power-function overlapping relaxation instead
(qvae.overlap: E(ζ) becomes the mean-field free energy of the relaxed prior, q̃ the mixture
density, and τ is unused). Evaluation uses hard z ~ q(z|x): the discrete ELBO, the
importance-weighted bound, and (for tiny latent spaces) the exact log p(x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qvae import overlap
from qvae.boltzmann import BoltzmannMachine
from qvae.networks import (
    ACTIVATIONS,
    PixelInput,
    apply_mlp,
    check_count,
    check_pixels,
    check_positive,
    costs_no_sync,
    init_output_bias,
    mlp,
    run_custom,
    shape_of,
)
from qvae.rbm import RBM, enumerate_states
from qvae.relax import sample_logistic

MAX_EXACT_LATENT = 20
#: Training relaxations: GumBolt (ζ = σ((α + L)/τ)) or DVAE#'s power-function overlap
#: (qvae.overlap; its sharpness is power_beta, and τ is unused).
RELAXATIONS = ("gumbolt", "power")
#: Bound on model.groups: each group is its own encoder network.
MAX_GROUPS = 64


def _log_bernoulli(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ t log σ(l) + (1 - t) log σ(-l) over the last axis (t may be relaxed, in [0, 1])."""
    return (target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).sum(-1)


def _logistic_noise(shape: tuple[int, ...], like: torch.Tensor, generator: Any) -> torch.Tensor:
    """Logistic(0, 1) noise drawn on the generator's device, returned on `like`'s."""
    device = generator.device if generator is not None else like.device
    return sample_logistic(shape, generator, device=device, dtype=like.dtype).to(like.device)


def _check_input_shape(shape: Sequence[int] | None, n_pixels: int) -> tuple[int, ...] | None:
    """The shape one example takes for a custom encoder, e.g. (1, 28, 28); None: flat."""
    if shape is None:
        return None
    dims = tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims) \
            or math.prod(dims) != n_pixels:
        raise ValueError(
            f"input_shape must be whole numbers >= 1 whose product is n_pixels={n_pixels}, "
            f"e.g. (1, 28, 28) for 784; got {shape!r}"
        )
    return dims


def _check_prior(
    prior: BoltzmannMachine | dict[str, Any] | None, n_latent: int, mask: Any
) -> BoltzmannMachine | None:
    """The Boltzmann-machine prior given (a model, or the plain-data `structure` a checkpoint
    holds), checked to cover the n_visible + n_hidden latent units; None: the RBM."""
    if prior is None:
        return None
    if mask is not None:
        raise ValueError("rbm_mask restricts the RBM prior; a BoltzmannMachine prior has its "
                         "own graph: leave rbm_mask out")
    if isinstance(prior, dict):
        from qvae.priors import from_structure

        prior = from_structure(prior)
    if not isinstance(prior, BoltzmannMachine):
        raise TypeError(f"prior must be a qvae.BoltzmannMachine (or None for the RBM), got "
                        f"{type(prior).__name__}")
    if prior.n_units != n_latent:
        raise ValueError(f"the prior has {prior.n_units} units but the latent space has "
                         f"{n_latent} (n_visible + n_hidden); they must match")
    return prior


def _require_log_z(log_z: float | None) -> float:
    if log_z is None:
        raise ValueError("the DVAE's bounds subtract log Z of its prior: pass its estimate "
                         "(qvae.logz.log_partition(model.prior).log_z)")
    return log_z


class DVAE(PixelInput, nn.Module):
    """Encoder → Bernoulli latents z = [v, h] with an RBM prior → factorial Bernoulli decoder.

    The default shape is the published "1-layer nonlinear" MNIST model: 784-200-200-200 encoder,
    200 latent units (100 visible + 100 hidden RBM units), mirrored decoder.

    Any nn.Module can be the encoder (x (B, n_pixels), or (B, *input_shape) when input_shape is
    given, to logits (B, n_latent)) or the decoder (z (B, n_latent) to pixel logits with
    n_pixels per example): `encoder=`, `decoder=`. They are checked at construction by one
    batch of two, and a checkpoint cannot rebuild them (see `custom_modules`).

    Implements `qvae.model.LatentVariableModel`: `log_z_prior()` is the prior, whose
    negative phase training samples and whose log Z evaluation estimates.

    `prior=`: a `qvae.BoltzmannMachine` over the n_visible + n_hidden latent units (z in its
    `variables` order; e.g. `qvae.boltzmann_graphs.multipartite`) instead of the RBM; it enters
    the bounds only through its energy. `label_units=L`: the class-conditional mode: each data
    row is n_pixels pixels then a one-hot label of L values, the first L latent units are set
    to that label (observed, not inferred: log q leaves them out), and the encoder reads the
    whole row; the bounds are then bounds on log p(x, label).

    >>> import torch
    >>> m = DVAE(n_pixels=8, n_visible=3, n_hidden=2, encoder_hidden=[16], decoder_hidden=[16],
    ...          seed=0)
    >>> x = torch.bernoulli(torch.full((4, 8), 0.5))
    >>> loss, metrics = m.loss(x, torch.zeros(10, 5), tau=0.5)
    >>> loss.backward(); sorted(metrics)[:3]
    ['bound_minus_logz', 'kl_minus_logz', 'loss']
    >>> m.exact_log_px(x, float(m.prior.log_partition())).shape
    torch.Size([4])
    """

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
        groups: int = 1,
        batch_norm: bool = False,
        *,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        input_shape: Sequence[int] | None = None,
        prior: BoltzmannMachine | dict[str, Any] | None = None,
        label_units: int = 0,
        relaxation: str = "gumbolt",
        power_beta: float = 40.0,
    ) -> None:
        super().__init__()
        check_count(n_pixels, "n_pixels")
        check_count(groups, "groups")
        n_latent = n_visible + n_hidden
        bm = _check_prior(prior, n_latent, rbm_mask)
        if isinstance(label_units, bool) or not isinstance(label_units, int) or not (
                0 <= label_units < n_latent):
            raise ValueError(f"label_units must be an int in [0, {n_latent}) (the first latent "
                             f"units), got {label_units!r}")
        if label_units and (encoder is not None or input_shape is not None):
            raise ValueError("label_units (the class-conditional mode) works with the built-in "
                             "MLP encoder on flat inputs: leave encoder and input_shape out")
        if relaxation not in RELAXATIONS:
            raise ValueError(f"unknown relaxation {relaxation!r}; use one of {RELAXATIONS}")
        if isinstance(power_beta, bool) or not isinstance(power_beta, (int, float)) or not (
                1.0 <= power_beta <= 1000.0):
            raise ValueError(f"power_beta must be a number in [1, 1000], got {power_beta!r}")
        if relaxation == "power" and label_units:
            raise ValueError("relaxation='power' relaxes every latent unit, and label units "
                             "are observed (their relaxed density is infinite at 0 and 1): "
                             "use relaxation='gumbolt' with label_units")
        #: How training relaxes z (RELAXATIONS) and, for "power", the smoothing's β.
        self.relaxation, self.power_beta = relaxation, float(power_beta)
        #: One-hot label units: z[..., :label_units] is set to the example's label, read from
        #: the last label_units columns of each data row (the class-conditional mode).
        self.label_units = label_units
        n_in = n_pixels + label_units  # the encoder reads the image and its label
        self.input_shape = _check_input_shape(input_shape, n_pixels)
        custom = {name: net for name, net in (("encoder", encoder), ("decoder", decoder))
                  if net is not None}
        for name, net in custom.items():
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(net).__name__}")
        if custom and groups != 1:
            raise ValueError(
                "a custom encoder gives the logits of a factorial posterior: use groups=1 "
                "(hierarchical groups build their own MLP encoders)"
            )
        if "decoder" in custom and pixel_mean is not None:
            raise ValueError(
                "pixel_mean initialises the output bias of the built-in MLP decoder; with your "
                "own decoder, initialise it yourself and leave pixel_mean out"
            )
        if groups > MAX_GROUPS or n_latent % groups:
            raise ValueError(
                f"groups must divide the {n_latent} latent units (n_visible + n_hidden) and be "
                f"<= {MAX_GROUPS}, got {groups}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}"
            )
        enc, dec = [int(s) for s in encoder_hidden], [int(s) for s in decoder_hidden]
        if any(s < 1 for s in enc + dec):
            raise ValueError(f"hidden layer sizes must be >= 1, got {enc} and {dec}")
        if rbm_mask is not None:
            rbm_mask = torch.as_tensor(rbm_mask, dtype=torch.float32)
        self.n_pixels, self.activation, self.seed = n_pixels, activation, seed
        self.encoder_hidden, self.decoder_hidden = enc, dec
        self.rbm_init_std = float(rbm_init_std)
        self.groups, self.batch_norm = groups, bool(batch_norm)
        size = n_latent // groups
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if "encoder" in custom:
                self.encoder: nn.Module = custom["encoder"]
            elif groups == 1:  # the factorial posterior: one network (state-dict keys unchanged)
                self.encoder = mlp([n_in, *enc, n_latent], activation, batch_norm)
            else:  # group g's network reads x and the samples of groups 0..g-1
                self.encoder = nn.ModuleList(
                    mlp([n_in + g * size, *enc, size], activation, batch_norm)
                    for g in range(groups)
                )
            self.decoder = (custom["decoder"] if "decoder" in custom
                            else mlp([n_latent, *dec, n_pixels], activation, batch_norm))
        #: Class paths of the networks passed in: a checkpoint cannot rebuild them (it holds
        #: weights, never code), so load_model refuses such a run with what to do instead.
        self.custom_modules = {name: f"{type(net).__module__}.{type(net).__qualname__}"
                               for name, net in custom.items()}
        #: The prior over z: the RBM on z = [v, h], or a BoltzmannMachine over z in its
        #: `variables` order (`model.prior`: multipartite, qpu_native).
        self.prior: RBM | BoltzmannMachine = (
            RBM(n_visible, n_hidden, mask=rbm_mask, init_std=rbm_init_std, seed=seed)
            if bm is None else bm)
        self._n_visible, self._n_hidden = n_visible, n_hidden
        if pixel_mean is not None:
            init_output_bias(self.decoder, pixel_mean, n_pixels)
        if custom:
            self._dry_run()

    @property
    def n_latent(self) -> int:
        return self.prior.n_units

    @property
    def n_inputs(self) -> int:
        """Values per data row: the pixels, then the one-hot label (label_units > 0)."""
        return self.n_pixels + self.label_units

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.prior.parameters()).dtype

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values) to rebuild the model; load the state dict
        for the weights. The mask, if any, is stored as nested lists; pixel_mean only initialises
        a bias that the state dict holds, so it is left out. Networks passed in as `encoder` /
        `decoder` are not arguments any config can rebuild: `custom_modules` names them, and
        the trainer's checkpoint records it so that qvae.checkpoint.load_model says so."""
        from qvae.priors import structure

        bm = isinstance(self.prior, BoltzmannMachine)
        mask = None if bm else self.prior.mask
        return {
            "n_pixels": self.n_pixels, "n_visible": self._n_visible,
            "n_hidden": self._n_hidden, "encoder_hidden": list(self.encoder_hidden),
            "decoder_hidden": list(self.decoder_hidden), "activation": self.activation,
            "rbm_init_std": self.rbm_init_std,
            "rbm_mask": None if mask is None else mask.int().tolist(), "seed": self.seed,
            "groups": self.groups, "batch_norm": self.batch_norm,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "prior": structure(self.prior) if bm else None,
            "label_units": self.label_units,
            "relaxation": self.relaxation, "power_beta": self.power_beta,
        }

    def _dry_run(self) -> None:
        """Pass a batch of two through the networks given by the caller (eval mode, no grad),
        so a wrong shape fails here, naming the shape expected, not deep inside training."""
        def like(net: nn.Module, *shape: int) -> torch.Tensor:  # on the module's device/dtype
            first = next(net.parameters(), None)
            return torch.zeros(shape) if first is None else first.new_zeros(shape)

        x = like(self.encoder, 2, self.n_pixels)
        shown = (2, *self.input_shape) if self.input_shape is not None else (2, self.n_pixels)
        z = like(self.decoder, 2, self.n_latent)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                if "encoder" in self.custom_modules:
                    hint = ("; if it takes images, pass input_shape, e.g. (1, 28, 28)"
                            if self.input_shape is None else "")
                    out = run_custom(lambda: self.encoder(self._shaped(x)), "encoder", shown,
                                     hint)
                    if tuple(out.shape) != (2, self.n_latent):
                        raise ValueError(
                            f"encoder must map x of shape {shown} to logits of shape "
                            f"(2, {self.n_latent}) (batch, n_visible + n_hidden); it returned "
                            f"{shape_of(out)}"
                        )
                if "decoder" in self.custom_modules:
                    out = run_custom(lambda: self.decoder(z), "decoder", (2, self.n_latent))
                    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != 2 \
                            or out[0].numel() != self.n_pixels:
                        raise ValueError(
                            f"decoder must map z of shape (2, {self.n_latent}) to data logits "
                            f"of shape (2, {self.n_pixels}) (or (2, *input_shape)); it returned "
                            f"{shape_of(out)}"
                        )
        finally:
            self.train(was_training)

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n_pixels) as the encoder takes it: (B, *input_shape) when that is set."""
        return x if self.input_shape is None else x.reshape(x.shape[0], *self.input_shape)

    def _encoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The factorial posterior's logits (B, n_latent) from the one encoder network."""
        return self.encoder(self._shaped(x))

    # ------------------------------------------------------------------ checks
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, n_inputs): pixels in [0, 1], then (label_units > 0) a one-hot label; in
        the model's dtype (the trainer checks its data set once, here, before the first step)."""
        return self._check_x(x)

    def _check_x(self, x: torch.Tensor, values: bool = True) -> torch.Tensor:
        x = check_pixels(x, self.n_inputs, self._dtype, values=values)
        if self.label_units and values:
            labels = x[:, self.n_pixels:]
            if not bool(((labels == 0) | (labels == 1)).all() & (labels.sum(1) == 1).all()):
                raise ValueError(
                    f"a class-conditional model (label_units={self.label_units}) reads each "
                    f"row as {self.n_pixels} pixels then a one-hot label of "
                    f"{self.label_units} values; some rows' last {self.label_units} values "
                    "are not one-hot (use data.dataset mnist-labelled, or append one-hot "
                    "labels to your data)")
        return x

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels, one-hot labels or None) of checked data rows."""
        if not self.label_units:
            return x, None
        return x[..., : self.n_pixels], x[..., self.n_pixels :]

    def _set_labels(self, z: torch.Tensor, labels: torch.Tensor | None, start: int
                    ) -> torch.Tensor:
        """z (..., B, k) holding units start..start+k-1, with the label units among them set to
        `labels` (B, label_units): the label units' posterior is the observed label."""
        stop = min(self.label_units, start + z.shape[-1])
        if labels is None or start >= stop:
            return z
        z = z.clone()
        z[..., : stop - start] = labels[..., start:stop].expand(*z.shape[:-1], stop - start)
        return z

    def _log_q(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) over the inferred units (label units are observed, not inferred)."""
        return _log_bernoulli(logits[..., self.label_units:], z[..., self.label_units:])

    def log_z_prior(self) -> RBM | BoltzmannMachine:
        """The prior: its log Z is in the bound, so training samples it (the negative phase)
        and evaluation estimates its log Z."""
        return self.prior

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior logits α(x), shape (B, n_latent), of the factorial posterior (groups = 1;
        with groups the logits depend on the samples: use `posterior`)."""
        if self.groups > 1:
            raise ValueError(
                "encode() gives the logits of a factorial posterior; with groups > 1 they depend "
                "on the earlier groups' samples: use posterior(x, ...)"
            )
        return self._encoder_logits(self._check_x(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits for latents z (any leading shape), shape (..., n_pixels)."""
        if "decoder" not in self.custom_modules:
            return apply_mlp(self.decoder, z)
        out = self.decoder(z.reshape(-1, z.shape[-1]))  # a custom decoder sees (N, n_latent)
        return out.reshape(*z.shape[:-1], self.n_pixels)

    def posterior(
        self, x: torch.Tensor, num_samples: int = 1, *, tau: float | None = None,
        generator: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z ~ q(z|x) = Π_g q(z_g | x, z_<g): returns (logits, z), both (S, B, n_latent).

        tau=None draws hard z ∈ {0,1} (evaluation); tau > 0 the relaxed ζ = σ((α + L)/τ) that
        later groups read (training). For one group the logits are (B, n_latent), broadcast over S.
        The noise is drawn group by group, so one group draws exactly what it always did.
        """
        x = self._check_x(x)
        check_count(num_samples, "num_samples")
        if tau is not None:
            check_positive(tau, "tau")
        return self._posterior(x, num_samples, tau, generator)

    def _posterior(
        self, x: torch.Tensor, num_samples: int, tau: float | None, generator: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`posterior` for a checked x, count and tau."""
        draw = self._hard_sample if tau is None else (
            lambda lg, s, g: self._relaxed_sample(lg, tau, s, g))
        return self._draw_groups(x, num_samples, draw, generator)

    def _draw_groups(
        self, x: torch.Tensor, num_samples: int,
        draw: Callable[[torch.Tensor, int, Any], torch.Tensor], generator: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, samples) of q(z|x) group by group, each group's samples drawn by
        `draw(logits, S, generator)` and read by the later groups' networks."""
        labels = self._split(x)[1]
        if self.groups == 1:
            logits = self._encoder_logits(x)
            return logits, self._set_labels(draw(logits, num_samples, generator), labels, 0)
        all_logits, samples = [], []
        xs = x.expand(num_samples, *x.shape)
        size = self.n_latent // self.groups
        for g, net in enumerate(self.encoder):
            if g == 0:  # x alone: one pass per example, shared by the S samples
                first = net(x)
                logits = first.expand(num_samples, *first.shape)
                z = draw(first, num_samples, generator)
            else:
                logits = apply_mlp(net, torch.cat([xs, *samples], -1))
                z = draw(logits, 1, generator)[0]
            z = self._set_labels(z, labels, g * size)  # later groups read the label
            all_logits.append(logits)
            samples.append(z)
        return torch.cat(all_logits, -1), torch.cat(samples, -1)

    def _power_posterior(
        self, x: torch.Tensor, num_samples: int, generator: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, ζ, log ζ, log(1-ζ)) of the power-function relaxation (qvae.overlap), each
        (S, B, n_latent) but the logits of one group ((B, n_latent))."""
        logs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def draw(logits: torch.Tensor, count: int, gen: Any) -> torch.Tensor:
            lz, l1z = overlap.power_sample(logits, self.power_beta, count, gen)
            logs.append((lz, l1z))
            return lz.exp()

        logits, zeta = self._draw_groups(x, num_samples, draw, generator)
        shape = (*zeta.shape[:-1], -1)  # later groups draw (1, S, B, k): one sample each
        return (logits, zeta, torch.cat([lz.reshape(shape) for lz, _ in logs], -1),
                torch.cat([l1z.reshape(shape) for _, l1z in logs], -1))

    def _mean_field_classes(self) -> list[tuple[torch.Tensor, overlap.FieldFn]]:
        """The prior's colour classes and local fields, for the mean-field sweeps (the RBM:
        hidden then visible, as in the DVAE# code)."""
        prior = self.prior
        if isinstance(prior, BoltzmannMachine):
            out = []
            for units in prior.colour_classes:
                rows = prior.coupling_rows(units).detach()
                out.append((units, lambda m, u=units, r=rows: prior.local_field(m, u, rows=r)))
            return out
        nv, n = prior.n_visible, prior.n_units
        w = prior.effective_weight().detach()
        dev = w.device
        return [
            (torch.arange(nv, n, device=dev), lambda m: prior.hidden_bias + m[:, :nv] @ w),
            (torch.arange(nv, device=dev), lambda m: prior.visible_bias + m[:, nv:] @ w.T),
        ]

    def relaxed_prior_free_energy(
        self, log_zeta: torch.Tensor, log_1m_zeta: torch.Tensor
    ) -> torch.Tensor:
        """-log Z̃(ζ) by mean field for power-relaxed ζ given as (log ζ, log(1-ζ)), shape
        (...): -log p(ζ) - log Z of the relaxed prior (qvae.overlap), differentiable in the
        prior and in ζ."""
        shift, const = overlap.smoothing_terms(log_zeta, log_1m_zeta, self.power_beta)
        flat = shift.reshape(-1, self.n_latent)
        free = overlap.mean_field_free_energy(
            lambda m: self.prior_energy(m), self._mean_field_classes(), flat,
            const.reshape(-1))
        return free.reshape(shift.shape[:-1])

    def relaxed_sample(
        self, logits: torch.Tensor, tau: float, num_samples: int = 1, generator: Any = None
    ) -> torch.Tensor:
        """ζ = σ((α + L)/τ) with L ~ Logistic(0, 1), shape (S, B, n_latent)."""
        check_positive(tau, "tau")
        check_count(num_samples, "num_samples")
        return self._relaxed_sample(logits, tau, num_samples, generator)

    def _relaxed_sample(
        self, logits: torch.Tensor, tau: float, num_samples: int, generator: Any
    ) -> torch.Tensor:
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
        if isinstance(self.prior, BoltzmannMachine):  # z in the prior's `variables` order
            return self.prior.energy(flat).reshape(z.shape[:-1])
        nv = self.prior.n_visible
        return self.prior.energy(flat[:, :nv], flat[:, nv:]).reshape(z.shape[:-1])

    def _log_weights(self, x: torch.Tensor, logits: torch.Tensor, z: torch.Tensor):
        """(log p(x|z), E(z), log q(z|x)), each (S, B), for z of shape (S, B, n_latent)."""
        return self._log_px(x, z), self.prior_energy(z), self._log_q(logits, z)

    def _log_px(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z), (S, B), for z (S, B, n_latent) (hard or relaxed)."""
        pixels = self._split(x)[0]
        return -F.binary_cross_entropy_with_logits(
            self.decode(z), pixels.expand(z.shape[0], *pixels.shape), reduction="none"
        ).sum(-1)

    # ------------------------------------------------------------------ training
    def loss(
        self, x: torch.Tensor, negative: torch.Tensor, *, tau: float, kl_weight: float = 1.0,
        num_samples: int = 1, generator: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss (batch mean) whose gradient is -∇L̃, and metrics (0-dim tensors, detached:
        `float(metrics["loss"])` reads one; the trainer reads them only for the rows it logs).

        `negative` (M, n_latent): prior samples (e.g. `SampleSet.states`), detached here; the
        term -kl_weight·mean_j E(z_j) has gradient kl_weight·∇log Z. With num_samples K > 1 the
        bound is the importance-weighted log mean_k exp(w_k), w_k = log p(x|ζ_k) -
        kl_weight·(E(ζ_k) + log q̃(ζ_k|x)); kl_weight = 1 gives the proper IW bound, other values
        a tempered one (and K = 1 reduces to the usual KL-weighted bound). With
        relaxation="power", E(ζ) is the relaxed prior's mean-field free energy -log Z̃(ζ) and
        q̃ the power-function mixture density (qvae.overlap); `tau` is then unused.
        Metrics: loss, bound_minus_logz (L̃ + log Z at kl_weight), recon,
        kl_minus_logz (E[E(ζ) + log q̃]), positive_energy (E[E(ζ)]), negative_energy.

        Shapes and the scalar arguments are always checked; the values of x and `negative`
        (finite, x in [0, 1]) only where that costs no device sync, i.e. for CPU tensors: on an
        accelerator, check your data once with `check_input` (the trainer does, at its start).
        """
        values = costs_no_sync(x) if isinstance(x, torch.Tensor) else True
        x = self._check_x(x, values=values)
        if not isinstance(negative, torch.Tensor):
            raise TypeError(f"negative must be a torch.Tensor, got {type(negative).__name__}")
        if negative.dim() != 2 or negative.shape[1] != self.n_latent or negative.shape[0] < 1:
            raise ValueError(
                f"negative must have shape (M >= 1, {self.n_latent}), got {tuple(negative.shape)}"
            )
        if values and not torch.isfinite(negative).all():
            raise ValueError("negative samples contain NaN or infinite values")
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight)) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        check_count(num_samples, "num_samples")
        check_positive(tau, "tau")
        if self.relaxation == "power":
            logits, zeta, lz, l1z = self._power_posterior(x, num_samples, generator)
            log_px = self._log_px(x, zeta)
            energy = self.relaxed_prior_free_energy(lz, l1z)  # -log Z̃(ζ): -log p(ζ) - log Z
            log_q = overlap.log_mixture_density(
                logits, lz, l1z, self.power_beta).sum(-1)
        else:
            logits, zeta = self._posterior(x, num_samples, tau, generator)
            log_px, energy, log_q = self._log_weights(x, logits, zeta)
        kl = energy + log_q
        weights = log_px - kl_weight * kl  # (K, B)
        bound = torch.logsumexp(weights, 0) - math.log(num_samples)
        neg_energy = self.prior_energy(negative.detach().to(x.dtype)).mean()
        loss = -bound.mean() - kl_weight * neg_energy
        metrics = {
            "loss": loss.detach(), "bound_minus_logz": bound.detach().mean(),
            "recon": log_px.detach().mean(), "kl_minus_logz": kl.detach().mean(),
            "positive_energy": energy.detach().mean(), "negative_energy": neg_energy.detach(),
        }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def discrete_elbo(
        self, x: torch.Tensor, log_z: float, num_samples: int = 1, generator: Any = None
    ) -> torch.Tensor:
        """E_q[log p(x|z) - E(z) - log q(z|x)] - log Z with hard z ~ q(z|x), shape (B,)."""
        x = self._check_x(x)
        check_count(num_samples, "num_samples")
        with self._evaluating():
            logits, z = self._posterior(x, num_samples, None, generator)
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
        check_count(num_samples, "num_samples")
        check_count(batch_chunk, "batch_chunk")
        parts = []
        with self._evaluating():
            for start in range(0, num_samples, batch_chunk):
                logits, z = self._posterior(x, min(batch_chunk, num_samples - start), None,
                                            generator)
                log_px, energy, log_q = self._log_weights(x, logits, z)
                parts.append(torch.logsumexp((log_px - energy - log_q).double(), 0))
        total = torch.logsumexp(torch.stack(parts), 0)
        return (total - math.log(num_samples) - float(log_z)).to(x.dtype)

    def evaluation_elbo(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int = 1,
        generator: Any = None,
    ) -> torch.Tensor:
        """`discrete_elbo` (qvae.model.LatentVariableModel's evaluation ELBO)."""
        return self.discrete_elbo(x, _require_log_z(log_z), num_samples, generator)

    def evaluation_iw_bound(
        self, x: torch.Tensor, log_z: float | None, *, num_samples: int, generator: Any = None,
    ) -> torch.Tensor:
        """`iw_bound` (qvae.model.LatentVariableModel's importance-weighted bound)."""
        return self.iw_bound(x, _require_log_z(log_z), num_samples=num_samples, generator=generator)

    @torch.no_grad()
    def exact_log_px(self, x: torch.Tensor, log_z: float, chunk: int = 4096) -> torch.Tensor:
        """log p(x) = log Σ_z p(x|z) exp(-E(z)) / Z by enumerating all 2^n_latent states, (B,)."""
        x = self._check_x(x)
        n = self.n_latent
        if self.label_units:
            raise ValueError("exact_log_px is not defined for a class-conditional model "
                             "(label_units > 0); use iw_bound (it bounds log p(x, label))")
        if n > MAX_EXACT_LATENT:
            raise ValueError(
                f"exact_log_px enumerates 2^{n} latent states, over the limit of "
                f"2^{MAX_EXACT_LATENT}; use iw_bound for a model this size"
            )
        dev, parts = x.device, []
        with self._evaluating():
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
        with self._evaluating():
            return torch.sigmoid(self.decode(z.to(self._dtype)))

    @torch.no_grad()
    def log_posterior(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) of given hard states z (S, B, n_latent) -> (S, B), evaluation mode."""
        x = self._check_x(x)
        if z.dim() != 3 or z.shape[1:] != (x.shape[0], self.n_latent):
            raise ValueError(
                f"z must have shape (S, {x.shape[0]}, {self.n_latent}), got {tuple(z.shape)}"
            )
        z = z.to(x.dtype)
        with self._evaluating():
            if self.groups == 1:
                return self._log_q(self._encoder_logits(x), z)
            size, xs = self.n_latent // self.groups, x.expand(z.shape[0], *x.shape)
            logits = [apply_mlp(net, torch.cat([xs, z[..., : g * size]], -1))
                      for g, net in enumerate(self.encoder)]
            return self._log_q(torch.cat(logits, -1), z)

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Evaluation mode for the duration (batch norm uses its running statistics, so each
        example's bound does not depend on the rest of the batch); the previous mode after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)
