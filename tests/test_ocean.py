"""Ocean (dimod) interoperability: backends as dimod samplers, dimod samplers as a backend, and
our QPU helpers against Ocean's own."""

import itertools
import json
import unittest

import dimod
import dimod.testing
import httpx
import numpy as np
import pytest
import torch

import backends
from backends.dimod_backend import DimodBackend
from backends.dwave_temperature import ThermalIsingSampler, mpl_beta
from backends.testing import random_rbm, run_conformance, tv_tolerance

THERMAL_SA = {  # dwave-samplers' simulated annealing held at β = 1 with Gibbs acceptance
    "sampler": "dwave.samplers.SimulatedAnnealingSampler",
    "sample_kwargs": {"beta_range": [1.0, 1.0], "beta_schedule_type": "linear",
                      "proposal_acceptance_criteria": "Gibbs", "num_sweeps": 100},
}

AS_DIMOD = [
    pytest.param("exact", {}, id="exact"),
    pytest.param("gibbs", {"num_sweeps": 5, "burn_in": 50}, id="gibbs"),
    pytest.param("neal", {"num_sweeps": 50}, id="neal"),
    pytest.param("mala", {"burn_in": 200, "num_steps": 10}, id="mala"),
    pytest.param("dimod", THERMAL_SA, id="dimod"),
]


def spin_bqm() -> dimod.BinaryQuadraticModel:
    """A bipartite SPIN BQM with string labels (not in layer order) and an offset."""
    return dimod.BinaryQuadraticModel(
        {"x": 0.4, "b": -0.3, "a": 0.2, "y": -0.5, "z": 0.1},
        {("a", "x"): -0.8, ("a", "y"): 0.6, ("b", "x"): 0.5, ("b", "z"): -0.7, ("y", "b"): 0.3},
        3.25, dimod.SPIN)


def triangle_bqm() -> dimod.BinaryQuadraticModel:
    return dimod.BinaryQuadraticModel({"p": 0.3, "q": -0.2, "r": 0.1},
                                      {("p", "q"): 0.5, ("q", "r"): -0.4, ("p", "r"): 0.6},
                                      -1.0, dimod.SPIN)


def exact_tv(ss: dimod.SampleSet, bqm: dimod.BinaryQuadraticModel) -> tuple[float, float]:
    """(TV between the sampled and the exact Boltzmann law of `bqm`, its tolerance)."""
    labels = list(bqm.variables)
    values = sorted(bqm.vartype.value)
    states = list(itertools.product(values, repeat=len(labels)))
    p = np.exp([-bqm.energy(dict(zip(labels, s, strict=True))) for s in states])
    p = torch.tensor(p / p.sum())
    index = {s: k for k, s in enumerate(states)}
    rows = ss.record.sample[:, [ss.variables.index(v) for v in labels]]
    counts = np.repeat(np.array([index[tuple(r)] for r in rows]), ss.record.num_occurrences)
    freq = np.bincount(counts, minlength=len(states)) / counts.size
    return 0.5 * float(np.abs(freq - p.numpy()).sum()), tv_tolerance(p, counts.size)


# --------------------------------------------------------------------------- as_dimod
@pytest.mark.parametrize("name, options", AS_DIMOD)
def test_as_dimod_is_a_dimod_sampler_with_the_bqms_labels_vartype_and_energies(name, options):
    sampler = backends.as_dimod(name, **options)
    dimod.testing.assert_sampler_api(sampler)
    assert {"num_reads", "seed"} <= set(sampler.parameters)
    assert sampler.properties["backend"] == name
    assert sampler.properties["backend_options"] == options
    bqm = spin_bqm()
    ss = sampler.sample(bqm, num_reads=64, seed=3)
    assert isinstance(ss, dimod.SampleSet) and len(ss) == 64
    assert ss.vartype is dimod.SPIN and list(ss.variables) == list(bqm.variables)
    dimod.testing.assert_sampleset_energies(ss, bqm)  # offset included
    assert ss.info["backend"] == name and "total_s" in ss.info["timing"]
    again = dimod.SampleSet.from_serializable(json.loads(json.dumps(ss.to_serializable())))
    cols = [again.variables.index(v) for v in ss.variables]  # dimod sorts labels on load
    assert np.array_equal(again.record.sample[:, cols], ss.record.sample)
    # each call independent: the same seed gives the same samples on the same sampler
    assert np.array_equal(sampler.sample(bqm, num_reads=64, seed=3).record.sample,
                          ss.record.sample)
    q, _ = bqm.change_vartype(dimod.BINARY, inplace=False).to_qubo()
    ss = sampler.sample_qubo(q, num_reads=8, seed=1)
    assert ss.vartype is dimod.BINARY
    dimod.testing.assert_sampleset_energies(ss, dimod.BinaryQuadraticModel.from_qubo(q))


