"""The `dwave` backend on Boltzmann machines of any graph, and clamped units, offline on the
QPU emulator (dwave-system's MockDWaveSampler with the thermal substitute sampler).

Distribution checks compare full states with exact enumeration under `tv_tolerance` (McDiarmid,
false alarm ≤ 1e-6 for independent draws). The emulator's reads are independent chains (each
from a random start, 50 heat-bath sweeps with cluster flips) of exp(−emulated_beta · E_prog);
with `beta_eff` fixed at the emulator's β (6.0), E_prog = E/6 and the reads follow exp(−E)
exactly once mixed. Each such test also shows it can fail: programming a wrong β̂ breaks it.
"""

import dimod
import networkx as nx
import numpy as np
import pytest
import torch

import backends
from backends.base import ProblemShape
from backends.dwave import DWaveBackend, QPUBudgetExceeded, QPUFallbackWarning, bm_ising
from backends.dwave_emulator import ThermalIsingSampler
from backends.dwave_temperature import graph_fields, mpl_estimate
from backends.testing import random_rbm, tv_tolerance
from qvae import RBM
from qvae.boltzmann_graphs import multipartite, qpu_native
from qvae.exact_distribution import total_variation

EMULATED_BETA = 6.0  # DWaveOptions.emulated_beta's default
N = 20000


@pytest.fixture
def emulator(tmp_path):
    """Factory of emulator-backed samplers with a private embedding cache."""
    def make(**options):
        opts = {"solver": "emulator", "embedding_cache": str(tmp_path / "emb"), **options}
        return backends.get_sampler("dwave", **opts)
    return make


def known_beta(make, **options):
    """A sampler programmed for the emulator's own β (no calibration, no re-estimates)."""
    return make(beta_eff=EMULATED_BETA, beta_every=0, **options)


def native_bm(sampler, per_partition: int, seed: int = 0):
    """A 4-partite BM on the sampler's qubits and couplers, couplings of order 1."""
    bm = qpu_native(None, 4, graph=sampler.working_graph(), qubits_per_partition=per_partition,
                    seed=seed, scale=1.0)
    with torch.no_grad():
        bm.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return bm


def dense_bm(per_partition: int, seed: int = 0):
    """A complete 4-partite BM on units 0..n-1 (not a subgraph of any QPU: needs chains)."""
    bm = multipartite([per_partition] * 4, seed=seed, scale=1.0)
    with torch.no_grad():
        bm.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return bm


def conditional(bm, clamp):
    """Exact p(z | clamp) over all 2^n states (zero where a clamped unit differs)."""
    n = bm.n_units
    index = torch.arange(2**n)
    log_p = bm.exact_log_probs()
    for unit, value in clamp.items():
        log_p = torch.where((index >> unit) % 2 == value, log_p, -torch.inf)
    return torch.softmax(log_p, 0)


def tv_ok(states, p):
    tv, tol = total_variation(states, p), tv_tolerance(p, states.shape[0])
    return tv <= tol, (tv, tol)


# --------------------------------------------------------------------------- native
def test_qpu_native_bm_is_sampled_natively_and_exactly(emulator):
    s = known_beta(emulator)
    bm = native_bm(s, per_partition=2)  # 8 qubits, 256 states
    assert not nx.is_bipartite(nx.Graph(bm.edges.tolist()))  # Pegasus' odd cycles kept
    out = s.sample(bm, N, seed=0)
    info = out.info
    assert info["mode"] == "native" and info["embedding_cache"] == "native"
    assert info["num_qubits"] == bm.n_units and info["max_chain_length"] == 1
    assert info["mean_chain_length"] == 1.0 and info["chain_break_fraction"] == 0.0
    assert out.states.shape == (N, bm.n_units) and not out.layered
    assert torch.allclose(out.energy, bm.sample_energy(out.states))
    ok, stats = tv_ok(out.states, bm.exact_log_probs().exp())
    assert ok, stats
    # the check has power: programmed for half the true β̂, the samples are too cold
    wrong = emulator(beta_eff=EMULATED_BETA / 2, beta_every=0).sample(bm, N, seed=0)
    assert not tv_ok(wrong.states, bm.exact_log_probs().exp())[0]


