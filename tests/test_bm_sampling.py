"""Sampling Boltzmann machines on any graph: gibbs's colour-class kernel with persistent chains,
exact enumeration with the largest colour class summed out, and the conformance checks' teeth."""

import pytest
import torch

import backends
from backends.base import ProblemShape, Sampler, SampleSet
from backends.exact import ExactSampler
from backends.gibbs import colour_blocks, colour_gibbs_sweeps
from backends.testing import (
    check_bm_distribution,
    check_conditional,
    odd_cycle_bm,
    random_rbm,
    reference_bms,
    total_variation,
    tv_tolerance,
)
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import from_rbm, multipartite

FAST = {"burn_in": 5, "num_sweeps": 2}


# ------------------------------------------------------------------- gibbs: chains
def test_gibbs_bm_chains_persist_and_round_trip_through_state_dict():
    bm = reference_bms()[0]
    s = backends.get_sampler("gibbs", num_chains=16, **FAST)
    first = s.sample(bm, 16, seed=0)
    assert first.info["burned_in"] and first.info["colour_classes"] == 4
    assert first.info["spin_updates"] == (5 + 2) * 16 * bm.n_units
    second = s.sample(bm, 40)  # 3 rounds of the same chains, no new burn-in
    assert not second.info["burned_in"] and second.info["rounds"] == 3
    assert second.info["spin_updates"] == 3 * 2 * 16 * bm.n_units
    state = s.state_dict()
    assert set(state) == {"states", "generator"} and state["states"].shape == (16, bm.n_units)
    clone = backends.get_sampler("gibbs", num_chains=16, **FAST)
    clone.load_state_dict(state)
    a, b = s.sample(bm, 16), clone.sample(bm, 16)
    assert not b.info["burned_in"] and torch.equal(a.states, b.states)


def test_gibbs_kept_chains_are_the_last_samples_in_variables_order():
    bm = odd_cycle_bm()  # its colour classes are not contiguous: the kernel permutes units
    assert not torch.equal(torch.cat(bm.colour_classes), torch.arange(bm.n_units))
    s = backends.get_sampler("gibbs", num_chains=8, **FAST)
    out = s.sample(bm, 8, seed=1)
    assert torch.equal(s.state_dict()["states"], out.states)
    assert torch.allclose(out.energy, bm.sample_energy(out.states), atol=1e-5)


def test_gibbs_a_new_shape_or_kind_starts_fresh_chains():
    bm = reference_bms()[0]  # 9 units
    s = backends.get_sampler("gibbs", num_chains=8, **FAST)
    s.sample(bm, 8, seed=0)
    # another graph on 9 units: the chains continue (as an RBM's do when its weights change)
    assert not s.sample(multipartite([3, 3, 3], seed=0), 8).info["burned_in"]
    assert s.sample(multipartite([2, 2, 2, 2], seed=0), 8).info["burned_in"]  # 8 units: fresh
    assert not s.sample(multipartite([2, 2, 2, 2], seed=1), 8).info["burned_in"]
    rbm = random_rbm(4, 8)  # the RBM chain state h has the BM's shape (8 chains, 8): fresh
    assert s.sample(rbm, 8).info["burned_in"]
    assert set(s.state_dict()) == {"hidden", "generator"}
    assert s.sample(multipartite([2, 2, 2, 2], seed=1), 8).info["burned_in"]


