"""Network pieces shared by the DVAE and the SDE-VAE: the MLP (optionally batch-normalised), the
L2 penalty of the reference recipe, the decoder's initial output bias, the dry run of a caller's
own network, and the checks of counts and data batches.

The batch-norm settings follow the DVAE/DVAE++/DVAE# reference code (QuadrantAI/dvae, nets.py):
batch norm after every hidden Linear and before the nonlinearity, none on the output layer,
running statistics updated with weight 0.2 (TensorFlow's momentum 0.8) and ε = 1e-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU,
}
#: torch's momentum is the weight of the new batch: TensorFlow's 0.8 decay is 0.2 here.
BN_MOMENTUM = 0.2
BN_EPS = 1e-2


def mlp(sizes: Sequence[int], activation: str, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers of `sizes`, `activation` between them (not after the last).

    With `batch_norm`, each hidden Linear is followed by BatchNorm1d; the parameter draws (and so
    the initial weights for a given seed) are those of the plain MLP, since BatchNorm1d starts at
    γ = 1, β = 0 without drawing random numbers.
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b, eps=BN_EPS, momentum=BN_MOMENTUM))
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def apply_mlp(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`net` on any leading shape (..., features): BatchNorm1d needs a 2-D batch."""
    if x.dim() == 2:
        return net(x)
    return net(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """½ Σ w² over every Linear weight, BatchNorm scale γ and RBM coupling matrix of `model`.

    This is the reference recipe's weight decay (tf.nn.l2_loss of the kernels, the batch-norm
    gammas and the RBM's W; biases are not decayed); the trainer adds
    train.weight_decay × this to the loss, so Adam sees it as part of the gradient.
    """
    from qvae.rbm import RBM

    terms = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.BatchNorm1d)) and module.weight is not None:
            terms.append(module.weight.pow(2).sum())
        elif isinstance(module, RBM):
            terms.append(module.weight.pow(2).sum())
    if not terms:
        return torch.zeros(())
    return 0.5 * torch.stack(terms).sum()


def init_output_bias(decoder: nn.Sequential, pixel_mean: Any, n_pixels: int) -> None:
    """Start the decoder at the data's pixel means (logit of the clamped mean): a standard trick
    that saves the first epochs from learning the background."""
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).reshape(-1)
    if mean.numel() != n_pixels or not torch.isfinite(mean).all():
        raise ValueError(f"pixel_mean must be {n_pixels} finite values")
    with torch.no_grad():
        decoder[-1].bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))


def shape_of(value: Any) -> str:
    """A returned value as an error message shows it: a tensor's shape, else its type."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def run_custom(call: Callable[[], Any], name: str, shape: tuple[int, ...], hint: str = "") -> Any:
    """`call()`, with any error of the user's module turned into one that names the input shape."""
    try:
        return call()
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"{name} failed on an input of shape {shape}: {type(exc).__name__}: {first}{hint}"
        ) from exc


def check_count(value: Any, name: str) -> int:
    """`value` if it is an int >= 1 (not a bool); a ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_positive(value: Any, name: str) -> float:
    """`value` as a float if it is a finite number > 0 (not a bool); a ValueError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_pixels(
    x: Any, n_pixels: int, dtype: torch.dtype, *, values: bool = True
) -> torch.Tensor:
    """A batch x (batch, n_pixels) of a Bernoulli likelihood, returned in `dtype`.

    Type and shape are always checked (no device sync). `values` also checks that every value
    is finite and in [0, 1]: on an accelerator that reads a result back, a device sync, so the
    trainer does it once for its whole data set and the per-step loss leaves it to CPU tensors.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != n_pixels:
        raise ValueError(f"x must have shape (batch, {n_pixels}), got {tuple(x.shape)}")
    if values:
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        if ((x < 0) | (x > 1)).any():
            raise ValueError("x must lie in [0, 1] (Bernoulli likelihood)")
    return x.to(dtype)


def costs_no_sync(t: torch.Tensor) -> bool:
    """Whether reading a value of `t` back to Python is free of a device sync (a CPU tensor)."""
    return t.device.type == "cpu"


class PixelInput:
    """`check_input` / `_check_x` of a model over `n_pixels` Bernoulli pixels whose latent
    dtype is its prior's (DVAE, SDEVAE): one definition for both."""

    n_pixels: int
    prior: nn.Module

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, n_pixels) with values in [0, 1], in the model's dtype (the trainer checks
        its data set once, here, before the first step)."""
        return check_pixels(x, self.n_pixels, next(self.prior.parameters()).dtype)

    def _check_x(self, x: torch.Tensor, values: bool = True) -> torch.Tensor:
        return check_pixels(x, self.n_pixels, next(self.prior.parameters()).dtype,
                            values=values)
