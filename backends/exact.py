"""`exact`: independent samples by enumeration. Ground truth for tests; small models only.

RBM: the smaller layer's marginal p(s) ∝ exp(-F(s)) is enumerated (2^min(nv, nh) states), a
state is drawn from it by inverse-CDF, and the other layer is drawn exactly from its conditional.
BoltzmannMachine (any graph): the same with the largest colour class in the role of the larger
layer: given the other units its units are independent, so it is summed out analytically, the
other units' 2^(n − |class|) states are enumerated and drawn by inverse-CDF, and the class is
drawn from its exact conditional.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from backends.base import (
    BackendOptions,
    Capabilities,
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    energies,
    make_generator,
)
from backends.options import Field
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM, states_from_index

#: Enumerating more states would hold > 16 GiB of float64 tables (log p and its CDF).
MAX_STATES = 2**30


class ExactOptions(BackendOptions):
    max_states: int = Field(2**22, ge=2, le=MAX_STATES,
                            description="most states it enumerates (2^30 at most: its tables "
                            "would need > 16 GiB); a larger problem is refused, use 'gibbs' "
                            "or 'neal' for it")


class ExactSampler(Sampler):
    """Exact sampling by enumerating the smaller layer (at most `max_states` states)."""

    name = "exact"
    Options = ExactOptions
    capabilities = Capabilities(resource="cpu", output="binary", general_bqm=True)

    @property
    def max_states(self) -> int:
        return self.options.max_states

    @classmethod
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        """2^(smaller layer) states (for a non-bipartite model: 2^(units outside its largest
        colour class), 2^all variables when the shape does not say), each costing its free
        energy (size update-equivalents). (A problem over max_states is refused by the
        backend itself before it enumerates anything.)"""
        cls.parse_options(options)
        if shape.bipartite:
            n = min(shape.n_visible, shape.n_hidden)
            what = f"a smaller layer of {n} units"
        else:
            n = shape.n_units - shape.largest_class
            what = (f"{n} units outside the largest colour class" if shape.largest_class
                    else f"{n} variables")
        states, fix = float(2**n), ("the problem size (use 'gibbs' or 'neal' for this one)",)
        return {
            "enumerated_states": Cost(states, f"2^{n} ({what})", fix),
            "work": Cost(states * shape.size, f"2^{n} states × size {shape.size}", fix),
            "state_bytes": Cost(states * 24 + num_samples * shape.n_units * 16,
                                f"2^{n} states × 24 bytes + samples", fix),
        }

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

    def _sample_bm(self, bm: BoltzmannMachine, num_samples: int, *, seed: int | None,
                   timer: Timer) -> SampleSet:
        """Exact samples of a BoltzmannMachine on any graph (module doc): 2^(units outside the
        largest colour class) states enumerated, at most `max_states`."""
        summed = bm.summed_class()
        units = bm.colour_classes[summed]
        n_rest = bm.n_units - units.numel()
        if 2**n_rest > self.max_states:
            raise ValueError(
                f"the exact backend would enumerate 2^{n_rest} states ({n_rest} units outside "
                f"the largest of {len(bm.colour_classes)} colour classes), over max_states="
                f"{self.max_states}; use 'gibbs' or 'neal' for a Boltzmann machine this size"
            )
        with timer("preprocess"):
            model = bm.float64_copy().cpu()
            # -F(r) for each state r of the other units, bit i = unit rest[i]
            log_p = model._neg_marginal_free_energies(self.max_states)
            cdf = torch.cumsum(torch.softmax(log_p, 0), 0)
            rest = (model.colour != summed).nonzero().flatten()
            units = units.cpu()
        with timer("sample"):
            gen = make_generator(seed)
            u = torch.rand(num_samples, generator=gen, dtype=torch.float64) * cdf[-1]
            idx = torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)
            z = torch.zeros(num_samples, bm.n_units, dtype=torch.float64)
            z[:, rest] = states_from_index(idx, n_rest, torch.float64)
            # the summed class's units are independent given the rest (no coupling inside it)
            z[:, units] = torch.bernoulli(model.p_unit_given_rest(z, units), generator=gen)
        with timer("postprocess"):
            states = z.to(bm.bias.device, bm.bias.dtype)
            energy = bm.sample_energy(states)
        return SampleSet.of_states(states, energy, {"states_enumerated": 2**n_rest,
                                                    "summed_units": int(units.numel())})
