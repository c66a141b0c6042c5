"""Network pieces shared by the DVAE and the SDE-VAE: the MLP (optionally batch-normalised) and
the L2 penalty of the reference recipe.

The batch-norm settings follow the DVAE/DVAE++/DVAE# reference code (QuadrantAI/dvae, nets.py):
batch norm after every hidden Linear and before the nonlinearity, none on the output layer,
running statistics updated with weight 0.2 (TensorFlow's momentum 0.8) and ε = 1e-2.
"""

from __future__ import annotations

from collections.abc import Sequence

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