def test_gibbs_state_dict_with_both_kinds_is_refused():
    s = backends.get_sampler("gibbs", num_chains=4)
    with pytest.raises(ValueError, match="both 'hidden'.*and 'states'"):
        s.load_state_dict({"hidden": torch.zeros(4, 3), "states": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match="sampler state 'states' must be a finite float tensor"):
        s.load_state_dict({"states": torch.full((4, 3), float("nan"))})
    assert set(s.state_dict()) == {"hidden", "generator"}  # nothing changed


def test_gibbs_non_persistent_bm_chains_burn_in_every_call():
    bm = odd_cycle_bm()
    s = backends.get_sampler("gibbs", num_chains=8, persistent=False, **FAST)
    assert all(s.sample(bm, 8, seed=k).info["burned_in"] for k in (0, 1))
    assert s.state_dict()["hidden"] is None


# -------------------------------------------------------------- gibbs: the kernel
def test_gibbs_bm_matches_enumeration_on_odd_cycles_and_after_resuming():
    bm = odd_cycle_bm(seed=4)
    make = lambda: backends.get_sampler("gibbs")  # noqa: E731
    stats = check_bm_distribution(make, bm, 20000)
    assert stats["tv"] <= stats["tv_tolerance"]
    s = backends.get_sampler("gibbs", num_chains=20000, burn_in=100, num_sweeps=10)
    s.sample(bm, 20000, seed=0)
    stats = check_bm_distribution(lambda: s, bm, 20000)  # the continued chains, unseeded
    assert stats["tv"] <= stats["tv_tolerance"]


def test_gibbs_bm_applies_beta():
    bm = odd_cycle_bm(seed=2)
    scaled = BoltzmannMachine(bm.n_units, bm.edges, bias=0.5 * bm.bias.detach(),
                              coupling=0.5 * bm.coupling.detach())
    out = backends.get_sampler("gibbs", beta=0.5).sample(bm, 20000, seed=0)
    p_half, p_one = (m.exact_log_probs().exp() for m in (scaled, bm))
    assert total_variation(out.states, p_half) <= tv_tolerance(p_half, 20000)
    assert total_variation(out.states, p_one) > tv_tolerance(p_one, 20000)
    assert torch.equal(out.energy, bm.sample_energy(out.states))  # energies at beta = 1


def test_gibbs_sparse_and_dense_blocks_give_the_same_chains():
    # dyadic couplings: every sum is exact in any order, so both layouts compute the same
    # inputs and, from the same uniforms, the same states
    gen = torch.Generator().manual_seed(0)
    bm = odd_cycle_bm()
    with torch.no_grad():
        bm.coupling.copy_(torch.randint(-8, 9, (bm.n_edges,), generator=gen) / 4)
        bm.bias.copy_(torch.randint(-4, 5, (bm.n_units,), generator=gen) / 4)
    zt = torch.bernoulli(torch.full((bm.n_units, 64), 0.5), generator=gen)
    out = {}
    for layout in ("dense", "sparse"):
        _, blocks = colour_blocks(bm, 1.0, torch.device("cpu"), torch.float64, layout=layout)
        assert all(b.rows.is_sparse == (layout == "sparse") for b in blocks)
        out[layout] = colour_gibbs_sweeps(zt.double(), blocks, 7,
                                          torch.Generator().manual_seed(3))
    assert torch.equal(out["dense"], out["sparse"])
    assert not torch.equal(out["dense"], zt.double())  # the chains moved


def test_gibbs_takes_the_sparse_path_on_a_sparse_graph():
    # a 200-unit ring with chords every 7th unit: ~1.5 % of a class's row block is non-zero
    n = 201
    edges = [(i, (i + 1) % n) for i in range(n)] + [(i, (i + 7) % n) for i in range(0, n, 7)]
    bm = BoltzmannMachine(n, edges, seed=0, init_std=0.5)
    _, blocks = colour_blocks(bm, 1.0, torch.device("cpu"), torch.float32)
    assert all(b.rows.is_sparse for b in blocks)
    out = backends.get_sampler("gibbs", num_chains=32, **FAST).sample(bm, 32, seed=0)
    assert out.states.shape == (32, n)
    assert torch.allclose(out.energy, bm.sample_energy(out.states), rtol=1e-5, atol=1e-4)


def test_gibbs_mixes_dense_and_sparse_classes():
    # a hub coupled to 60 leaves and a triangle on three of them: the hub's row is dense,
    # the leaves' block ~1.6 % non-zero (sparse)
    edges = [(0, k) for k in range(1, 61)] + [(1, 2), (2, 3), (1, 3)]
    bm = BoltzmannMachine(61, edges, seed=0, init_std=0.5)
    _, blocks = colour_blocks(bm, 1.0, torch.device("cpu"), torch.float32)
    assert {b.rows.is_sparse for b in blocks} == {True, False}
    out = backends.get_sampler("gibbs", num_chains=64, **FAST).sample(bm, 64, seed=0)
    assert torch.allclose(out.energy, bm.sample_energy(out.states), rtol=1e-5, atol=1e-4)


def test_gibbs_refuses_a_bm_too_large_for_its_dtype():
    bm = odd_cycle_bm()
    with torch.no_grad():
        bm.coupling.mul_(1e8)
    with pytest.raises(ValueError, match="too large|beyond.*use dtype='float64'"):
        backends.get_sampler("gibbs").sample(bm, 4)
    backends.get_sampler("gibbs", dtype="float64", **FAST).sample(bm, 4, seed=0)


def test_gibbs_conditional_on_a_bm_holds_the_clamped_units():
    bm = odd_cycle_bm(seed=1)
    stats = check_conditional(lambda: backends.get_sampler("gibbs"), bm, {2: 1, 6: 0}, 20000)
    assert stats["tv"] <= stats["tv_tolerance"]


# ----------------------------------------------------------------------- exact
def test_exact_bm_sums_out_the_largest_class_and_its_work_model_says_so():
    bm = reference_bms()[0]  # parts [3, 2, 2, 2]: 6 units enumerated
    out = backends.get_sampler("exact").sample(bm, 10, seed=0)
    assert out.info["states_enumerated"] == 2**6 and out.info["summed_units"] == 3
    shape = ProblemShape.of(bm)
    assert shape == ProblemShape(9, 0, bm.n_edges, False, 3)
    assert ExactSampler.work({}, shape, 10)["enumerated_states"].value == 2**6
    assert ExactSampler.work({}, ProblemShape(9, 0, bm.n_edges, False), 10)[
        "enumerated_states"].value == 2**9  # largest class unknown: all units
    assert ProblemShape.of(from_rbm(random_rbm(5, 3))) == ProblemShape(5, 3, 15)
    assert ProblemShape.of(random_rbm(5, 3)) == ProblemShape(5, 3, 15)


def test_exact_bm_matches_enumeration_with_and_without_clamp():
    bm = odd_cycle_bm(seed=5)
    make = lambda: backends.get_sampler("exact")  # noqa: E731
    assert check_bm_distribution(make, bm, 20000)["tv"] <= 0.1
    stats = check_conditional(make, bm, {0: 0, 5: 1}, 20000)
    assert stats["tv"] <= stats["tv_tolerance"]
    a, b = make().sample(bm, 50, seed=3), make().sample(bm, 50, seed=3)
    assert torch.equal(a.states, b.states)


def test_exact_refuses_a_bm_over_max_states_before_enumerating():
    bm = multipartite([12, 12, 12, 12], seed=0)  # 36 units outside the largest class
    with pytest.raises(ValueError, match=r"2\^36 states .*max_states=1024; use 'gibbs' or "
                                         r"'neal'"):
        backends.get_sampler("exact", max_states=1024).sample(bm, 4)


def test_exact_samples_a_bm_without_couplings():
    bm = BoltzmannMachine(4, [], bias=[3.0, -3.0, 0.0, 8.0])
    out = backends.get_sampler("exact").sample(bm, 4000, seed=0)
    assert torch.allclose(out.states.mean(0), torch.sigmoid(bm.bias.detach()), atol=0.05)


# ---------------------------------------------------------- the checks can fail
def test_bm_check_catches_a_wrong_temperature():
    with pytest.raises(AssertionError):
        for bm in reference_bms():
            check_bm_distribution(lambda: backends.get_sampler("gibbs", beta=1.25), bm, 20000)


class IgnoresClamp(Sampler):
    """Exact samples of the unconditioned model whatever the clamp: a broken conditional."""

    name = "ignores-clamp"
    capabilities = backends.get_sampler("exact").capabilities

    def _sample(self, rbm, num_samples, *, seed, timer):
        return backends.get_sampler("exact").sample(rbm, num_samples, seed=seed)

    def _sample_bm(self, bm, num_samples, *, seed, timer):
        return backends.get_sampler("exact").sample(bm, num_samples, seed=seed)

    def _sample_clamped(self, model, num_samples, clamp, *, seed, timer):
        out = self._sample_model(model, num_samples, seed=seed, timer=timer)
        out.info["clamped"] = len(clamp)
        return out


class ClampsOnlyTheValues(IgnoresClamp):
    """Writes the clamped values over unconditioned samples: holds the units, wrong law."""

    def _sample_clamped(self, model, num_samples, clamp, *, seed, timer):
        out = self._sample_model(model, num_samples, seed=seed, timer=timer)
        states = out.states.clone()
        for unit, value in clamp.items():
            states[:, unit] = value
        bm = from_rbm(model) if hasattr(model, "n_visible") else model
        return SampleSet.of_states(states, bm.sample_energy(states), {"clamped": len(clamp)})


@pytest.mark.parametrize("cls, says", [(IgnoresClamp, "changed a clamped unit"),
                                       (ClampsOnlyTheValues, "TV|moment")])
def test_conditional_check_catches_broken_conditionals(cls, says):
    bm = odd_cycle_bm(seed=1)
    with pytest.raises(AssertionError, match=says):
        check_conditional(cls, bm, {2: 1, 6: 0}, 20000)


class SamplesAnythingQuietly(Sampler):
    """Declares no kernel for non-bipartite models, yet returns (exact) samples of them."""

    name = "quiet"

    def _sample(self, rbm, num_samples, *, seed, timer):
        return backends.get_sampler("exact").sample(rbm, num_samples, seed=seed)

    def _sample_model(self, model, num_samples, *, seed, timer):
        return backends.get_sampler("exact").sample(model, num_samples, seed=seed)


def test_bm_check_requires_a_refusal_from_a_bipartite_only_backend():
    with pytest.raises(AssertionError, match="samples bipartite models only"):
        check_bm_distribution(SamplesAnythingQuietly, reference_bms()[0], 100)
    refused = check_bm_distribution(lambda: backends.get_sampler("mala"), reference_bms()[0], 100)
    assert "does not sample a Boltzmann machine with 4 colour classes" in refused["refused"]


def test_a_new_clamp_restarts_persistent_chains_with_burn_in():
    """Chains kept from one conditional (or from the joint) would start the next one from the
    wrong distribution: a changed clamp starts fresh chains, an unchanged one continues."""
    from qvae.rbm import RBM

    rbm = RBM(4, 3, init_std=1.0, seed=3)
    sampler = backends.get_sampler("gibbs", num_sweeps=2, burn_in=5)
    assert sampler.sample(rbm, 50, seed=0).info["burned_in"]
    assert not sampler.sample(rbm, 50).info["burned_in"]           # same joint: continues
    assert sampler.sample(rbm, 50, clamp={0: 1}).info["burned_in"]  # new conditional
    assert not sampler.sample(rbm, 50, clamp={0: 1}).info["burned_in"]
    assert sampler.sample(rbm, 50, clamp={0: 0}).info["burned_in"]  # other label
    assert sampler.sample(rbm, 50).info["burned_in"]                # back to the joint
