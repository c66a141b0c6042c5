"""Clamped units: the conditional of a Boltzmann prior given some units' values.

Fixing units z_C = x_C of an RBM or a `BoltzmannMachine` leaves the free units with a model of
the same kind: each free unit i gains x_C's pull on it in its bias, b_i + Σ_{c∈C} J_ic x_c (the
clamped units are *folded into their neighbours' biases*), and the couplings among free units
are kept. Sampling that reduced model and writing x_C back is an exact conditional sample, so
every backend samples conditionals exactly by sampling an ordinary model (on the QPU: the
reduced problem is programmed, and β_eff is calibrated on it like any other problem).

>>> from qvae.rbm import RBM
>>> rbm = RBM(2, 2, seed=0)
>>> cond = condition(rbm, {0: 1})
>>> cond.model.n_visible, cond.model.n_hidden, cond.free.tolist()
(1, 2, [1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM

Prior = RBM | BoltzmannMachine


def check_clamp(clamp: Any, n_units: int) -> dict[int, int] | None:
    """`clamp` as {unit index: 0 or 1}, or None when nothing is clamped; a ValueError/TypeError
    naming the bad entry otherwise (index in z = [v, h] for an RBM, in `variables` order for a
    BoltzmannMachine)."""
    if clamp is None:
        return None
    if not isinstance(clamp, Mapping):
        raise TypeError(f"clamp must map unit index -> 0 or 1 (a dict), got "
                        f"{type(clamp).__name__}")
    out: dict[int, int] = {}
    for key, value in clamp.items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < n_units:
            raise ValueError(f"clamp key {key!r} is not a unit index in [0, {n_units})")
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError(f"clamp[{key}] = {value!r}: a clamped unit's value must be 0 or 1")
        out[key] = int(value)
    return out or None


@dataclass(frozen=True)
class Conditioned:
    """The free units' model given the clamped ones.

    `free` / `clamped`: unit indices of the original model (the reduced model's units are
    `free` in that order); `values`: the clamped values. `model` is None when no two free units
    are coupled: the free units are then independent with logits `bias` (sampled exactly
    without a backend).
    """

    model: Prior | None
    free: torch.Tensor
    clamped: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor

    def assemble(self, free_states: torch.Tensor) -> torch.Tensor:
        """Full states (N, n) from the free units' states: the clamped values written back."""
        n = self.free.numel() + self.clamped.numel()
        z = free_states.new_empty(free_states.shape[0], n)
        z[:, self.free.to(z.device)] = free_states
        z[:, self.clamped.to(z.device)] = self.values.to(z.device, z.dtype)
        return z

    def sample_independent(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Exact samples of the free units when they are independent (`model` is None)."""
        p = torch.sigmoid(self.bias.double()).expand(num_samples, -1)
        return torch.bernoulli(p, generator=generator).to(self.bias.dtype)


@torch.no_grad()
def condition(model: Prior, clamp: Mapping[int, int]) -> Conditioned:
    """The conditional of `model` given `clamp` ({unit index: 0/1}, checked by `check_clamp`)."""
    n = model.n_units
    clamp = check_clamp(clamp, n) or {}
    clamped = torch.tensor(sorted(clamp), dtype=torch.long)
    values = torch.tensor([float(clamp[i]) for i in sorted(clamp)])
    is_free = torch.ones(n, dtype=torch.bool)
    is_free[clamped] = False
    free = is_free.nonzero().flatten()
    if isinstance(model, RBM):
        return _condition_rbm(model, free, clamped, values)
    return _condition_bm(model, free, clamped, values)


def _condition_rbm(rbm: RBM, free: torch.Tensor, clamped: torch.Tensor,
                   values: torch.Tensor) -> Conditioned:
    nv = rbm.n_visible
    w = rbm.effective_weight().detach()
    b, c = rbm.visible_bias.detach(), rbm.hidden_bias.detach()
    x = values.to(w.device, w.dtype)
    fv, fh = free[free < nv], free[free >= nv] - nv
    cv_mask, ch_mask = clamped < nv, clamped >= nv
    cv, ch = clamped[cv_mask], clamped[ch_mask] - nv
    vb = b[fv] + w[fv][:, ch] @ x[ch_mask]
    hb = c[fh] + x[cv_mask] @ w[cv][:, fh]
    if fv.numel() == 0 or fh.numel() == 0:
        return Conditioned(None, free, clamped, values, torch.cat([vb, hb]))
    mask = None if rbm.mask is None else rbm.mask[fv][:, fh]
    reduced = RBM(int(fv.numel()), int(fh.numel()), mask=mask, dtype=w.dtype).to(w.device)
    reduced.weight.copy_(w[fv][:, fh])
    reduced.visible_bias.copy_(vb)
    reduced.hidden_bias.copy_(hb)
    return Conditioned(reduced, free, clamped, values, torch.cat([vb, hb]))


def _condition_bm(bm: BoltzmannMachine, free: torch.Tensor, clamped: torch.Tensor,
                  values: torch.Tensor) -> Conditioned:
    n = bm.n_units
    bias, coupling = bm.bias.detach(), bm.coupling.detach()
    z = torch.zeros(n, dtype=bias.dtype, device=bias.device)
    z[clamped.to(z.device)] = values.to(z.device, z.dtype)
    edges = bm.edges.to(bias.device)
    i, j = edges[:, 0], edges[:, 1]
    # each edge pulls on its free end with J times the clamped end's value (0 when both free)
    field = torch.zeros_like(bias)
    field.index_add_(0, i, coupling * z[j])
    field.index_add_(0, j, coupling * z[i])
    reduced_bias = (bias + field)[free.to(bias.device)]
    position = torch.full((n,), -1, dtype=torch.long, device=bias.device)
    position[free.to(bias.device)] = torch.arange(free.numel(), device=bias.device)
    keep = (position[i] >= 0) & (position[j] >= 0)
    if not bool(keep.any()):
        return Conditioned(None, free, clamped, values, reduced_bias)
    parts = [position[cls.to(bias.device)] for cls in bm.colour_classes]
    parts = [p[p >= 0] for p in parts]
    reduced = BoltzmannMachine(
        [bm.variables[k] for k in free.tolist()],
        torch.stack([position[i[keep]], position[j[keep]]], 1).cpu(),
        bias=reduced_bias.cpu(), coupling=coupling[keep].cpu(),
        parts=[p.cpu() for p in parts if p.numel()], dtype=bias.dtype,
    ).to(bias.device)
    return Conditioned(reduced, free, clamped, values, reduced_bias)
