"""Binary restricted Boltzmann machine: the latent prior of every qvae model.

Units are {0,1}; E(v, h) = -b·v - c·h - vᵀWh and p(v, h) = exp(-E) / Z.
The spin form (s = 2x - 1) exists only at the QPU / dimod boundary (`to_ising`).

>>> import torch
>>> from qvae import RBM
>>> rbm = RBM(6, 4, seed=0)
>>> v, h = torch.ones(2, 6), torch.zeros(2, 4)
>>> rbm.energy(v, h).shape
torch.Size([2])
>>> round(float(rbm.log_partition()), 3) == round(10 * 0.6931471805599453, 3)  # zero params
True
"""

from __future__ import annotations

import math

import dimod
import torch
import torch.nn.functional as F
from torch import nn

from qvae import cancel

#: Largest number of states `log_partition` and the exact sampler will enumerate.
MAX_ENUMERATION_STATES = 2**24


def states_from_index(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The binary states numbered `idx` (int64): bit i of the index is unit i."""
    bits = torch.arange(n, dtype=torch.int64, device=idx.device)
    return ((idx.unsqueeze(1) >> bits) & 1).to(dtype)


def enumerate_states(n: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows `start..stop-1` of the 2^n binary states, bit i of the index is unit i."""
    return states_from_index(torch.arange(start, stop, dtype=torch.int64), n, dtype)


class RBM(nn.Module):
    """A binary RBM with an optional connectivity mask (for hardware-native sparse RBMs).

    Args:
        n_visible, n_hidden: layer sizes.
        mask: optional (n_visible, n_hidden) 0/1 tensor; couplings outside it are held at zero.
        init_std: standard deviation of the initial couplings (biases start at zero).
        seed: seed for the initial couplings.
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        *,
        mask: torch.Tensor | None = None,
        init_std: float = 0.01,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, n in (("n_visible", n_visible), ("n_hidden", n_hidden)):
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{name} must be an int, got {type(n).__name__}")
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be finite and >= 0, got {init_std}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(n_visible, n_hidden, generator=gen, dtype=dtype) * init_std
        self.weight = nn.Parameter(w)
        self.visible_bias = nn.Parameter(torch.zeros(n_visible, dtype=dtype))
        self.hidden_bias = nn.Parameter(torch.zeros(n_hidden, dtype=dtype))
        if mask is not None:
            mask = self._check_mask(mask, n_visible, n_hidden).to(dtype)
            with torch.no_grad():
                self.weight.mul_(mask)
        self.register_buffer("mask", mask)

    @staticmethod
    def _check_mask(mask: torch.Tensor, nv: int, nh: int) -> torch.Tensor:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != (nv, nh):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but the weight is ({nv}, {nh})"
            )
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must contain only 0 and 1")
        return mask

    # ------------------------------------------------------------------ basics
    @property
    def n_visible(self) -> int:
        return self.weight.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.weight.shape[1]

    @property
    def n_units(self) -> int:
        return self.n_visible + self.n_hidden

    def effective_weight(self) -> torch.Tensor:
        """The couplings actually in force (the weight times the mask, if any)."""
        return self.weight if self.mask is None else self.weight * self.mask

    def validate(self) -> None:
        """Raise ValueError if any parameter is NaN or infinite (call before sampling)."""
        for name, p in (
            ("weight", self.weight),
            ("visible_bias", self.visible_bias),
            ("hidden_bias", self.hidden_bias),
        ):
            bad = ~torch.isfinite(p.detach())
            if bad.any():
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"RBM.{name} contains {int(bad.sum())} non-finite value(s) "
                    f"(first at index {where}: {p.detach()[where].item()})"
                )

    def _check_layer(self, x: torch.Tensor, n: int, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != n:
            raise ValueError(f"{name} must have shape (batch, {n}), got {tuple(x.shape)}")
        return x.to(self.weight.dtype)

    # --------------------------------------------------------------- energies
    @staticmethod
    def _energy(v: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                visible_bias: torch.Tensor, hidden_bias: torch.Tensor) -> torch.Tensor:
        # The one formula of E(v, h): `energy` and `sample_energy` (the backends') use it.
        return -(v @ visible_bias) - (h @ hidden_bias) - ((v @ weight) * h).sum(-1)

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E(v, h) = -b·v - c·h - vᵀWh, shape (B,)."""
        v = self._check_layer(v, self.n_visible, "v")
        h = self._check_layer(h, self.n_hidden, "h")
        return self._energy(v, h, self.effective_weight(), self.visible_bias, self.hidden_bias)

    def sample_energy(self, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """E(v, h) of a sampler's states, detached, in the states' dtype and on their device
        (a `SampleSet`'s energies: `backends.base.energies`)."""
        w, b, c = (p.detach().to(visible.device, visible.dtype)
                   for p in (self.effective_weight(), self.visible_bias, self.hidden_bias))
        return self._energy(visible, hidden, w, b, c)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -b·v - Σ_j softplus(c_j + (vW)_j), shape (B,)."""
        v = self._check_layer(v, self.n_visible, "v")
        return -(v @ self.visible_bias) - F.softplus(
            v @ self.effective_weight() + self.hidden_bias
        ).sum(-1)

    def hidden_free_energy(self, h: torch.Tensor) -> torch.Tensor:
        """F(h) = -c·h - Σ_i softplus(b_i + (W h)_i), shape (B,)."""
        h = self._check_layer(h, self.n_hidden, "h")
        return -(h @ self.hidden_bias) - F.softplus(
            h @ self.effective_weight().T + self.visible_bias
        ).sum(-1)

    def p_h_given_v(self, v: torch.Tensor) -> torch.Tensor:
        """P(h_j = 1 | v) = σ(c_j + (vW)_j), shape (B, n_hidden)."""
        v = self._check_layer(v, self.n_visible, "v")
        return torch.sigmoid(v @ self.effective_weight() + self.hidden_bias)

    def p_v_given_h(self, h: torch.Tensor) -> torch.Tensor:
        """P(v_i = 1 | h) = σ(b_i + (W h)_i), shape (B, n_visible)."""
        h = self._check_layer(h, self.n_hidden, "h")
        return torch.sigmoid(h @ self.effective_weight().T + self.visible_bias)

    # ------------------------------------------------------------- partition
    @torch.no_grad()
    def log_partition(self, *, max_states: int = MAX_ENUMERATION_STATES) -> torch.Tensor:
        """Exact log Z in float64, enumerating the smaller layer in chunks.

        Past `max_states` (2^24 by default) it raises: use `qvae.logz.ais_log_partition`.
        """
        self.validate()
        n_small = min(self.n_visible, self.n_hidden)
        if 2**n_small > max_states:
            raise ValueError(
                f"exact log Z needs 2^{n_small} states (the smaller layer has {n_small} units), "
                f"over the limit of {max_states}; estimate it with annealed importance "
                "sampling instead (CLI: --logz ais; Python: qvae.logz.ais_log_partition(rbm))"
            )
        return torch.logsumexp(self._neg_marginal_free_energies(), 0)

    @torch.no_grad()
    def _neg_marginal_free_energies(self, chunk: int = 2**16) -> torch.Tensor:
        """-F(s) for every state s of the smaller layer, float64, shape (2^n_small,)."""
        model = self.float64_copy()
        parts = []
        if self.n_hidden <= self.n_visible:
            n, fe = self.n_hidden, model.hidden_free_energy
        else:
            n, fe = self.n_visible, model.free_energy
        for start in range(0, 2**n, chunk):
            states = enumerate_states(n, start, min(start + chunk, 2**n), torch.float64)
            parts.append(-fe(states.to(model.weight.device)))
            cancel.check()  # a service's wall-time limit or shutdown stops it here
        return torch.cat(parts)

    def float64_copy(self) -> RBM:
        """A detached float64 copy with the mask folded into the weight."""
        copy = RBM(self.n_visible, self.n_hidden, dtype=torch.float64)
        copy.to(self.weight.device)
        with torch.no_grad():
            copy.weight.copy_(self.effective_weight().detach())
            copy.visible_bias.copy_(self.visible_bias.detach())
            copy.hidden_bias.copy_(self.hidden_bias.detach())
        return copy

    # ------------------------------------------------------ dimod boundary
    def variable_labels(self) -> tuple[list[int], list[int]]:
        """BQM labels: visible units are 0..nv-1, hidden units nv..nv+nh-1."""
        nv = self.n_visible
        return list(range(nv)), list(range(nv, nv + self.n_hidden))

    @torch.no_grad()
    def to_bqm(self) -> dimod.BinaryQuadraticModel:
        """A BINARY BQM whose energy equals `energy(v, h)` for z = [v, h]."""
        self.validate()
        nv = self.n_visible
        w = self.effective_weight().detach().double().cpu().numpy()
        rows, cols = w.nonzero()
        linear = -torch.cat([self.visible_bias, self.hidden_bias]).detach().double().cpu()
        return dimod.BinaryQuadraticModel.from_numpy_vectors(
            linear.numpy(), (rows, cols + nv, -w[rows, cols]), 0.0, dimod.BINARY
        )

    def to_ising(self) -> tuple[dict[int, float], dict[tuple[int, int], float], float]:
        """Spin form (h, J, offset) with s = 2z - 1, same energies as `to_bqm`."""
        return self.to_bqm().to_ising()

    @classmethod
    def from_bqm(
        cls, bqm: dimod.BinaryQuadraticModel, visible: list, hidden: list
    ) -> RBM:
        """Build an RBM from a bipartite BQM (BINARY or SPIN; converted to BINARY).

        `visible` and `hidden` list the BQM's labels of each layer, in unit order. The BQM's
        constant offset is dropped (it does not change the distribution).
        """
        bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
        vi = {lab: i for i, lab in enumerate(visible)}
        hi = {lab: j for j, lab in enumerate(hidden)}
        missing = set(bqm.variables) - set(vi) - set(hi)
        if missing or set(vi) & set(hi):
            both = sorted(map(str, set(vi) & set(hi)))[:5]
            raise ValueError(
                "visible and hidden must partition the BQM's variables; unassigned: "
                f"{sorted(map(str, missing))[:5]}, in both: {both}"
            )
        rbm = cls(len(visible), len(hidden), init_std=0.0, dtype=torch.float64)
        w = torch.zeros(len(visible), len(hidden), dtype=torch.float64)
        for (a, b), bias in bqm.quadratic.items():
            if a in hi and b in vi:
                a, b = b, a
            if not (a in vi and b in hi):
                raise ValueError(f"interaction ({a!r}, {b!r}) is within one layer: not an RBM")
            w[vi[a], hi[b]] = -float(bias)  # float: a Float32BQM gives numpy.float32
        with torch.no_grad():
            rbm.weight.copy_(w)
            rbm.visible_bias.copy_(torch.tensor([-bqm.get_linear(x) for x in visible]))
            rbm.hidden_bias.copy_(torch.tensor([-bqm.get_linear(x) for x in hidden]))
        return rbm.float()

    def extra_repr(self) -> str:
        sparse = "" if self.mask is None else f", mask density={float(self.mask.mean()):.3f}"
        return f"n_visible={self.n_visible}, n_hidden={self.n_hidden}{sparse}"
