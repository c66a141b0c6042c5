"""DVAE objective and evaluation checks on a model small enough to enumerate every latent state."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from qvae.dvae import DVAE

NP, NV, NH = 8, 3, 2
N = NV + NH
ALL_Z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N)))
ALL_X = torch.tensor(list(itertools.product([0.0, 1.0], repeat=NP)))


def make_model(seed: int = 0) -> DVAE:
    """Tiny model (default layer init) with a strongly coupled random prior."""
    model = DVAE(NP, NV, NH, encoder_hidden=[16], decoder_hidden=[16], rbm_init_std=0.5, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.prior.visible_bias.copy_(torch.randn(NV, generator=gen) * 0.5)
        model.prior.hidden_bias.copy_(torch.randn(NH, generator=gen) * 0.5)
    return model


def brute_energy(model: DVAE, z: tuple[float, ...]) -> torch.Tensor:
    """E(z) written out with explicit loops (autograd-capable)."""
    w, b, c = model.prior.weight, model.prior.visible_bias, model.prior.hidden_bias
    v, h = z[:NV], z[NV:]
    e = -sum(b[i] * v[i] for i in range(NV)) - sum(c[j] * h[j] for j in range(NH))
    return e - sum(w[i, j] * v[i] * h[j] for i in range(NV) for j in range(NH))


def brute_log_z(model: DVAE) -> torch.Tensor:
    """log Z with autograd, by logsumexp over all 2^n states of -E."""
    states = itertools.product([0.0, 1.0], repeat=N)
    return torch.logsumexp(torch.stack([-brute_energy(model, z) for z in states]), 0)


def exact_elbo(model: DVAE, x: torch.Tensor, log_z: float) -> torch.Tensor:
    """Σ_z q(z|x) [log p(x|z) - E(z) - log q(z|x)] - log Z, by enumeration, shape (B,)."""
    with torch.no_grad():
        q = torch.sigmoid(model.encode(x))  # (B, n)
        log_q = (ALL_Z * q[:, None].log() + (1 - ALL_Z) * (1 - q[:, None]).log()).sum(-1)
        p = torch.sigmoid(model.decode(ALL_Z))  # (2^n, P)
        log_px = (x[:, None] * p.log() + (1 - x[:, None]) * (1 - p).log()).sum(-1)
        w = log_px - model.prior_energy(ALL_Z) - log_q
        return (log_q.exp() * w).sum(1) - log_z


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = make_model()
    x = ALL_X[torch.tensor([0, 37, 100, 200, 255])]
    return model, x, float(model.prior.log_partition())


def test_exact_log_px_matches_brute_force(setup):
    model, x, log_z = setup
    with torch.no_grad():
        lz = float(brute_log_z(model))
        assert lz == pytest.approx(log_z, abs=1e-5)
        expected = []
        for xb in x:
            total = 0.0
            for z in itertools.product([0.0, 1.0], repeat=N):
                probs = torch.sigmoid(model.decoder(torch.tensor(z)))
                terms = zip(probs.tolist(), xb.tolist(), strict=True)
                lik = math.prod(p if xi else 1 - p for p, xi in terms)
                total += lik * math.exp(-float(brute_energy(model, z)))
            expected.append(math.log(total) - lz)
    got = model.exact_log_px(x, log_z)
    assert got.shape == (len(x),)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    # p(x) is a distribution over all 2^8 images
    assert float(torch.logsumexp(model.exact_log_px(ALL_X, log_z, chunk=7), 0)) == pytest.approx(
        0.0, abs=1e-4
    )


def test_exact_log_px_refuses_large_latent():
    model = DVAE(4, 11, 10, encoder_hidden=[4], decoder_hidden=[4], seed=0)
    with pytest.raises(ValueError, match="2\\^21"):
        model.exact_log_px(torch.zeros(1, 4), 0.0)


def test_discrete_elbo_is_a_lower_bound_and_unbiased(setup):
    model, x, log_z = setup
    reps = 4000
    samples = model.discrete_elbo(
        x.repeat_interleave(reps, 0), log_z, generator=torch.Generator().manual_seed(1)
    ).view(len(x), reps)
    mean, se = samples.mean(1), samples.std(1) / math.sqrt(reps)
    exact = model.exact_log_px(x, log_z)
    truth = exact_elbo(model, x, log_z)
    assert torch.all((mean - truth).abs() < 4 * se + 1e-4), (mean, truth, se)
    assert torch.all(truth <= exact + 1e-5)
    assert torch.all(mean + 4 * se < exact)
    assert float((exact - truth).mean()) > 0.1  # the check has teeth: a real gap
    averaged = model.discrete_elbo(x, log_z, 2000, generator=torch.Generator().manual_seed(2))
    assert torch.all((averaged - truth).abs() < 0.15)


def test_iw_bound_rises_to_exact(setup):
    model, x, log_z = setup
    gen = torch.Generator().manual_seed(3)
    exact = model.exact_log_px(x, log_z)
    xr = x.repeat(20, 1)
    means = {k: float(model.iw_bound(xr, log_z, k, batch_chunk=37, generator=gen).mean())
             for k in (1, 10, 1000)}
    assert means[1] < means[10] < means[1000] <= float(exact.mean()) + 0.01
    assert means[10] - means[1] > 0.05
    k5000 = model.iw_bound(x, log_z, 5000, batch_chunk=1000, generator=gen)
    assert torch.all((k5000 - exact).abs() < 0.05), (k5000, exact)


def exact_multiset(model: DVAE, m: int) -> torch.Tensor:
    """M states whose counts follow p(z) exactly up to 1/M (largest-remainder rounding)."""
    with torch.no_grad():
        p = torch.softmax(-model.prior_energy(ALL_Z).double(), 0)
    counts = torch.floor(p * m).long()
    rest = m - int(counts.sum())
    counts[torch.argsort(p * m - counts, descending=True)[:rest]] += 1
    return ALL_Z.repeat_interleave(counts, 0)


def prior_grads(model: DVAE) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.prior.parameters()]


def test_negative_phase_gradient_is_grad_log_z(setup):
    model, x, _ = setup
    m = 2**17  # multiset error per state < 1/M, so each gradient entry is off by < 2^5/M ≈ 2.4e-4
    negative, z0 = exact_multiset(model, m), ALL_Z[7:8]
    grads = []
    for neg in (negative, z0):
        model.zero_grad()
        model.loss(x, neg, tau=0.5, generator=torch.Generator().manual_seed(4))[0].backward()
        grads.append(prior_grads(model))
    model.zero_grad()
    brute_log_z(model).backward()
    grad_log_z = prior_grads(model)
    model.zero_grad()
    model.prior_energy(z0).sum().backward()
    grad_e0 = prior_grads(model)
    # loss(neg) - loss(z0) differs only in the negative term: -mean E(neg) + E(z0)
    for g_neg, g_0, g_lz, g_e in zip(*grads, grad_log_z, grad_e0, strict=True):
        assert torch.allclose(g_neg - g_0, g_lz + g_e, atol=1e-3), (g_neg - g_0 - g_e, g_lz)
    assert max(float(g.abs().max()) for g in grad_log_z) > 0.05


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_loss_gradient_is_minus_relaxed_bound(setup, kl_weight):
    """With exact negatives, ∇loss = -∇(E_L[log p(x|ζ) - β(E(ζ) + log q̃)] - β log Z)."""
    model, x, _ = setup
    tau, k = 0.7, 1
    model.zero_grad()
    loss, metrics = model.loss(x, exact_multiset(model, 2**17), tau=tau, kl_weight=kl_weight,
                               generator=torch.Generator().manual_seed(5))
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alpha = model.encoder(x)
    zeta = model.relaxed_sample(alpha, tau, k, generator=torch.Generator().manual_seed(5))[0]
    pix = torch.sigmoid(model.decoder(zeta))
    recon = (x * pix.log() + (1 - x) * (1 - pix).log()).sum(1)
    q = torch.sigmoid(alpha)
    log_q = (zeta * q.log() + (1 - zeta) * (1 - q).log()).sum(1)
    energy = torch.stack([brute_energy(model, tuple(z)) for z in zeta])
    bound = (recon - kl_weight * (energy + log_q)).mean()
    (-(bound - kl_weight * brute_log_z(model))).backward()
    for (name, p), g in zip(model.named_parameters(), got, strict=True):
        assert torch.allclose(g, p.grad, atol=1e-3, rtol=1e-3), name
    assert metrics["bound_minus_logz"] == pytest.approx(float(bound.detach()), abs=1e-4)
    assert metrics["recon"] == pytest.approx(float(recon.detach().mean()), abs=1e-4)
    kl = float((energy + log_q).detach().mean())
    assert metrics["kl_minus_logz"] == pytest.approx(kl, abs=1e-4)
    assert metrics["positive_energy"] == pytest.approx(float(energy.detach().mean()), abs=1e-4)


def test_relaxed_bound_at_small_tau_matches_discrete_elbo(setup):
    model, x, log_z = setup
    reps = 4000
    xr = x.repeat_interleave(reps, 0)
    truth = exact_elbo(model, x, log_z)
    per_sample = model.discrete_elbo(xr, log_z, generator=torch.Generator().manual_seed(6))
    se = float(per_sample.view(len(x), reps).std(1).mean()) / math.sqrt(reps * len(x))
    with torch.no_grad():
        _, m = model.loss(xr, ALL_Z[:1], tau=0.01, generator=torch.Generator().manual_seed(7))
        _, m_hot = model.loss(xr, ALL_Z[:1], tau=2.0, generator=torch.Generator().manual_seed(7))
    assert m["bound_minus_logz"] - log_z == pytest.approx(float(truth.mean()), abs=5 * se + 0.01)
    # a sign slip in any term (E, log q̃, log p) moves the bound by nats, far beyond 5 se
    assert se < 0.01


def test_loss_trains_all_parts_and_importance_weighting(setup):
    model, x, _ = setup
    neg = torch.bernoulli(torch.full((64, N), 0.5), generator=torch.Generator().manual_seed(8))
    for k in (1, 4):
        model.zero_grad()
        loss, metrics = model.loss(x, neg, tau=0.5, num_samples=k,
                                   generator=torch.Generator().manual_seed(9))
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        for part in (model.encoder, model.decoder, model.prior):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert metrics["loss"] == pytest.approx(  # metrics are 0-dim tensors: float() reads one
            float(-metrics["bound_minus_logz"] - metrics["negative_energy"]), abs=1e-4)
    xr = x.repeat(400, 1)
    with torch.no_grad():
        b1 = model.loss(xr, neg, tau=0.5, generator=torch.Generator().manual_seed(10))[1]
        b8 = model.loss(xr, neg, tau=0.5, num_samples=8,
                        generator=torch.Generator().manual_seed(10))[1]
        b0 = model.loss(xr, neg, tau=0.5, kl_weight=0.0,
                        generator=torch.Generator().manual_seed(10))[1]
    assert b8["bound_minus_logz"] > b1["bound_minus_logz"] + 0.05  # IW bound is tighter
    assert b0["loss"] == pytest.approx(float(-b0["recon"]), abs=1e-5)


def test_prior_energy_any_shape(setup):
    model, _, _ = setup
    z = ALL_Z[:12].view(3, 4, N)
    e = model.prior_energy(z)
    assert e.shape == (3, 4)
    direct = model.prior.energy(ALL_Z[:12, :NV], ALL_Z[:12, NV:]).view(3, 4)
    assert torch.allclose(e, direct)
    assert torch.allclose(e[1, 2], brute_energy(model, tuple(z[1, 2])))


def test_bad_inputs_raise(setup):
    model, x, log_z = setup
    neg = ALL_Z[:4]
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    bad = [
        lambda: model.loss(torch.zeros(2, NP + 1), neg, tau=0.5),
        lambda: model.loss(nan_x, neg, tau=0.5),
        lambda: model.loss(x * 3, neg, tau=0.5),
        lambda: model.loss(x, torch.full((4, N), float("nan")), tau=0.5),
        lambda: model.loss(x, ALL_Z[:4, :NV], tau=0.5),
        lambda: model.loss(x, neg, tau=0.0),
        lambda: model.loss(x, neg, tau=0.5, num_samples=0),
        lambda: model.loss(x, neg, tau=0.5, kl_weight=float("nan")),
        lambda: model.discrete_elbo(torch.zeros(2, NP - 1), log_z),
        lambda: model.iw_bound(nan_x, log_z),
        lambda: model.exact_log_px(torch.zeros(NP), log_z),
        lambda: DVAE(NP, NV, NH, activation="swishy"),
        lambda: DVAE(NP, NV, NH, pixel_mean=torch.zeros(NP + 1)),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")


def test_config_roundtrip_seed_and_pixel_mean():
    mask = (torch.rand(NV, NH, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    mean = torch.linspace(0.0, 1.0, NP)
    model = DVAE(NP, NV, NH, encoder_hidden=[16, 8], rbm_mask=mask, pixel_mean=mean, seed=3)
    bias = model.decoder[-1].bias
    assert torch.allclose(bias, torch.logit(mean.clamp(1e-3, 1 - 1e-3)))
    cfg = json.loads(json.dumps(model.config_dict()))
    clone = DVAE(**cfg)
    clone.load_state_dict(model.state_dict())
    z = ALL_Z[:6]
    assert torch.equal(clone.generate(z), model.generate(z))
    assert torch.equal(clone.prior.mask, mask)
    same = DVAE(NP, NV, NH, encoder_hidden=[16, 8], rbm_mask=mask, seed=3)
    assert torch.equal(same.encoder[0].weight, model.encoder[0].weight)
    assert torch.equal(same.prior.weight, model.prior.weight)
    default = DVAE()
    sizes = [m.out_features for m in default.encoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 200] and default.n_latent == 200


def test_relaxed_sample_is_concrete_distribution(setup):
    """τ·logit(ζ) - α must be standard Logistic noise (checks noise and temperature)."""
    model, _, _ = setup
    alpha = torch.tensor([[-2.0, -0.5, 0.0, 0.7, 3.0]], dtype=torch.float64)  # no saturation
    tau = 0.6
    zeta = model.relaxed_sample(alpha, tau, 20000, generator=torch.Generator().manual_seed(11))
    assert zeta.shape == (20000, 1, N) and bool(((zeta > 0) & (zeta < 1)).all())
    noise = (tau * torch.logit(zeta) - alpha).flatten().sort().values
    cdf = torch.sigmoid(noise)  # Logistic(0, 1) CDF at the sorted noise
    ecdf = torch.arange(1, noise.numel() + 1, dtype=torch.float64) / noise.numel()
    assert float((cdf - ecdf).abs().max()) < 1.63 / math.sqrt(noise.numel())  # KS, p ≈ 0.01
    assert abs(float(noise.var()) - math.pi**2 / 3) < 0.1
    frac_on = (zeta > 0.5).double().mean(0)
    assert torch.allclose(frac_on, torch.sigmoid(alpha), atol=0.015)
