"""SDE-VAE checks: the Girsanov path KL against closed forms on Ornstein–Uhlenbeck processes, the
ELBO against log p_N(x) computed on a grid for a 1-D latent, and the trainer-facing API."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import backends
from qvae import relax
from qvae.sde import SDEVAE, euler_maruyama, girsanov_path_kl, rbm_drift

D64 = torch.float64


# ------------------------------------------------------------------ 1. Girsanov on OU processes
def gaussian_kl(mq: torch.Tensor, cq: torch.Tensor, mp: torch.Tensor, cp: torch.Tensor) -> float:
    """KL(N(mq, cq) ‖ N(mp, cp)) for full covariances."""
    n, diff = len(mq), mp - mq
    solve = torch.linalg.solve(cp, torch.cat([cq, diff[:, None]], 1))
    logdet = torch.logdet(cp) - torch.logdet(cq)
    return float(0.5 * (torch.trace(solve[:, :n]) + diff @ solve[:, n] - n + logdet))


def test_constant_control_on_ou_is_exact_and_beats_marginal_kl():
    theta, horizon, n, c = 0.7, 1.5, 30, torch.tensor([0.4, -1.1, 0.25], dtype=D64)
    dt = horizon / n
    m0, v0 = 0.3, 0.5  # the same u_0 law N(m0, v0) under both
    u0 = m0 + math.sqrt(v0) * torch.randn(4000, 3, dtype=D64, generator=torch.Generator()
                                          .manual_seed(0))
    out = euler_maruyama(lambda u, t: -theta * u, u0, n, dt, torch.Generator().manual_seed(1),
                         control_fn=lambda u, t: c.expand_as(u))
    exact = 0.5 * float(c @ c) * horizon
    assert torch.allclose(out.path_kl, torch.full((4000,), exact, dtype=D64), atol=1e-12)
    assert float(girsanov_path_kl(c.expand(n, 3), dt)) == pytest.approx(exact, abs=1e-12)
    # discretised marginals at t_N: same variance, means apart by δ_N (δ_{k+1} = aδ_k + √2cΔt)
    a, delta, var = 1 - theta * dt, torch.zeros(3, dtype=D64), v0
    for _ in range(n):
        delta, var = a * delta + math.sqrt(2) * c * dt, a * a * var + 2 * dt
    marginal_kl = 0.5 * float(delta @ delta) / var
    assert 0 < marginal_kl < exact - 0.05  # data processing, strict for T > 0
    # the simulated u_N has the analytic posterior mean and variance (standard errors of 4000)
    end, mean_n = out.path[-1], m0 * a**n + delta
    assert torch.allclose(end.mean(0), mean_n, atol=4 * math.sqrt(var / 4000))
    var_n = torch.full((3,), var, dtype=D64)
    assert torch.allclose(end.var(0), var_n, rtol=4 * math.sqrt(2 / 4000))
    # continuous time: u_T marginals again Gaussian with equal variances
    decay = math.exp(-theta * horizon)
    var_t = v0 * decay**2 + (1 - decay**2) / theta
    delta_t = math.sqrt(2) * c * (1 - decay) / theta
    assert 0 < 0.5 * float(delta_t @ delta_t) / var_t < exact - 0.05
    # the stochastic part of the log-ratio has mean zero: its mean is the path KL up to MC error
    noise = out.log_ratio - out.path_kl  # = Σ √Δt c·ξ_k, sd = ‖c‖√T
    assert abs(float(noise.mean())) < 4 * math.sqrt(2 * exact / 4000)


def test_linear_control_path_kl_monte_carlo_matches_gaussian_path_kl():
    theta, a_ctl, horizon, n, m0, v0, reps = 1.0, 0.8, 1.0, 25, 0.5, 0.3, 20000
    dt = horizon / n
    rho_p, rho_q = 1 - theta * dt, 1 - theta * dt + math.sqrt(2) * a_ctl * dt
    # analytic discrete target Σ_k ½a²E_Q[u_k²]Δt with E u_{k+1}² = ρ_q² E u_k² + 2Δt
    second, analytic = m0**2 + v0, 0.0
    for _ in range(n):
        analytic += 0.5 * a_ctl**2 * second * dt
        second = rho_q**2 * second + 2 * dt
    # independent: KL between the (N+1)-dim Gaussian laws of (u_0..u_N) under Q and P
    def joint(rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        """u = M e, e = (u_0, η_0..η_{N-1}), η_j = √(2Δt)ξ_j: M[k, c] = ρ^(k−c) for k ≥ c."""
        k = torch.arange(n + 1, dtype=D64)
        lag = k[:, None] - k[None, :]
        m = torch.where(lag >= 0, rho ** lag.clamp(min=0), torch.zeros((), dtype=D64))
        cov_e = torch.diag(torch.tensor([v0] + [2 * dt] * n, dtype=D64))
        return m[:, 0] * m0, m @ cov_e @ m.T

    assert gaussian_kl(*joint(rho_q), *joint(rho_p)) == pytest.approx(analytic, rel=1e-9)
    gen = torch.Generator().manual_seed(2)
    u0 = m0 + math.sqrt(v0) * torch.randn(reps, 1, generator=gen, dtype=D64)
    out = euler_maruyama(lambda u, t: -theta * u, u0, n, dt, gen, lambda u, t: a_ctl * u)
    for est in (out.path_kl, out.log_ratio):  # both are unbiased for the path KL
        se = float(est.std()) / math.sqrt(reps)
        assert abs(float(est.mean()) - analytic) < 4 * se
    assert float(out.path_kl.std()) / math.sqrt(reps) < 0.01 * analytic
    # continuous time: θ' = θ − √2a, ∫½a²E u_t² dt; Euler bias is O(Δt) = 4 %
    tp = theta - math.sqrt(2) * a_ctl
    cont = 0.5 * a_ctl**2 * ((m0**2 + v0 - 1 / tp) * (1 - math.exp(-2 * tp * horizon)) / (2 * tp)
                             + horizon / tp)
    assert analytic == pytest.approx(cont, rel=0.04)


# ------------------------------------------------------------------ 2. ELBO ≤ log p_N(x) in 1-D
ALL_X = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=D64)


def tiny_model(seed: int = 0) -> SDEVAE:
    model = SDEVAE(3, 1, 1, encoder_hidden=[8], decoder_hidden=[8], control_hidden=[8],
                   num_steps=4, horizon=1.0, tau=0.5, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        model.prior.weight.fill_(2.5)
        model.prior.visible_bias.fill_(-1.0)
        model.prior.hidden_bias.fill_(0.5)
        model.decoder[-1].weight.mul_(6.0)  # p(x|v) depends strongly on v
        model.decoder[0].weight.mul_(3.0)
        last = model.control_out[-1][-1]
        last.weight.copy_(0.5 * torch.randn(last.weight.shape, generator=gen, dtype=D64))
    return model


@torch.no_grad()
def grid_log_px(model: SDEVAE, x: torch.Tensor) -> torch.Tensor:
    """log p_N(x): the discretised prior chain's density propagated on a grid, then integrated."""
    h, tau, dt = 0.02, model.tau, model.dt
    grid = torch.arange(-30.0, 30.0 + h / 2, h, dtype=D64)[:, None]
    with torch.enable_grad():  # drift from autograd of log π_τ: independent of the model's code
        g = grid.clone().requires_grad_(True)
        (drift,) = torch.autograd.grad(relax.log_density(model.prior, g, tau).sum(), g)
    dens = torch.exp(relax.log_logistic(grid[:, 0]))
    mean = (grid + dt * drift)[:, 0]
    kernel = torch.exp(-((grid[:, 0][None, :] - mean[:, None]) ** 2) / (4 * dt)) / math.sqrt(
        4 * math.pi * dt) * h
    for _ in range(model.num_steps):
        dens = dens @ kernel
    assert abs(float(dens.sum() * h) - 1) < 1e-9
    logits = model.decode(relax.to_visible(grid, tau))  # (G, 3)
    log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits[None].expand(len(x), -1, -1), x[:, None].expand(-1, len(grid), -1),
        reduction="none").sum(-1)
    return torch.logsumexp(log_lik + torch.log(dens * h), 1)