@pytest.mark.parametrize("name, options", [
    ("exact", {}), ("gibbs", {"num_sweeps": 5, "burn_in": 50}), ("neal", {"num_sweeps": 50})])
def test_as_dimod_samples_the_spin_bqms_boltzmann_law(name, options):
    bqm = spin_bqm()
    ss = backends.as_dimod(name, **options).sample(bqm, num_reads=20000, seed=0)
    tv, tol = exact_tv(ss, bqm)
    assert tv <= tol, f"TV {tv:.4f} > {tol:.4f}"


@pytest.mark.parametrize("name, options", [("neal", {"num_sweeps": 50}), ("dimod", THERMAL_SA)])
def test_as_dimod_takes_odd_cycles_where_the_backend_can(name, options):
    bqm = triangle_bqm()
    ss = backends.as_dimod(name, **options).sample(bqm, num_reads=20000, seed=1)
    dimod.testing.assert_sampleset_energies(ss, bqm)
    tv, tol = exact_tv(ss, bqm)
    assert tv <= tol


def test_as_dimod_says_which_backends_take_odd_cycles():
    # gibbs and dwave sample any graph since issue 13 (tests/test_service_bm.py); langevin
    # samples bipartite models only
    bqm = triangle_bqm()
    with pytest.raises(ValueError, match=r"odd cycle.*bipartite models only.*'gibbs'.*'neal'"):
        backends.as_dimod("langevin").sample(bqm, num_reads=4)


def test_as_dimod_refuses_bad_input_naming_it():
    sampler = backends.as_dimod("gibbs")
    with pytest.raises(ValueError, match=r"unknown sample parameter\(s\) \['num_sweeps'\]"):
        sampler.sample(spin_bqm(), num_sweeps=3)
    with pytest.raises(ValueError, match="num_samples must be > 0"):
        sampler.sample(spin_bqm(), num_reads=0)
    with pytest.raises(ValueError, match="linear bias of variable 'a'"):
        sampler.sample(dimod.BinaryQuadraticModel({"a": np.nan, "b": 0}, {}, 0, "BINARY"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sweeps'\]"):
        backends.as_dimod("gibbs", sweeps=3)
    assert len(sampler.sample(spin_bqm(), num_reads=np.int64(3))) == 3  # numpy ints are fine


def test_backend_sample_of_a_bqm_points_to_as_dimod():
    # measured: get_sampler("gibbs").sample(bqm) was a bare TypeError (missing num_samples)
    with pytest.raises(TypeError, match=r"as_dimod\('gibbs', \*\*options\)\.sample\(bqm"):
        backends.get_sampler("gibbs").sample(spin_bqm())


def as_dimod_gibbs() -> dimod.Sampler:
    return backends.as_dimod("gibbs", burn_in=20)


def as_dimod_neal() -> dimod.Sampler:
    return backends.as_dimod("neal", num_sweeps=20)


def as_dimod_exact() -> dimod.Sampler:
    return backends.as_dimod("exact")


@dimod.testing.load_sampler_bqm_tests(as_dimod_gibbs)
@dimod.testing.load_sampler_bqm_tests(as_dimod_neal)
@dimod.testing.load_sampler_bqm_tests(as_dimod_exact)
class TestDimodOwnSamplerTests(unittest.TestCase):
    """dimod's own sampler tests (empty, one-variable and path BQMs, every BQM class)."""


# ----------------------------------------------------------------------- dimod backend
def test_dimod_backend_wrapping_thermal_simulated_annealing_passes_the_conformance_suite():
    report = run_conformance("dimod", options=THERMAL_SA, num_samples=20000)
    assert len(report["distribution"]) == 2


def test_dimod_backend_wraps_tabu():
    rbm = random_rbm(6, 4, seed=1)
    sampler = backends.get_sampler("dimod", sampler="dwave.samplers.TabuSampler",
                                   sampler_options={}, sample_kwargs={"timeout": 1})
    out = sampler.sample(rbm, 20, seed=0)
    assert out.visible.shape == (20, 6) and out.hidden.shape == (20, 4)
    assert torch.allclose(out.energy, rbm.energy(out.visible, out.hidden).detach(), atol=1e-5)
    assert out.info["sampler"] == "dwave.samplers.TabuSampler" and out.info["seeded"]
    # Tabu optimises: it finds the ground state (exact by enumeration), it does not sample
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=10)))
    ground = float(rbm.energy(states[:, :6], states[:, 6:]).detach().min())
    assert float(out.energy.min()) == pytest.approx(ground, abs=1e-5)