def test_native_mode_names_what_a_bm_lacks(emulator):
    s = emulator(mode="native", beta_eff=EMULATED_BETA)
    dense = dense_bm(3)
    dense.variables = sorted(s.working_graph())[:dense.n_units]  # qubits, but no K_{3,3,3,3}
    with pytest.raises(ValueError, match=r"not a subgraph.*couplings join qubits that share "
                                         r"no coupler.*qpu_native"):
        s.sample(dense, 10, seed=0)
    labelled = multipartite([2, 2, 2], seed=0)
    labelled.variables = [f"u{k}" for k in range(labelled.n_units)]
    with pytest.raises(ValueError, match=r"not working qubits.*'u0'"):
        s.sample(labelled, 10, seed=0)
    # the same native model is fine in native mode
    bm = native_bm(s, per_partition=2)
    assert s.sample(bm, 10, seed=0).info["mode"] == "native"


# ------------------------------------------------------------------------- embedded
def test_dense_multipartite_bm_is_embedded_with_chains(emulator):
    s = known_beta(emulator)
    bm = dense_bm(3)  # complete 4-partite on 12 units: K_{3,3,3,3}, 4096 states
    out = s.sample(bm, N, seed=0)
    info = out.info
    assert info["mode"] == "embedded" and info["embedding_cache"] == "miss"
    assert info["max_chain_length"] > 1 and info["num_qubits"] > bm.n_units
    assert info["mean_chain_length"] == pytest.approx(info["num_qubits"] / bm.n_units)
    assert 0.0 <= info["chain_break_fraction"] < 0.01
    ok, stats = tv_ok(out.states, bm.exact_log_probs().exp())
    assert ok, stats
    assert s.sample(bm, 10, seed=1).info["embedding_cache"] == "memory"
    assert known_beta(emulator).sample(bm, 10, seed=1).info["embedding_cache"] == "hit"


def test_embedded_mode_places_a_native_bm_on_its_qubits(emulator):
    s = known_beta(emulator, mode="embedded")
    bm = native_bm(s, per_partition=4)
    info = s.sample(bm, 10, seed=0).info
    assert info["mode"] == "native" and info["max_chain_length"] == 1
    assert info["num_qubits"] == bm.n_units


def test_bipartite_bm_off_the_graph_is_embedded_as_an_rbm(emulator):
    from qvae.boltzmann_graphs import from_rbm

    s = known_beta(emulator, topology="chimera")
    bm = from_rbm(random_rbm(5, 5, seed=5))
    bm.variables = [f"unit{k}" for k in range(bm.n_units)]  # labels that are no qubits
    out = s.sample(bm, N, seed=0)
    # K_{5,5} does not fit a K_{4,4} Chimera cell: the RBM path's biclique chains of 2
    assert out.info["mode"] == "embedded" and out.info["max_chain_length"] == 2
    assert out.info["embedding_cache"] == "miss" and not out.layered
    ok, stats = tv_ok(out.states, bm.exact_log_probs().exp())
    assert ok, stats


# --------------------------------------------------------------------------- clamps
def test_clamped_native_bm_stays_native_and_is_exact(emulator):
    s = known_beta(emulator, mode="native")
    bm = native_bm(s, per_partition=3)  # 12 qubits
    clamp = {0: 1, 5: 0, 9: 1}
    out = s.sample(bm, N, seed=0, clamp=clamp)
    info = out.info
    assert info["clamped"] == 3 and info["mode"] == "native"
    assert info["num_qubits"] == bm.n_units - 3 and info["max_chain_length"] == 1
    for unit, value in clamp.items():
        assert bool((out.states[:, unit] == value).all())
    ok, stats = tv_ok(out.states, conditional(bm, clamp))
    assert ok, stats


def test_clamped_native_rbm_keeps_its_qubits(emulator):
    # the reduced RBM renumbers its units; the sampler must still put each free unit on the
    # qubit its mask was built for (before: "native_qubits has 6+5 qubits but the RBM is 5x4")
    s = known_beta(emulator, mode="native")
    mask = s.connectivity_mask(6, 5)
    ref = random_rbm(6, 5, seed=0)
    rbm = RBM(6, 5, mask=mask, init_std=0.0)
    with torch.no_grad():
        rbm.weight.copy_(ref.weight * mask)
        rbm.visible_bias.copy_(ref.visible_bias)
        rbm.hidden_bias.copy_(ref.hidden_bias)
    clamp = {0: 1, 7: 0}
    out = s.sample(rbm, N, seed=0, clamp=clamp)
    assert out.layered and out.visible.shape == (N, 6) and out.hidden.shape == (N, 5)
    assert out.info["mode"] == "native" and out.info["num_qubits"] == 9
    assert bool((out.states[:, 0] == 1).all()) and bool((out.states[:, 7] == 0).all())
    from qvae.boltzmann_graphs import from_rbm

    ok, stats = tv_ok(out.states, conditional(from_rbm(rbm), clamp))
    assert ok, stats
    unclamped = s.sample(rbm, 10, seed=0)
    assert unclamped.info["num_qubits"] == 11  # the full model's mapping is unchanged


