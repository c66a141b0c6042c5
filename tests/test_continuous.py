"""The relaxed density π_τ (qvae.relax) and the continuous backends `langevin` and `mala`.

π_τ(u) ∝ exp(−F(σ(u/τ))) Π logistic(u_i). Checks: the analytic gradients equal autograd, π_τ is
normalisable, its exact orthant masses (quadrature on a 2-unit model) tend to the RBM marginal
as τ → 0, MALA samples π_τ itself (KS against quadrature), the rounded samples pass the
conformance suite, and the options / adaptation / persistence behave as documented.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import backends
from backends.testing import (
    check_distribution,
    exact_visible_marginal,
    random_rbm,
    run_conformance,
)
from qvae.relax import (
    extended_log_density,
    extended_log_density_and_grad,
    grad_log_density,
    log_density,
    round_visible,
    rounded_orthant_masses,
    sample_hidden,
    to_visible,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small element-wise ops: one thread avoids OpenMP stalls when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ quadrature helpers


def _gauss_nodes(tau: float, length: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [−length, length] (none at 0), 16 per panel, on
    panels [0, τ/8], [τ/8, τ/4], … doubling out to `length`: exact to ~1e-10 for π_τ."""
    edges = [0.0]
    while edges[-1] < length:
        edges.append(min(length, tau / 8 * 2 ** (len(edges) - 1)))
    x, w = np.polynomial.legendre.leggauss(16)
    lo, hi = np.array(edges[:-1])[:, None], np.array(edges[1:])[:, None]
    half = ((hi - lo) / 2 * x + (hi + lo) / 2).ravel()
    w_half = ((hi - lo) / 2 * w).ravel()
    return np.concatenate([-half[::-1], half]), np.concatenate([w_half[::-1], w_half])


def _density(rbm, tau: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unnormalised π_τ on the grid a × b of a 2-unit RBM (max 1 on that grid)."""
    u1, u2 = np.meshgrid(a, b, indexing="ij")
    u = torch.from_numpy(np.stack([u1.ravel(), u2.ravel()], 1))
    with torch.no_grad():
        logp = log_density(rbm.float64_copy(), u, tau).numpy().reshape(u1.shape)
    return np.exp(logp - logp.max())


def _orthant_masses(rbm, tau: float) -> np.ndarray:
    """P_{π_τ}(round(u) = v) for the 4 states v (index bit i = v_i), by quadrature."""
    nodes, weights = _gauss_nodes(tau)
    mass = weights[:, None] * _density(rbm, tau, nodes, nodes) * weights[None, :]
    pos = nodes > 0
    masses = np.array([mass[np.ix_(pos == bool(k & 1), pos == bool(k & 2))].sum()
                       for k in range(4)])
    return masses / masses.sum()


def _marginal_cdf(rbm, tau: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, CDF of u_axis at x) on a grid dense (τ/20) near the kink, by quadrature."""
    near = np.linspace(-30 * tau, 30 * tau, 1201)
    x = np.unique(np.concatenate([near, np.linspace(-40, 40, 4001)]))
    nodes, weights = _gauss_nodes(tau)
    dens = _density(rbm, tau, x, nodes) if axis == 0 else _density(rbm, tau, nodes, x).T
    pdf = dens @ weights
    cdf = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))])
    return x, cdf / cdf[-1]


def _two_unit_rbm() -> torch.nn.Module:
    return random_rbm(2, 3, scale=1.5, seed=5)


# --------------------------------------------------------------------------- the density


@pytest.mark.parametrize("tau", [0.03, 0.3, 2.0])
def test_grad_log_density_matches_autograd(tau):
    rbm = random_rbm(5, 4, seed=3).float64_copy()
    gen = torch.Generator().manual_seed(0)
    u = torch.cat([torch.randn(20, 5, generator=gen, dtype=torch.float64) * 3,
                   torch.randn(20, 5, generator=gen, dtype=torch.float64) * tau])  # at the kink
    u.requires_grad_(True)
    (auto,) = torch.autograd.grad(log_density(rbm, u, tau).sum(), u)
    assert torch.allclose(grad_log_density(rbm, u.detach(), tau), auto, rtol=1e-10, atol=1e-10)

    phi = torch.cat([u.detach(), -u.detach() / 2], 1).requires_grad_(True)
    (auto_ext,) = torch.autograd.grad(extended_log_density(rbm, phi, tau).sum(), phi)
    logp, grad = extended_log_density_and_grad(rbm, phi.detach(), tau)
    assert torch.allclose(grad, auto_ext, rtol=1e-10, atol=1e-10)
    assert torch.allclose(logp, extended_log_density(rbm, phi.detach(), tau), atol=1e-12)


