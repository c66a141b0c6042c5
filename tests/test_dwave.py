"""The `dwave` backend, offline: everything runs through the QPU emulator (no Leap access)."""

import json
from pathlib import Path

import dimod
import numpy as np
import pytest
import torch
from dwave.cloud.exceptions import RequestTimeout

import backends
import backends.dwave_embedding as dwave_embedding
from backends.dwave import QPUBudgetExceeded, QPUFallbackWarning, native_rbm_mask
from backends.dwave_embedding import Embedding
from backends.testing import check_distribution, random_rbm, reference_rbms, run_conformance
from qvae import RBM


@pytest.fixture
def emulator(tmp_path):
    """Factory of emulator-backed samplers with a private embedding cache."""
    def make(**options):
        opts = {"solver": "emulator", "embedding_cache": str(tmp_path / "emb"), **options}
        return backends.get_sampler("dwave", **opts)
    return make


def test_registered_and_available_without_token():
    assert "dwave" in backends.available()
    ok, reason = backends.availability()["dwave"]
    assert ok and reason.startswith("QPU: ")


def test_conformance_embedded_chimera(tmp_path):
    # every unit of the 8x8 reference RBM needs a 2-qubit chain in Chimera
    report = run_conformance("dwave", options={"topology": "chimera",
                                               "embedding_cache": str(tmp_path)})
    assert len(report["distribution"]) == 2


@pytest.mark.parametrize("substitute", ["thermal", "simulated_annealing"])
def test_native_mode_distribution(emulator, substitute):
    # without chains, dwave-samplers' fixed-beta SA (the issue's emulator) is exact too
    make = lambda: emulator(mode="native", calibration_reads=10000,  # noqa: E731
                            emulator_sampler=substitute)
    mask, _, _ = native_rbm_mask(make(), 9, 10)  # 9 visible units: 512 states to enumerate
    model, ref = RBM(9, 10, mask=mask, init_std=0.0), random_rbm(9, 10, seed=0)
    assert 0 < float(model.mask.mean()) < 1  # a genuinely sparse, hardware-shaped RBM
    with torch.no_grad():
        model.weight.copy_(ref.weight * model.mask)
        model.visible_bias.copy_(ref.visible_bias)
        model.hidden_bias.copy_(ref.hidden_bias)
    stats = check_distribution(make, model, 20000)
    assert stats["tv"] <= stats["tv_tolerance"]
    out = make().sample(model, 100, seed=0)
    assert out.info["num_qubits"] == 19 and out.info["chain_break_fraction"] == 0.0
    assert out.info["embedding_cache"] == "native"


def test_native_mode_rejects_couplings_off_the_graph(emulator):
    s = emulator(mode="native", beta_eff=6.0)
    with pytest.raises(ValueError, match=r"native mode: coupling W\[\d+, \d+\].*share no coupler"):
        s.sample(random_rbm(8, 8), 10)
    # an unmasked RBM is fine when its nonzero couplings happen to sit on couplers
    mask, vis, hid = native_rbm_mask(s, 8, 8)
    dense = random_rbm(8, 8)
    with torch.no_grad():
        dense.weight.mul_(mask)
        dense.weight[0] = 0.0  # and a sparser pattern than the mask
    out = s.sample(dense, 10, seed=0)
    assert out.info["served_by"] == "emulator"
    pinned = emulator(mode="native", beta_eff=6.0, native_qubits=(vis, hid))
    assert torch.equal(pinned.sample(dense, 10, seed=0).states, out.states)
    with pytest.raises(ValueError, match="not working qubits"):
        emulator(mode="native", beta_eff=6.0,
                 native_qubits=(vis[:-1] + [10**6], hid)).sample(dense, 10)


