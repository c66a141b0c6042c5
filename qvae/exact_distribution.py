"""The exact distribution of a small RBM, by enumerating its visible layer: the reference that
`qvae compare` reports against and that the conformance suite (`backends.testing`) tests every
backend with.

The hidden layer is summed out in closed form (the free energy F(v)), so the cost is 2^nv
states whatever nh is.

>>> from qvae.rbm import RBM
>>> rbm = RBM(3, 2, seed=0)
>>> p = exact_visible_marginal(rbm)
>>> p.shape, round(float(p.sum()), 12)
(torch.Size([8]), 1.0)
>>> total_variation(torch.tensor([[0.0, 0.0, 0.0]]), p) < 1.0
True
"""

from __future__ import annotations

import torch

from qvae.rbm import RBM, enumerate_states

#: Largest visible layer enumerated: 2^20 states.
MAX_EXACT_VISIBLE = 20


def _visible_states(rbm: RBM) -> torch.Tensor:
    if rbm.n_visible > MAX_EXACT_VISIBLE:
        raise ValueError(f"exact visible marginal needs 2^{rbm.n_visible} states; at most "
                         f"2^{MAX_EXACT_VISIBLE}")
    return enumerate_states(rbm.n_visible, 0, 2**rbm.n_visible, torch.float64)


@torch.no_grad()
def exact_visible_marginal(rbm: RBM) -> torch.Tensor:
    """p(v) for all 2^nv visible states (state index k has bit i = v_i), float64."""
    states = _visible_states(rbm)
    return torch.softmax(-rbm.float64_copy().free_energy(states), 0)


@torch.no_grad()
def exact_moments(rbm: RBM) -> dict[str, torch.Tensor]:
    """Exact ⟨v⟩, ⟨h⟩ and ⟨v hᵀ⟩ by enumerating the visible layer."""
    model = rbm.float64_copy()
    states = _visible_states(rbm)
    p = torch.softmax(-model.free_energy(states), 0)
    ph = model.p_h_given_v(states)
    return {"v": p @ states, "h": p @ ph, "vh": (states * p[:, None]).T @ ph}


def visible_index(visible: torch.Tensor) -> torch.Tensor:
    """Index of each visible row among the 2^nv states (bit i = unit i)."""
    weights = 2 ** torch.arange(visible.shape[1], dtype=torch.int64)
    return (visible.detach().cpu().round().to(torch.int64) * weights).sum(1)


def total_variation(visible: torch.Tensor, p_exact: torch.Tensor) -> float:
    """½ Σ_k |p̂_k − p_k| between the empirical distribution of the visible rows and p_exact."""
    counts = torch.bincount(visible_index(visible), minlength=p_exact.numel()).double()
    return 0.5 * float((counts / counts.sum() - p_exact).abs().sum())
