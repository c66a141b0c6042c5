"""Exact and AIS log partition functions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qvae import RBM
from qvae.logz import (
    ais_log_partition,
    exact_log_partition,
    log_partition,
    make_betas,
)


def random_rbm(nv, nh, *, init_std, bias_std, seed):
    rbm = RBM(nv, nh, init_std=init_std, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        rbm.visible_bias.copy_(torch.randn(nv, generator=gen) * bias_std)
        rbm.hidden_bias.copy_(torch.randn(nh, generator=gen) * bias_std)
    return rbm


def brute_force_log_z(rbm):
    """log Σ_{v,h} exp(-E(v,h)) over all 2^(nv+nh) joint states, independent of the RBM code."""
    nv, nh = rbm.n_visible, rbm.n_hidden
    z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=nv + nh)), dtype=torch.float64)
    v, h = z[:, :nv], z[:, nv:]
    w, b, c = (p.detach().double() for p in (rbm.weight, rbm.visible_bias, rbm.hidden_bias))
    energy = -(v @ b) - (h @ c) - ((v @ w) * h).sum(1)
    return float(torch.logsumexp(-energy, 0))


@pytest.fixture(scope="module")
def rbm20x12():
    return random_rbm(20, 12, init_std=0.5, bias_std=0.5, seed=0)


def test_exact_matches_brute_force():
    rbm = random_rbm(5, 4, init_std=1.0, bias_std=1.0, seed=3)
    assert exact_log_partition(rbm) == pytest.approx(brute_force_log_z(rbm), abs=1e-10)


def test_ais_matches_exact_on_20x12(rbm20x12):
    exact = exact_log_partition(rbm20x12)
    res = ais_log_partition(rbm20x12, num_betas=3000, num_runs=100, seed=0)
    assert abs(res.log_z - exact) <= max(3 * res.log_z_std, 0.05)
    assert 0 < res.log_z_std < 0.5
    assert res.log_z_low <= exact <= res.log_z_high
    assert res.log_z_low < res.log_z < res.log_z_high
    assert res.log_weights.shape == (100,) and res.log_weights.dtype == torch.float64
    assert res.num_betas == 3000 and res.num_runs == 100
    assert 1 <= res.effective_sample_size <= 100
    assert res.log_z == pytest.approx(
        float(torch.logsumexp(res.log_weights, 0)) - math.log(100), abs=1e-12
    )


def test_zero_couplings_give_the_exact_base():
    rbm = random_rbm(7, 5, init_std=0.0, bias_std=1.5, seed=1)
    res = ais_log_partition(rbm, num_betas=50, num_runs=10, seed=0)
    assert abs(res.log_z - exact_log_partition(rbm)) < 1e-9
    assert abs(res.log_z_base - exact_log_partition(rbm)) < 1e-9
    assert res.log_z_std == 0.0


def test_ais_against_enumeration_of_a_tiny_rbm():
    # Tight tolerance: a wrong base log Z, or a wrong intermediate family, is off by >> 0.02.
    rbm = random_rbm(4, 3, init_std=1.5, bias_std=1.0, seed=2)
    exact = brute_force_log_z(rbm)
    res = ais_log_partition(rbm, num_betas=1000, num_runs=2000, seed=5)
    assert abs(res.log_z - exact) < 0.02
    assert abs(res.log_z - exact) < 4 * res.log_z_std + 1e-3


@pytest.mark.parametrize("num_betas", [2, 3, 5])
def test_short_schedules_are_still_consistent(num_betas):
    # AIS is unbiased for Z with any schedule, so with few betas and many runs it must still
    # hit log Z; this exposes wrong base samples or a transition that does not leave p_k
    # invariant, which long schedules hide.
    rbm = random_rbm(4, 3, init_std=1.5, bias_std=1.0, seed=2)
    res = ais_log_partition(rbm, num_betas=num_betas, num_runs=20000, seed=0)
    assert abs(res.log_z - brute_force_log_z(rbm)) < 4 * res.log_z_std


def test_masked_rbm_uses_the_effective_weight():
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    rbm = RBM(6, 5, mask=mask, init_std=1.0, seed=4)
    with torch.no_grad():
        rbm.weight.add_(3.0)  # masked-out entries become large but must stay inactive
    res = ais_log_partition(rbm, num_betas=1000, num_runs=200, seed=0)
    assert abs(res.log_z - exact_log_partition(rbm)) < max(3 * res.log_z_std, 0.05)


def test_seeded_and_schedules(rbm20x12):
    a = ais_log_partition(rbm20x12, num_betas=200, num_runs=20, seed=7)
    b = ais_log_partition(rbm20x12, num_betas=200, num_runs=20, seed=7)
    c = ais_log_partition(rbm20x12, num_betas=200, num_runs=20, seed=8)
    assert torch.equal(a.log_weights, b.log_weights)
    assert not torch.equal(a.log_weights, c.log_weights)
    exact = exact_log_partition(rbm20x12)
    for schedule in ("sigmoid", torch.linspace(0, 1, 1500).tolist()):
        res = ais_log_partition(rbm20x12, num_runs=50, seed=1, schedule=schedule, progress=True)
        assert abs(res.log_z - exact) < max(3 * res.log_z_std, 0.05)
    sig = make_betas(101, "sigmoid")
    assert sig[0] == 0 and sig[-1] == 1 and bool((sig.diff() > 0).all())
    assert sig[1] < 0.005 and sig[50] - sig[49] > 0.015  # linear steps are 0.01


def test_bad_arguments():
    rbm = RBM(3, 2)
    for kwargs in (
        {"num_betas": 1},
        {"num_runs": 0},
        {"schedule": "cosine"},
        {"schedule": [0.0, 0.7, 0.5, 1.0]},
        {"schedule": [0.1, 1.0]},
    ):
        with pytest.raises(ValueError):
            ais_log_partition(rbm, **kwargs)


def test_log_partition_dispatches_by_size(rbm20x12):
    exact = exact_log_partition(rbm20x12)
    est = log_partition(rbm20x12)
    assert est.method == "exact" and est.log_z == exact and est.log_z_std == 0.0
    assert float(est) == exact and est.ais is None
    est = log_partition(rbm20x12, exact_limit_units=11, num_betas=1000, num_runs=50, seed=0)
    assert est.method == "ais" and est.ais is not None and est.ais.num_betas == 1000
    assert est.log_z_std > 0 and abs(est.log_z - exact) < max(3 * est.log_z_std, 0.05)


def test_nan_rbm_raises_before_any_work():
    rbm = RBM(4, 3)
    with torch.no_grad():
        rbm.weight[1, 2] = float("nan")
    # 10^12 betas would not even fit in memory: the check must come first.
    with pytest.raises(ValueError, match="non-finite"):
        ais_log_partition(rbm, num_betas=10**12)
    with pytest.raises(ValueError, match="non-finite"):
        log_partition(rbm)
    with pytest.raises(ValueError, match="non-finite"):
        exact_log_partition(rbm)


def test_thread_count_is_restored(rbm20x12):
    before = torch.get_num_threads()
    ais_log_partition(rbm20x12, num_betas=20, num_runs=5)
    assert torch.get_num_threads() == before