@pytest.mark.parametrize("topology", ["pegasus", "zephyr", "chimera"])
def test_native_rbm_mask_is_a_subgraph(emulator, topology):
    sampler = emulator(topology=topology)
    graph = sampler.working_graph()
    mask, vis, hid = native_rbm_mask(sampler, 12, 10)
    assert mask.shape == (12, 10) and len(set(vis + hid)) == 22
    for i, a in enumerate(vis):
        for j, b in enumerate(hid):
            assert bool(mask[i, j]) == graph.has_edge(a, b)
    assert float(mask.sum(1).min()) >= 1  # no isolated visible unit
    again = native_rbm_mask(graph, 12, 10)
    assert again[1] == vis and again[2] == hid and torch.equal(again[0], mask)


@pytest.mark.parametrize("true_beta", [3.0, 9.0])
def test_beta_estimation_recovers_emulated_beta(emulator, true_beta):
    s = emulator(emulated_beta=true_beta, calibration_reads=2000)
    out = s.sample(reference_rbms()[1], 50, seed=0)
    cal = out.info["calibration"]
    assert cal["rounds"] >= 2 and out.info["beta_eff"] == s.beta
    assert abs(s.beta / true_beta - 1) < 0.10, cal
    assert abs(s.beta / true_beta - 1) < 0.03, cal  # in practice ~1%


def test_weak_rbm_keeps_the_prior_and_skips_reestimates(emulator, recwarn):
    rbm = RBM(16, 16, seed=0)  # freshly initialised: couplings ~ N(0, 0.01^2), no biases
    s = emulator(beta_every=1)
    out = s.sample(rbm, 100, seed=0)
    assert out.info["calibration"]["betas"] == [None] and s.beta == pytest.approx(5.0)
    again = s.sample(rbm, 100, seed=1)
    assert again.info["beta_eff_update"].startswith("skipped") and s.beta == pytest.approx(5.0)
    assert not [w for w in recwarn if "beta_eff" in str(w.message)]


def test_mpl_matches_dwave_system(emulator):
    from dwave.system.temperatures import maximum_pseudolikelihood_temperature

    from backends.dwave_temperature import ThermalIsingSampler, mpl_beta

    bqm = dimod.generators.gnp_random_bqm(12, 0.5, "SPIN", random_state=1)
    ss = ThermalIsingSampler().sample(bqm, num_reads=3000, beta=2.5, num_sweeps=30, seed=0)
    spins = ss.record.sample.astype(float)
    h, (r, c, q), _ = bqm.to_numpy_vectors(variable_order=list(ss.variables))
    jm = np.zeros((12, 12))
    jm[r, c] = q
    jm += jm.T
    ours = mpl_beta(spins, h + spins @ jm)
    temp, _ = maximum_pseudolikelihood_temperature(bqm, (ss.record.sample, list(ss.variables)))
    assert abs(ours * temp - 1) < 1e-3 and abs(ours / 2.5 - 1) < 0.05