def test_elbo_below_grid_log_px_and_importance_weights_unbiased():
    model = tiny_model()
    log_px = grid_log_px(model, ALL_X)
    assert torch.allclose(torch.logsumexp(log_px, 0), torch.zeros((), dtype=D64), atol=1e-8)
    reps = 20000
    xr, xs = ALL_X.repeat_interleave(reps, 0), ALL_X.repeat_interleave(reps // 4, 0)
    elbo = model.elbo(xs, generator=torch.Generator().manual_seed(3)).view(8, -1)
    se = elbo.std(1) / math.sqrt(reps // 4)
    assert (elbo.mean(1) + 3 * se < log_px).all()  # a real gap, far beyond the MC error
    # K = 1 importance weights dP/dQ · p(x|u): E[w] = p_N(x) exactly (path log-ratio included)
    w = model.iw_bound(xr, num_samples=1, generator=torch.Generator().manual_seed(4)).exp()
    w = w.view(8, reps)
    rel_se = w.std(1) / w.mean(1) / math.sqrt(reps)
    assert (rel_se < 0.08).all()  # heavy-ish tails: the worst x has rel. se ≈ 0.05 here
    assert ((w.mean(1).log() - log_px).abs() < 4 * rel_se).all()
    # a better posterior (encoder + control trained, prior and decoder frozen) closes the gap
    gap_before = float((log_px - elbo.mean(1)).mean())
    trainable = [p for name, p in model.named_parameters()
                 if not name.startswith(("prior", "decoder"))]
    opt = torch.optim.Adam(trainable, lr=0.05)
    gen, xb = torch.Generator().manual_seed(5), ALL_X.repeat(16, 1)
    for _ in range(40):
        loss, _ = model.loss(xb, None, tau=model.tau, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.elbo(xs, generator=torch.Generator().manual_seed(6)).view(8, -1).mean(1)
    gap_after = float((log_px - after).mean())
    assert gap_after < 0.25 * gap_before  # ≈ 1.0 → 0.05 nats
    assert (after < log_px + 3 * se).all()


# ------------------------------------------------------------------ 3. the trainer-facing API
def small_model(seed: int = 0) -> SDEVAE:
    return SDEVAE(10, 4, 3, encoder_hidden=[16], decoder_hidden=[16], control_hidden=[16],
                  num_steps=5, rbm_init_std=0.5, seed=seed)


X10 = torch.bernoulli(torch.full((6, 10), 0.5), generator=torch.Generator().manual_seed(0))


def test_drift_matches_relax_gradient():
    rbm = small_model().prior
    u = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    got = rbm_drift(rbm, u, 0.3)
    ref = relax.grad_log_density(rbm, u.reshape(-1, 4), 0.3).reshape(u.shape)
    assert torch.allclose(got, ref, atol=1e-6)
    assert got.requires_grad  # differentiable in the RBM parameters


def test_loss_metrics_and_gradients_reach_every_part():
    model = small_model()
    _, m0 = model.loss(X10, None, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert m0["kl_path"] == 0.0  # the control starts at zero
    with torch.no_grad():
        for p in model.control_out.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    loss, m = model.loss(X10, torch.zeros(3, 7), tau=0.5, kl_weight=0.7,
                         generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss.dim() == 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name
    m = {k: float(v) for k, v in m.items()}  # metrics are 0-dim tensors: float() reads one
    assert m["loss"] == pytest.approx(-m["bound_minus_logz"], abs=1e-5)
    assert m["kl_minus_logz"] == pytest.approx(m["kl_initial"] + m["kl_path"], abs=1e-5)
    assert m["bound_minus_logz"] == pytest.approx(m["recon"] - 0.7 * m["kl_minus_logz"], abs=1e-4)
    assert m["elbo"] == pytest.approx(m["recon"] - m["kl_minus_logz"], abs=1e-5)
    assert m["kl_path"] > 0 and math.isfinite(m["positive_energy"])
    assert model.log_z_prior() is None  # no negative phase, no log Z
    xr = X10.repeat(200, 1)
    with torch.no_grad():
        b1, b8, b0 = (model.loss(xr, None, tau=0.5, generator=torch.Generator().manual_seed(3),
                                 **kw)[1] for kw in ({}, {"num_samples": 8}, {"kl_weight": 0.0}))
    assert b8["bound_minus_logz"] > b1["bound_minus_logz"] + 0.05  # IW bound is tighter
    assert b0["loss"] == pytest.approx(float(-b0["recon"]), abs=1e-5)


def test_pathwise_rbm_gradient_matches_finite_difference():
    model = small_model().double()
    with torch.no_grad():
        model.control_out[-1][-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    x = X10.double()

    def loss_at() -> torch.Tensor:
        return model.loss(x, None, tau=0.5, generator=torch.Generator().manual_seed(5))[0]

    model.zero_grad()
    loss_at().backward()
    for p in (model.prior.weight, model.prior.visible_bias, model.prior.hidden_bias):
        idx, eps = (0,) * p.dim(), 1e-6
        with torch.no_grad():
            p[idx] += eps
            up = float(loss_at())
            p[idx] -= 2 * eps
            down = float(loss_at())
            p[idx] += eps
        assert float(p.grad[idx]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_generate_prior_path_reproducibility_and_config():
    model = small_model()
    out = backends.get_sampler("exact").sample(model.prior, 16, seed=0)
    probs = model.generate(out.visible)
    assert probs.shape == (16, 10) and ((probs > 0) & (probs < 1)).all()
    assert torch.equal(model.generate(out.states), probs)
    u_t = model.sample_prior_path(32, torch.Generator().manual_seed(7))
    assert u_t.shape == (32, 4) and torch.isfinite(u_t).all()
    assert torch.equal(u_t, model.sample_prior_path(32, torch.Generator().manual_seed(7)))
    assert not torch.equal(u_t, model.sample_prior_path(32, torch.Generator().manual_seed(8)))
    assert model.generate(relax.round_visible(u_t)).shape == (32, 10)
    same = SDEVAE(**model.config_dict())
    same.load_state_dict(model.state_dict())
    a = model.loss(X10, None, tau=0.4, num_samples=3, generator=torch.Generator().manual_seed(9))
    b = same.loss(X10, None, tau=0.4, num_samples=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0])
    assert {k: v for k, v in a[1].items() if k != "negative_energy"} == \
        {k: v for k, v in b[1].items() if k != "negative_energy"}
    e1, e2 = (model.elbo(X10, num_samples=4, generator=torch.Generator().manual_seed(9))
              for _ in range(2))
    assert e1.shape == (6,) and torch.equal(e1, e2)
    iw = model.iw_bound(X10, num_samples=10, batch_chunk=4,
                        generator=torch.Generator().manual_seed(1))
    assert iw.shape == (6,) and torch.isfinite(iw).all()


@pytest.mark.parametrize("call", [
    lambda m: m.loss(torch.zeros(2, 9), None, tau=0.5),
    lambda m: m.loss(torch.full((2, 10), 2.0), None, tau=0.5),
    lambda m: m.loss(torch.full((2, 10), float("nan")), None, tau=0.5),
    lambda m: m.loss(X10, None, tau=0.0),
    lambda m: m.loss(X10, None, tau=float("inf")),
    lambda m: m.loss(X10, None, tau=0.5, kl_weight=-1.0),
    lambda m: m.loss(X10, None, tau=0.5, num_samples=0),
    lambda m: m.elbo(X10, num_samples=0),
    lambda m: m.iw_bound(X10, batch_chunk=0),
    lambda m: m.generate(torch.ones(2, 5)),
    lambda m: m.generate(torch.full((2, 4), 1.5)),
    lambda m: m.sample_prior_path(0),
    lambda m: SDEVAE(10, 4, 3, num_steps=0),
    lambda m: SDEVAE(10, 4, 3, horizon=-1.0),
    lambda m: SDEVAE(10, 4, 3, tau=0.0),
    lambda m: SDEVAE(10, 4, 3, activation="nope"),
    lambda m: SDEVAE(10, 4, 3, control_hidden=[0]),
    lambda m: euler_maruyama(lambda u, t: u, torch.zeros(2, 1), 3, 0.0),
])
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call(small_model())