def test_log_density_is_normalisable_and_decays():
    rbm, tau = _two_unit_rbm(), 0.1
    with torch.no_grad():
        far = torch.tensor([[30.0, 0.5], [-30.0, 0.5], [0.5, 60.0], [-45.0, -45.0]])
        # log π_τ(u) + Σ|u_i| = −F(v) − 2 Σ softplus(−|u_i|): bounded, so the tails are
        # logistic (e^{−|u|}). −F varies by ≤ Σ|b| + Σ|W| on [0,1]^n, the rest by ≤ 2 log 2 a unit.
        tail = log_density(rbm, far.double(), tau) + far.double().abs().sum(1)
        bound = rbm.visible_bias.abs().sum() + rbm.weight.abs().sum() + 4 * math.log(2)
        assert float(tail.max() - tail.min()) <= float(bound)
    nodes, weights = _gauss_nodes(tau)
    dens = _density(rbm, tau, nodes, nodes)
    inner = np.abs(nodes) <= 20
    total = weights @ dens @ weights
    core = weights[inner] @ dens[np.ix_(inner, inner)] @ weights[inner]
    assert np.isfinite(total) and total > 0
    assert (total - core) / total < 1e-6  # the mass beyond |u| = 20 is ~e^{−20}


def test_rounded_pi_tau_tends_to_rbm_marginal():
    rbm = _two_unit_rbm()
    exact = exact_visible_marginal(rbm).numpy()
    tvs = {tau: 0.5 * np.abs(_orthant_masses(rbm, tau) - exact).sum() for tau in (0.4, 0.1, 0.01)}
    assert tvs[0.4] > tvs[0.1] > tvs[0.01]
    assert tvs[0.01] < 0.01 and tvs[0.1] > 0.01  # O(τ): the bias is real at finite τ
    assert 0.5 < tvs[0.1] / (10 * tvs[0.01]) < 2  # and linear in τ
    # The stratified Monte Carlo estimate used for the bias tables agrees with quadrature.
    mc = rounded_orthant_masses(rbm, 0.1, num_points=200_000).numpy()
    assert np.abs(mc - _orthant_masses(rbm, 0.1)).max() < 2e-3