def test_embedding_is_cached_on_disk(emulator, monkeypatch):
    calls = []
    real = dwave_embedding.find_embedding
    monkeypatch.setattr(dwave_embedding, "find_embedding",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rbm = reference_rbms()[1]
    first = emulator(beta_eff=6.0)
    assert first.sample(rbm, 10, seed=0).info["embedding_cache"] == "miss"
    assert first.sample(rbm, 10, seed=1).info["embedding_cache"] == "memory"
    assert emulator(beta_eff=6.0).sample(rbm, 10, seed=0).info["embedding_cache"] == "hit"
    assert len(calls) == 1


def test_vectorised_embedding_matches_dwave_embed_bqm():
    from dwave.embedding import embed_bqm

    sampler = backends.get_sampler("dwave", solver="emulator", topology="chimera")
    graph = sampler.working_graph()
    rbm = random_rbm(5, 6, seed=3)
    edges = dwave_embedding.rbm_edges(5, 6, None)
    chains = dwave_embedding.find_embedding(edges, 5, 6, graph, dense=False, timeout=30)
    emb = Embedding(chains, 11, edges, graph.edges)
    h, w = sampler._logical_ising(rbm)
    j = -w[edges[:, 0], edges[:, 1] - 5] / 4
    hq, rows, cols, jq = emb.embed(h, j, 1.5)
    ours = dimod.BinaryQuadraticModel.from_numpy_vectors(
        hq, (rows, cols, jq), 0.0, "SPIN", variable_order=emb.qubits.tolist())
    ref = embed_bqm(rbm.to_bqm().spin, chains, graph, chain_strength=1.5)
    ref.offset = 0.0
    assert ours.is_almost_equal(ref)
    # logical energy of intact chains equals the programmed contraction
    hl, jl = emb.contract(hq, jq[:emb.coupler_edge.size])
    assert np.allclose(hl, h) and np.allclose(jl, j)


def test_clipping_warns_and_hopeless_problems_are_rejected(emulator):
    rbm = random_rbm(6, 4, scale=8.0, seed=0)  # |J|/beta_eff = |W|/8 up to ~2.3 > j_range 1
    s = emulator(beta_eff=2.0)
    with pytest.warns(UserWarning, match=r"programmed terms exceed .* by up to a factor .*clipped"):
        out = s.sample(rbm, 10, seed=0)
    assert out.info["clipped"] > 0 and out.info["clip_ratio"] > 1
    strict = emulator(beta_eff=2.0, max_clip_ratio=1.5)
    with pytest.raises(ValueError, match="max_clip_ratio"):
        strict.sample(rbm, 10, seed=0)
    assert strict.qpu_time_s == 0.0  # nothing was submitted


def test_invalid_problems_rejected_before_submission(emulator):
    s = emulator(beta_eff=6.0)
    with pytest.raises(ValueError, match="all zeros"):
        s.sample(RBM(4, 3, init_std=0.0), 10)
    with pytest.raises(ValueError, match="beta_eff"):
        emulator(beta_eff=float("nan"))
    with pytest.raises(ValueError, match="mode"):
        emulator(mode="hybrid")
    with pytest.raises(ValueError, match="chain_strength 3"):
        emulator(beta_eff=6.0, chain_strength=3.0).sample(reference_rbms()[1], 10)
    assert s.qpu_time_s == 0.0


def test_missing_token_falls_back_to_neal(monkeypatch, tmp_path):
    empty = tmp_path / "dwave.conf"
    empty.write_text("")
    monkeypatch.setenv("DWAVE_CONFIG_FILE", str(empty))
    monkeypatch.setenv("DWAVE_API_TOKEN", "")
    ok, reason = backends.availability()["dwave"]
    assert ok and "no D-Wave API token" in reason and "emulator" in reason
    s = backends.get_sampler("dwave")
    with pytest.warns(QPUFallbackWarning, match="no D-Wave API token"):
        out = s.sample(reference_rbms()[0], 100, seed=0)
    assert out.info["served_by"] == "neal" and "DWAVE_API_TOKEN" in out.info["fallback"]
    assert s.fallbacks == 1 and out.visible.shape == (100, 6)
    with pytest.raises(RuntimeError, match="strict=True.*no D-Wave API token"):
        backends.get_sampler("dwave", strict=True).sample(reference_rbms()[0], 10)


def _failing(sampler, times):
    real = sampler._qpu.sample
    count = {"n": 0}

    def sample(*args, **kwargs):
        count["n"] += 1
        if count["n"] <= times:
            raise RequestTimeout("injected")
        return real(*args, **kwargs)

    sampler._qpu.sample = sample
    return count


def test_transient_failures_are_retried_then_fall_back(emulator):
    rbm = reference_rbms()[0]
    s = emulator(beta_eff=6.0, retry_backoff_s=0.0)
    s.working_graph()
    count = _failing(s, times=1)
    out = s.sample(rbm, 50, seed=0)
    assert out.info["served_by"] == "emulator" and out.info["retries"] == 1 and count["n"] == 2
    count = _failing(s, times=10**6)
    with pytest.warns(QPUFallbackWarning, match="failed 4 times"):
        out = s.sample(rbm, 50, seed=0)
    assert out.info["served_by"] == "neal" and "RequestTimeout" in out.info["fallback"]
    assert count["n"] == 4 and s.fallbacks == 1 and s.retries == 4
    strict = emulator(beta_eff=6.0, retry_backoff_s=0.0, strict=True, max_retries=1)
    strict.working_graph()
    _failing(strict, times=10**6)
    with pytest.raises(RuntimeError, match="failed 2 times"):
        strict.sample(rbm, 50, seed=0)


@pytest.mark.parametrize("on_budget", ["fallback", "stop"])
def test_qpu_time_budget(emulator, on_budget):
    rbm = reference_rbms()[0]
    # one 100-read call costs ~0.015 + 100 * 0.0002 = 0.035 s under the timing model
    s = emulator(beta_eff=6.0, qpu_time_budget_s=0.05, on_budget=on_budget)
    first = s.sample(rbm, 100, seed=0)
    assert first.info["served_by"] == "emulator" and first.info["qpu_access_time_estimated"]
    assert first.info["qpu_access_time_s"] == pytest.approx(0.035)
    if on_budget == "stop":
        with pytest.raises(QPUBudgetExceeded, match="budget"):
            s.sample(rbm, 100, seed=1)
    else:
        with pytest.warns(QPUFallbackWarning, match="budget"):
            second = s.sample(rbm, 100, seed=1)
        assert second.info["served_by"] == "neal"
        with pytest.warns(QPUFallbackWarning):
            assert s.sample(rbm, 10).info["served_by"] == "neal"  # stays on neal
    assert s.qpu_time_s == pytest.approx(0.035)


def test_read_splitting_spin_reversal_and_state(emulator):
    rbm = reference_rbms()[0]
    s = emulator(beta_eff=6.0, num_spin_reversal_transforms=3, beta_every=1)
    out = s.sample(rbm, 12000, seed=0)
    assert out.info["qpu_calls"] == 3 and len(out) == 12000
    assert out.info["qpu_access_time_s"] == pytest.approx(3 * 0.015 + 12000 * 0.0002)
    assert abs(out.info["beta_eff_estimate"] / 6.0 - 1) < 0.05
    stats = check_distribution(lambda: emulator(beta_eff=6.0, num_spin_reversal_transforms=2),
                               rbm, 20000)
    assert stats["tv"] <= stats["tv_tolerance"]
    state = s.state_dict()
    clone = emulator()
    clone.load_state_dict(state)
    assert clone.beta == s.beta and clone.qpu_time_s == s.qpu_time_s
    split = emulator(beta_eff=6.0).sample(rbm, 10001, seed=0)  # emulator num_reads limit 10,000
    assert split.info["qpu_calls"] == 2 and len(split) == 10001


@pytest.mark.parametrize("mode", ["embedded", "native"])
def test_train_smoke_with_the_emulator(tmp_path, mode):
    from qvae import checkpoint
    from qvae.config import load_config
    from qvae.train import train

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/smoke.yaml", [
        "backend.name=dwave", f"backend.options={{solver: emulator, mode: {mode}, "
        f"embedding_cache: {tmp_path / 'emb'}, calibration_reads: 500, beta_every: 5}}",
        "model.n_visible=8", "model.n_hidden=8", "train.steps=12", "train.log_every=4",
        "eval.num_iw=5", "eval.max_examples=20", "train.sample_grid=4"])
    res = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(3 < r["backend/beta_eff"] < 12 for r in rows)  # β_eff logged every row
    assert rows[-1]["fallbacks"] == 0 and "backend/chain_break_fraction" in rows[-1]
    state = checkpoint.load(tmp_path / "run")
    assert state["sampler_states"][0]["qpu_time_s"] > 0
    mask = state["model"].get("prior.mask")
    if mode == "native":  # the RBM was built on the QPU graph: sparse
        assert mask is not None and 0 < float(mask.mean()) < 1
    else:
        assert mask is None
    assert res.evaluation["nll"] > 0
