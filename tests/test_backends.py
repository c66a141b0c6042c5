"""Every registered backend passes the conformance suite; the suite itself can fail."""

import pytest
import torch

import backends
from backends.base import Sampler, SampleSet
from backends.bqm import samples_any_graph
from backends.registry import sampler_class
from backends.testing import (
    check_distribution,
    parametrize_backends,
    random_rbm,
    reference_rbms,
    run_conformance,
    tv_tolerance,
)


def test_registry_lists_core_backends():
    assert {"exact", "gibbs", "neal"} <= set(backends.available())


def test_unknown_backend_and_option_errors():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*exact"):
        backends.get_sampler("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sweeps'\].*num_sweeps"):
        backends.get_sampler("gibbs", sweeps=3)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("gibbs", {"num_sweeps": 0}, "num_sweeps"),
        ("gibbs", {"dtype": "float16"}, "dtype"),
        ("gibbs", {"beta": -1.0}, "beta"),
        ("neal", {"mode": "quantum"}, "mode"),
        ("neal", {"num_sweeps": -5}, "num_sweeps"),
        ("exact", {"max_states": 1}, "max_states"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        backends.get_sampler(name, **options)


@parametrize_backends([n for n in backends.registered() if n != "remote"])  # remote: test_service
def test_conformance(sampler_name):
    report = run_conformance(sampler_name, num_samples=20000)
    for row in report["distribution"]:
        assert row["tv"] <= row["tv_tolerance"]
    # the complete 4-partite and odd-cycle models, and the conditionals (RBM; 4-partite BM;
    # a clamp leaving a bipartite BM): sampled exactly, or refused where the backend has no
    # kernel for a non-bipartite graph (langevin, mala)
    any_graph = samples_any_graph(sampler_class(sampler_name))
    rows = report["bm_distribution"] + report["conditional"]
    assert [("refused" in row) for row in rows] == [not any_graph] * 2 + [
        False, not any_graph, False]
    for row in rows:
        assert "refused" in row or row["tv"] <= row["tv_tolerance"]


class Corrupted(Sampler):
    """Exact samples with one visible unit flipped 5% of the time: a subtle defect."""

    name = "corrupted"

    def _sample(self, rbm, num_samples, *, seed, timer):
        out = backends.get_sampler("exact").sample(rbm, num_samples, seed=seed)
        gen = torch.Generator().manual_seed(seed or 0)
        flip = torch.rand(num_samples, generator=gen) < 0.05
        v = out.visible.clone()
        v[flip, 0] = 1 - v[flip, 0]
        return SampleSet(v, out.hidden, rbm.energy(v, out.hidden), {})


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: backends.get_sampler("gibbs", beta=1.25), id="gibbs-wrong-beta"),
        pytest.param(lambda: backends.get_sampler("neal", beta=0.8, num_sweeps=100),
                     id="neal-wrong-beta"),
        pytest.param(Corrupted, id="flipped-unit"),
    ],
)
def test_distribution_check_catches_wrong_samplers(make):
    with pytest.raises(AssertionError):
        for rbm in reference_rbms():
            check_distribution(make, rbm, 20000)


def test_tv_tolerance_shrinks_with_samples():
    p = torch.full((64,), 1 / 64, dtype=torch.float64)
    assert tv_tolerance(p, 80000) < tv_tolerance(p, 20000) / 1.9


def test_exact_refuses_large_models():
    with pytest.raises(ValueError, match="max_states"):
        backends.get_sampler("exact", max_states=2**10).sample(random_rbm(12, 12), 4)


def test_gibbs_persistent_chains_and_state_dict():
    rbm = random_rbm(8, 8, seed=3)
    s = backends.get_sampler("gibbs", num_chains=16, burn_in=5, num_sweeps=2)
    first = s.sample(rbm, 16, seed=0)
    assert first.info["burned_in"]
    second = s.sample(rbm, 40)  # more samples than chains: 3 rounds, no new burn-in
    assert not second.info["burned_in"] and second.info["rounds"] == 3
    state = s.state_dict()
    clone = backends.get_sampler("gibbs", num_chains=16, burn_in=5, num_sweeps=2)
    clone.load_state_dict(state)
    a, b = s.sample(rbm, 16), clone.sample(rbm, 16)
    assert torch.equal(a.states, b.states)  # resumed chains continue identically
    s.sample(random_rbm(8, 6), 16)  # new shape: fresh chains
    assert s.state_dict()["hidden"].shape == (16, 6)


def test_neal_anneal_mode_ends_at_target_beta():
    rbm = reference_rbms()[0]
    make = lambda: backends.get_sampler("neal", mode="anneal", num_sweeps=300)  # noqa: E731
    check_distribution(make, rbm, 20000)


def test_unseeded_neal_calls_never_pass_an_out_of_range_seed():
    # dwave-samplers rejects seeds >= 2**31; half of all 32-bit draws used to hit that
    sampler, rbm = backends.get_sampler("neal", num_sweeps=1), random_rbm(3, 2)
    for _ in range(30):
        sampler.sample(rbm, 2)
