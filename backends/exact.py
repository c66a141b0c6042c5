"""`exact`: independent samples by enumeration. Ground truth for tests; small RBMs only.

The smaller layer's marginal p(s) ∝ exp(-F(s)) is enumerated (2^min(nv, nh) states), a state is
drawn from it by inverse-CDF, and the other layer is drawn exactly from its conditional.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.base import Sampler, SampleSet, Timer, energies, make_generator
from qvae.rbm import RBM, states_from_index


class ExactSampler(Sampler):
    """Exact sampling by enumerating the smaller layer (at most `max_states` states)."""

    name = "exact"
    binary = True

    def __init__(self, *, max_states: int = 2**22) -> None:
        if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 2:
            raise ValueError(f"max_states must be an int >= 2, got {max_states!r}")
        self.max_states = max_states

    def sample_general_bqm(self, bqm: Any, num_samples: int, *, seed: int | None = None) -> Any:
        """Any small BQM (2^n ≤ max_states), exactly: see `backends.bqm.sample_bqm`."""
        from backends.bqm import check_bqm, sample_by_enumeration

        check_bqm(bqm)
        return sample_by_enumeration(bqm, num_samples, seed, self.max_states)

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        n_small = min(rbm.n_visible, rbm.n_hidden)
        if 2**n_small > self.max_states:
            raise ValueError(
                f"the exact backend would enumerate 2^{n_small} states, over max_states="
                f"{self.max_states}; use 'gibbs' or 'neal' for an RBM this size"
            )
        with timer("preprocess"):
            model = rbm.float64_copy().cpu()
            log_p = model._neg_marginal_free_energies()
            cdf = torch.cumsum(torch.softmax(log_p, 0), 0)
        with timer("sample"):
            gen = make_generator(seed)
            u = torch.rand(num_samples, generator=gen, dtype=torch.float64) * cdf[-1]
            idx = torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)
            small = states_from_index(idx, n_small, torch.float64)
            if rbm.n_hidden <= rbm.n_visible:
                hidden = small
                visible = torch.bernoulli(model.p_v_given_h(hidden), generator=gen)
            else:
                visible = small
                hidden = torch.bernoulli(model.p_h_given_v(visible), generator=gen)
        with timer("postprocess"):
            dtype, device = rbm.weight.dtype, rbm.weight.device
            visible, hidden = visible.to(device, dtype), hidden.to(device, dtype)
            energy = energies(rbm, visible, hidden)
        return SampleSet(visible, hidden, energy, {"states_enumerated": 2**n_small})