def test_dimod_backend_expands_and_tops_up_answers_within_max_calls():
    rbm = random_rbm(5, 5, seed=2)  # ExactSolver answers every one of the 1024 states per call
    out = backends.get_sampler("dimod", sampler="dimod.ExactSolver").sample(rbm, 2500)
    assert len(out) == 2500 and out.info["calls"] == 3 and not out.info["seeded"]
    with pytest.raises(RuntimeError, match=r"1024 of 2500 samples in max_calls=1"):
        backends.get_sampler("dimod", sampler="dimod.ExactSolver", max_calls=1).sample(rbm, 2500)


@pytest.mark.parametrize("options, match", [
    ({}, r"needs sampler='package.module.Class'"),
    ({"sampler": "os.path.join"}, r"sampler='os.path.join' names a function, not a dimod"),
    ({"sampler": "json"}, r"not an import path"),
    ({"sampler": "no_such_pkg.Sampler"}, r"cannot import module 'no_such_pkg'"),
    ({"sampler": "dimod.NoSuchSampler"}, r"names nothing, not a dimod.Sampler"),
    ({"sampler": "dwave.samplers.TabuSampler", "sampler_options": {"tabu": 1}},
     r"cannot build dwave.samplers.TabuSampler with sampler_options"),
    ({"sampler": "dwave.samplers.TabuSampler", "sample_kwargs": {"seed": 1}},
     r"sample_kwargs may not set \['seed'\]"),
    ({"sampler": "dwave.samplers.TabuSampler", "sample_kwargs": {"sweeps": 1}},
     r"sample_kwargs \['sweeps'\] are not parameters of dwave.samplers.TabuSampler"),
    ({"sampler": "dimod.ExactSolver", "max_calls": 0}, r"max_calls must be greater than .*, got 0"),
])
def test_dimod_backend_validates_its_options(options, match):
    with pytest.raises(ValueError, match=match):
        backends.get_sampler("dimod", **options)


def test_dimod_backend_is_registered_and_its_result_matches_a_direct_call():
    assert "dimod" in backends.available()
    rbm = random_rbm(4, 3, seed=3)
    out = DimodBackend(**THERMAL_SA).sample(rbm, 50, seed=11)
    from dwave.samplers import SimulatedAnnealingSampler

    direct = SimulatedAnnealingSampler().sample(rbm.to_bqm(), num_reads=50, seed=11,
                                                **THERMAL_SA["sample_kwargs"])
    assert np.array_equal(out.states.numpy(), direct.record.sample[:, list(range(7))])


# ------------------------------------------------------------- Ocean's estimator, same answer
def test_mpl_beta_agrees_with_ocean_maximum_pseudolikelihood_temperature():
    from dwave.system.temperatures import maximum_pseudolikelihood_temperature

    bqm = random_rbm(6, 6, seed=4).to_bqm().change_vartype(dimod.SPIN, inplace=False)
    ss = ThermalIsingSampler().sample(bqm, num_reads=2000, seed=0, beta=3.0, num_sweeps=100)
    labels = list(bqm.variables)
    spins = ss.record.sample[:, [ss.variables.index(v) for v in labels]].astype(np.float64)
    h, (row, col, q), _ = bqm.to_numpy_vectors(variable_order=labels)
    j = np.zeros((len(labels), len(labels)))
    j[row, col] = j[col, row] = q
    ours = mpl_beta(spins, h + spins @ j)
    temperature, _ = maximum_pseudolikelihood_temperature(bqm, (spins, labels))
    assert ours == pytest.approx(1 / temperature, rel=1e-6)
    assert ours == pytest.approx(3.0, rel=0.1)