def test_relaxed_helpers():
    u = torch.tensor([[-1.0, 0.0, 2.0]])
    assert torch.equal(round_visible(u), torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.allclose(to_visible(u, 0.5), torch.sigmoid(u / 0.5))
    rbm = random_rbm(3, 200, seed=1)
    v = torch.tensor([[1.0, 0.0, 1.0]]).repeat(4000, 1)
    h = sample_hidden(rbm, v, torch.Generator().manual_seed(0))
    assert torch.all((h == 0) | (h == 1))
    assert torch.allclose(h.mean(0), rbm.p_h_given_v(v[:1])[0].detach(), atol=0.04)
    with pytest.raises(ValueError, match="tau"):
        to_visible(u, 0.0)


# --------------------------------------------------------------- MALA samples π_τ exactly


def _pi_tau_p_values(rbm, tau: float, u: np.ndarray) -> dict[str, float]:
    """p-values of KS tests of each u_i marginal and a χ² test of the orthant counts of `u`
    (independent draws) against π_τ computed by quadrature."""
    out = {}
    for axis in (0, 1):
        grid, cdf = _marginal_cdf(rbm, tau, axis)
        ks = stats.kstest(u[:, axis], lambda x, g=grid, c=cdf: np.interp(x, g, c))
        out[f"ks_u{axis}"] = ks.pvalue
    counts = np.bincount((u > 0) @ np.array([1, 2]), minlength=4)
    out["chi2_orthants"] = stats.chisquare(counts, _orthant_masses(rbm, tau) * len(u)).pvalue
    return out


@pytest.mark.parametrize("extended", [False, True], ids=["u", "extended"])
def test_mala_samples_pi_tau_exactly(extended):
    """4000 independent chains, one draw each, against quadrature of π_τ on a 2-unit model.

    Three tests at α = 1e-4 each: a correct sampler fails with probability < 3e-4, while an
    error of 0.04 in a marginal CDF (KS critical value at n = 4000: 0.034) or of ~0.03 in an
    orthant mass fails almost surely (see test_pi_tau_check_has_power).
    """
    rbm, tau, n = _two_unit_rbm(), 0.1, 4000
    sampler = backends.get_sampler("mala", tau=tau, burn_in=400, num_steps=20, extended=extended)
    out = sampler.sample(rbm, n, seed=11)
    p_values = _pi_tau_p_values(rbm, tau, out.info["u"].double().numpy())
    assert min(p_values.values()) > 1e-4, p_values
    assert 0 < out.info["acceptance"] <= 1


def test_pi_tau_check_has_power():
    """Unadjusted Langevin with Δt = 5τ² (steps of √(2Δt) ≈ 3τ jump over the kink) is
    biased, and the check above sees it; MALA with the same Δt, not adapted, is not."""
    rbm, tau, n = _two_unit_rbm(), 0.1, 4000
    options = {"tau": tau, "step_size": 5 * tau**2, "burn_in": 400, "num_steps": 20}
    biased = backends.get_sampler("langevin", **options).sample(rbm, n, seed=11)
    assert min(_pi_tau_p_values(rbm, tau, biased.info["u"].double().numpy()).values()) < 1e-6
    exact = backends.get_sampler("mala", adapt=False, **options).sample(rbm, n, seed=11)
    assert min(_pi_tau_p_values(rbm, tau, exact.info["u"].double().numpy()).values()) > 1e-4


# ----------------------------------------------------------------------- conformance


@pytest.mark.parametrize("options", [{}, {"extended": True}], ids=["u", "extended"])
def test_mala_conformance(options):
    report = run_conformance("mala", options=options, num_samples=20000)
    for row in report["distribution"]:
        assert row["tv"] <= row["tv_tolerance"]


def test_langevin_rounded_law_matches_rbm():
    """The full suite runs `langevin` (≈ 2.5 min: 45000 steps) in test_backends.py; here its
    default options on a smaller model: the same tolerance, the same statistics."""
    assert {"langevin", "mala"} <= set(backends.available())  # so test_backends checks them
    rbm = random_rbm(4, 3, seed=4)
    stats_ = check_distribution(lambda: backends.get_sampler("langevin"), rbm, 5000)
    assert stats_["tv"] <= stats_["tv_tolerance"]


# ------------------------------------------------------------- behaviour and options


def test_outputs_and_info():
    rbm = random_rbm(6, 4, seed=1)
    for name in ("langevin", "mala"):
        sampler = backends.get_sampler(name, burn_in=20, num_steps=5)
        assert sampler.binary is False
        out = sampler.sample(rbm, 50, seed=0)
        u = out.info["u"]
        assert torch.equal(out.visible, (u > 0).to(out.visible.dtype))
        assert torch.allclose(out.continuous, torch.sigmoid(u / sampler.options.tau))
        assert {"tau", "step_size", "num_steps"} <= set(out.info)
    out = backends.get_sampler("mala", burn_in=20, num_steps=5).sample(rbm, 50, seed=0)
    assert 0 < out.info["acceptance"] <= 1 and 0 < out.info["burn_in_acceptance"] <= 1


def test_step_size_adapts_during_burn_in_only():
    rbm = random_rbm(6, 4, seed=1)
    sampler = backends.get_sampler("mala", step_size=2.0, burn_in=200, num_steps=10)
    first = sampler.sample(rbm, 500, seed=0)
    adapted = first.info["step_size"]
    assert first.info["burned_in"] and adapted < 1.0  # 2.0 accepts far too rarely
    assert abs(first.info["burn_in_acceptance"] - 0.574) < 0.15
    for seed in (1, 2):
        later = sampler.sample(rbm, 500, seed=seed)
        assert not later.info["burned_in"] and later.info["step_size"] == adapted
    clone = backends.get_sampler("mala", step_size=2.0, burn_in=200, num_steps=10)
    clone.load_state_dict(sampler.state_dict())
    a, b = sampler.sample(rbm, 500), clone.sample(rbm, 500)
    assert torch.equal(a.info["u"], b.info["u"]) and b.info["step_size"] == adapted
    fixed = backends.get_sampler("mala", step_size=0.05, burn_in=50, adapt=False)
    assert fixed.sample(rbm, 100, seed=0).info["step_size"] == 0.05


def test_langevin_chains_persist():
    rbm = random_rbm(6, 4, seed=1)
    sampler = backends.get_sampler("langevin", burn_in=30, num_steps=5)
    first = sampler.sample(rbm, 64, seed=0)
    second = sampler.sample(rbm, 64)
    assert first.info["burned_in"] and not second.info["burned_in"]
    clone = backends.get_sampler("langevin", burn_in=30, num_steps=5)
    clone.load_state_dict(sampler.state_dict())
    assert torch.equal(sampler.sample(rbm, 64).info["u"], clone.sample(rbm, 64).info["u"])
    sampler.reset()
    assert sampler.sample(rbm, 64).info["burned_in"]


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("langevin", {"tau": 0.0}, "tau"),
        ("langevin", {"step_size": -1e-3}, "step_size"),
        ("langevin", {"num_steps": 0}, "num_steps"),
        ("langevin", {"burn_in": -1}, "burn_in"),
        ("langevin", {"num_chains": 0}, "num_chains"),
        ("langevin", {"dtype": "float16"}, "dtype"),
        ("langevin", {"persistent": "yes"}, "persistent"),
        ("langevin", {"num_threads": 0}, "num_threads"),
        ("mala", {"tau": float("nan")}, "tau"),
        ("mala", {"step_size": float("inf")}, "step_size"),
        ("mala", {"extended": 1}, "extended"),
        ("mala", {"precondition": -1.0}, "precondition"),
        ("mala", {"target_acceptance": 1.0}, "target_acceptance"),
        ("mala", {"adapt": None}, "adapt"),
        ("mala", {"device": "tpu"}, "device"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        backends.get_sampler(name, **options)