def test_clamped_dense_bm_is_embedded_and_exact(emulator):
    s = known_beta(emulator)
    bm = dense_bm(3)
    clamp = {0: 0, 4: 1, 11: 1}
    out = s.sample(bm, N, seed=0, clamp=clamp)
    assert out.info["clamped"] == 3 and out.info["mode"] == "embedded"
    assert out.info["max_chain_length"] > 1
    for unit, value in clamp.items():
        assert bool((out.states[:, unit] == value).all())
    ok, stats = tv_ok(out.states, conditional(bm, clamp))
    assert ok, stats


# ----------------------------------------------------------------------- temperature
def test_pseudo_likelihood_recovers_beta_on_a_non_bipartite_model():
    bm = multipartite([4, 4, 4], seed=3, scale=1.0)  # K_{4,4,4}: triangles
    assert not nx.is_bipartite(nx.Graph(bm.edges.tolist()))
    h, j = bm_ising(bm)
    edges = bm.edges.numpy()
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(h, (edges[:, 0], edges[:, 1], j), 0.0,
                                                        dimod.SPIN)
    true_beta = 2.5
    ss = ThermalIsingSampler().sample(bqm, num_reads=4000, seed=0, beta=true_beta,
                                      num_sweeps=100)
    spins = ss.record.sample[:, np.argsort(list(ss.variables))].astype(np.float32)
    fields = graph_fields(spins, h, edges, j)
    dense = np.zeros((bm.n_units, bm.n_units))
    dense[edges[:, 0], edges[:, 1]] = j
    assert np.allclose(fields, h + spins @ (dense + dense.T), atol=1e-5)
    est = mpl_estimate(spins, fields)
    assert abs(est.beta / true_beta - 1) < 0.05, est
    assert abs(est.beta / true_beta - 1) < 4 / (est.beta * np.sqrt(est.information)), est


@pytest.mark.parametrize("kind", ["native", "embedded"])
@pytest.mark.parametrize("true_beta", [3.0, 8.0])
def test_calibration_recovers_the_emulated_beta_on_a_bm(emulator, kind, true_beta):
    s = emulator(emulated_beta=true_beta, calibration_reads=2000)
    bm = native_bm(s, per_partition=8) if kind == "native" else dense_bm(6)
    out = s.sample(bm, 50, seed=0)
    assert out.info["mode"] == kind
    assert out.info["calibration"]["rounds"] >= 2 and out.info["beta_eff"] == s.beta
    # measured 0.3-3% off (relative standard error ~1%; the emulator's 50 sweeps per read
    # leave a small bias)
    assert abs(s.beta / true_beta - 1) < 0.05, out.info["calibration"]


# ---------------------------------------------------------------------- work, budget
def test_work_model_and_budget_cover_bm_calls(emulator):
    bm = dense_bm(3)
    shape = ProblemShape(bm.n_units, 0, bm.n_edges, bipartite=False)
    costs = DWaveBackend.work({"solver": "emulator", "beta_eff": 6.0}, shape, 100)
    assert costs["qpu_seconds"].value == pytest.approx(0.035)  # 0.015 + 100 × 0.0002
    assert costs["work"].value == 100.0 * 100 * 50 * (12 + 54)  # units + couplings
    s = emulator(beta_eff=EMULATED_BETA, qpu_time_budget_s=0.05, on_budget="stop")
    first = s.sample(bm, 100, seed=0)
    assert first.info["qpu_access_time_s"] == pytest.approx(s.estimate_qpu_seconds(100))
    with pytest.raises(QPUBudgetExceeded, match="budget"):
        s.sample(bm, 100, seed=1, clamp={0: 1})
    fallback = emulator(beta_eff=EMULATED_BETA, qpu_time_budget_s=0.01)
    with pytest.warns(QPUFallbackWarning, match="budget"):
        out = fallback.sample(bm, 100, seed=0, clamp={0: 1})
    assert out.info["served_by"] == "neal" and bool((out.states[:, 0] == 1).all())