def test_dimod_backend_declares_its_work_where_it_is_known():
    from backends.base import ProblemShape

    shape = ProblemShape(6, 4, 24)
    known = DimodBackend.work(THERMAL_SA, shape, 100)
    assert known["work"].value == 5.0 * 100 * 100 * 34 and "sample_kwargs" in known["work"].options
    tabu = DimodBackend.work({"sampler": "dwave.samplers.TabuSampler"}, shape, 100)
    assert set(tabu) == {"state_bytes"}  # a wrapped optimiser's cost is its own


def test_ocean_composites_take_an_as_dimod_sampler_as_child():
    from dwave.preprocessing import SpinReversalTransformComposite

    bqm = spin_bqm()
    composed = SpinReversalTransformComposite(backends.as_dimod("exact"), seed=0)
    dimod.testing.assert_sampler_api(composed)
    ss = composed.sample(bqm, num_reads=5000, num_spin_reversal_transforms=4, seed=2)
    assert len(ss) == 4 * 5000
    dimod.testing.assert_sampleset_energies(ss, bqm)
    tv, tol = exact_tv(ss, bqm)  # the transforms undone, it is still the BQM's Boltzmann law
    assert tv <= tol


# ----------------------------------------------------------------------------- the service
SERVICE_KEY = "ocean-test-key-1"


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/sample", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {SERVICE_KEY}"})


def test_service_bqm_results_load_with_dimod_and_dimod_is_served_only_for_allowlisted_classes(
        tmp_path):
    from qvae.service.testing import running_service

    config = {"keys": [{"name": "ocean", "key": SERVICE_KEY}],
              "state_db": str(tmp_path / "state.sqlite"),
              "dimod_samplers": ["dwave.samplers.SimulatedAnnealingSampler"]}
    bqm = spin_bqm()
    with running_service(config) as url:
        # measured: BQM answers did not load with dimod.SampleSet.from_serializable
        r = post(url, {"backend": "exact", "num_samples": 200, "seed": 4,
                       "bqm": bqm.to_serializable()})
        assert r.status_code == 200, r.text
        body = r.json()
        ss = dimod.SampleSet.from_serializable(body)
        assert len(ss) == 200 and ss.vartype is dimod.SPIN
        assert set(ss.variables) == set(bqm.variables)
        dimod.testing.assert_sampleset_energies(ss, bqm)
        assert body["served_by"] == "exact" and ss.info["key"] == "ocean"
        assert "total_s" in ss.info["timing"]
        # the dimod backend, for an allowlisted class (a general BQM too) ...
        r = post(url, {"backend": "dimod", "num_samples": 50, "seed": 1,
                       "bqm": triangle_bqm().to_serializable(), "options": THERMAL_SA})
        assert r.status_code == 200, r.text
        dimod.testing.assert_sampleset_energies(dimod.SampleSet.from_serializable(r.json()),
                                                triangle_bqm())
        # ... and refused, before anything is imported, for any other
        for path in ("dwave.samplers.TabuSampler", "no_such_package_qvae.Sampler"):
            r = post(url, {"backend": "dimod", "num_samples": 5, "bqm": bqm.to_serializable(),
                           "options": {"sampler": path}})
            assert r.status_code == 403, r.text
            assert "dimod_samplers" in r.text and path in r.text
        listed = httpx.get(f"{url}/v1/backends",
                           headers={"Authorization": f"Bearer {SERVICE_KEY}"}).json()
        assert "dimod" in listed["backends"]
    # without an allowlist the service does not serve the dimod backend at all
    with running_service({**config, "dimod_samplers": [],
                          "state_db": str(tmp_path / "state2.sqlite")}) as url:
        r = post(url, {"backend": "dimod", "num_samples": 5, "bqm": bqm.to_serializable(),
                       "options": THERMAL_SA})
        assert r.status_code == 422 and "dimod" not in r.json()["detail"][0]["msg"].split(
            "serves")[1]
