"""DVAE#'s power-function overlapping relaxation (`model.relaxation: power`, qvae.overlap).

Each piece is checked against a closed form or enumeration:
- samples: their mixture-CDF values are uniform (Kolmogorov–Smirnov at α ≈ 1e-3);
- the implicit gradient ∂ζ/∂q: against the derivative of the mixture's inverse CDF (bisection);
- the gradient estimator: its Monte Carlo mean against d/dq E[f(ζ)] in closed form (5 s.e.);
- the mixture density: against the CDF's derivative;
- mean field: exact for a prior without couplings, a bound on log Z̃(ζ) (enumerated) with them;
- the relaxed prior without couplings: exactly the posterior's mixture density at q = σ(b);
- training: a tiny model trained with it gains exact log-likelihood (enumeration).
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qvae import overlap
from qvae.boltzmann_graphs import multipartite
from qvae.config import ConfigError, load_config
from qvae.dvae import DVAE
from qvae.rbm import enumerate_states
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]


def mixture_cdf(q, lz, l1z, beta):
    """F(ζ) = (1-q) ζ^λ + q (1 - (1-ζ)^λ), from log ζ and log(1-ζ)."""
    lam = 1 / beta
    return (1 - q) * torch.exp(lam * lz) + q * (1 - torch.exp(lam * l1z))


@pytest.mark.parametrize("beta", [5.0, 40.0])
def test_samples_follow_the_mixture(beta):
    logits = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0], dtype=torch.float64)
    n = 20000
    lz, l1z = overlap.power_sample(logits, beta, n, torch.Generator().manual_seed(0))
    assert torch.allclose(lz.exp() + l1z.exp(), torch.ones_like(lz))
    u = mixture_cdf(torch.sigmoid(logits), lz.detach(), l1z.detach(), beta)  # (n, 5)
    u = u.sort(0).values
    grid = torch.arange(1, n + 1, dtype=torch.float64)[:, None] / n
    ks = torch.maximum((grid - u).abs(), (u - (grid - 1 / n)).abs()).max(0).values
    assert (ks < 1.95 / math.sqrt(n)).all(), ks  # α ≈ 1e-3 per unit
    # a sampler that ignored q (e.g. always z = 0) fails this check
    wrong = mixture_cdf(torch.full_like(logits, 0.5), lz.detach(), l1z.detach(), beta)
    wrong = wrong.sort(0).values
    assert ((grid - wrong).abs().max(0).values > 1.95 / math.sqrt(n)).any()


def solve_zeta(q, target, beta):
    """ζ with F(ζ; q) = target, by bisection in float64."""
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = mixture_cdf(q, torch.log(mid), torch.log1p(-mid), beta) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def test_implicit_gradient_is_the_inverse_cdf_derivative():
    beta = 4.0
    logits = torch.linspace(-2, 2, 9, dtype=torch.float64).repeat(40).requires_grad_()
    lz, l1z = overlap.power_sample(logits, beta, 1, torch.Generator().manual_seed(1))
    zeta = lz.exp()[0]
    (auto,) = torch.autograd.grad(zeta.sum(), logits, retain_graph=True)
    (auto_lz,) = torch.autograd.grad(lz.sum(), logits, retain_graph=True)
    (auto_l1z,) = torch.autograd.grad(l1z.sum(), logits)
    with torch.no_grad():
        q = torch.sigmoid(logits)
        target = mixture_cdf(q, lz[0], l1z[0], beta)  # the sample's mixture quantile
        keep = (zeta > 1e-6) & (zeta < 1 - 1e-6)  # where the bisection resolves ζ well
        eps = 1e-6
        up = solve_zeta(torch.sigmoid(logits + eps), target, beta)
        down = solve_zeta(torch.sigmoid(logits - eps), target, beta)
        numeric = (up - down) / (2 * eps)
        numeric_lz = (torch.log(up) - torch.log(down)) / (2 * eps)
        numeric_l1z = (torch.log1p(-up) - torch.log1p(-down)) / (2 * eps)
    assert keep.sum() > 200
    for a, b in ((auto, numeric), (auto_lz, numeric_lz), (auto_l1z, numeric_l1z)):
        assert torch.allclose(a[keep], b[keep], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [3.0, 40.0])
def test_gradient_estimator_is_unbiased(beta):
    """d/dq E[f(ζ)] = E[f | z=1] - E[f | z=0]; for f = ζ + ζ² it is closed-form in β. One logit
    per draw, so autograd gives each draw's gradient."""
    q0, n = 0.3, 400_000
    logit = torch.full((n,), math.log(q0 / (1 - q0)), dtype=torch.float64, requires_grad=True)
    lz, _ = overlap.power_sample(logit, beta, 1, torch.Generator().manual_seed(2))
    zeta = lz.exp()[0]
    (grads,) = torch.autograd.grad((zeta + zeta**2).sum(), logit)
    e0 = 1 / (beta + 1) + 1 / (2 * beta + 1)  # E[ρ^β + ρ^2β]
    e1 = (1 - 1 / (beta + 1)) + (1 - 2 / (beta + 1) + 1 / (2 * beta + 1))
    exact = (e1 - e0) * q0 * (1 - q0)  # dq/dlogit = q(1-q)
    se = float(grads.std()) / math.sqrt(n)
    assert abs(float(grads.mean()) - exact) < 5 * se, (float(grads.mean()), exact, se)
    assert abs(float(grads.mean()) - 1.1 * exact) > 5 * se  # the check can tell 10 % apart


def test_mixture_density_is_the_cdf_derivative():
    beta, logits = 10.0, torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    zeta = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)[:, None].expand(-1, 3)
    h = 1e-6
    q = torch.sigmoid(logits)
    def cdf(z):
        return mixture_cdf(q, torch.log(z), torch.log1p(-z), beta)
    numeric = (cdf(zeta + h) - cdf(zeta - h)) / (2 * h)
    dens = overlap.log_mixture_density(logits, torch.log(zeta), torch.log1p(-zeta), beta).exp()
    assert torch.allclose(dens, numeric, rtol=1e-5)


def augmented_log_z(energy_of, n, shift, const):
    """log Σ_z exp(-E(z) + shift·z + const) by enumeration, (N,)."""
    states = enumerate_states(n, 0, 2**n, shift.dtype)
    return torch.logsumexp(-energy_of(states)[None, :] + shift @ states.T, 1) + const


def relaxed_draw(m, n_rows, seed):
    logits = torch.randn(n_rows, m.n_latent, generator=torch.Generator().manual_seed(seed))
    lz, l1z = overlap.power_sample(logits, m.power_beta, 1, torch.Generator().manual_seed(seed))
    return lz[0].detach(), l1z[0].detach()


@pytest.mark.parametrize("prior", ["rbm", "multipartite"])
def test_mean_field_is_exact_without_couplings_and_a_bound_with_them(prior):
    kw = {}
    if prior == "multipartite":
        kw["prior"] = multipartite([2, 2, 2], density=1.0, scale=0.8, seed=3)
    m = DVAE(n_pixels=4, n_visible=3, n_hidden=3, encoder_hidden=[4], decoder_hidden=[4],
             relaxation="power", power_beta=8.0, rbm_init_std=0.8, seed=0, **kw)
    lz, l1z = relaxed_draw(m, 64, 5)
    shift, const = overlap.smoothing_terms(lz, l1z, m.power_beta)
    with torch.no_grad():
        exact = augmented_log_z(m.prior_energy, 6, shift, const)
        mf = -m.relaxed_prior_free_energy(lz, l1z)
    assert (mf <= exact + 1e-4).all()
    assert (exact - mf).max() > 1e-3  # with couplings mean field is not exact
    with torch.no_grad():  # no couplings: mean field is exact
        if prior == "rbm":
            m.prior.weight.zero_()
        else:
            m.prior.coupling.zero_()
        exact = augmented_log_z(m.prior_energy, 6, shift, const)
        mf = -m.relaxed_prior_free_energy(lz, l1z)
    assert torch.allclose(mf, exact, atol=1e-4)


def test_relaxed_prior_without_couplings_is_the_mixture_at_the_prior_marginals():
    """p(ζ) = Π_i [(1-p_i) r(ζ_i|0) + p_i r(ζ_i|1)] with p_i = σ(b_i) when J = 0: the prior
    (mean field) and the posterior (mixture) code agree."""
    m = DVAE(n_pixels=4, n_visible=3, n_hidden=2, encoder_hidden=[4], decoder_hidden=[4],
             relaxation="power", power_beta=30.0, seed=0)
    with torch.no_grad():
        m.prior.weight.zero_()
        m.prior.visible_bias.copy_(torch.tensor([-2.0, 0.5, 3.0]))
        m.prior.hidden_bias.copy_(torch.tensor([1.0, -0.7]))
        lz, l1z = relaxed_draw(m, 32, 7)
        log_p = -m.relaxed_prior_free_energy(lz, l1z) - m.prior.log_partition()
        bias = torch.cat([m.prior.visible_bias, m.prior.hidden_bias])
        mixture = overlap.log_mixture_density(bias, lz, l1z, m.power_beta).sum(-1)
    assert torch.allclose(log_p, mixture, atol=1e-3, rtol=1e-5)


def test_extreme_logits_give_finite_losses_and_gradients():
    m = DVAE(n_pixels=6, n_visible=4, n_hidden=4, encoder_hidden=[8], decoder_hidden=[8],
             groups=2, relaxation="power", power_beta=1000.0, seed=0)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.mul_(60)  # logits of ±hundreds: q rounds to 0 or 1
    x = torch.bernoulli(torch.full((64, 6), 0.5), generator=torch.Generator().manual_seed(0))
    loss, metrics = m.loss(x, torch.zeros(3, 8), tau=0.5, num_samples=3,
                           generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


N_PIX = 8
PATTERNS = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1],
                         [1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize("groups,num_iw", [(1, 1), (2, 4)])
def test_training_with_it_gains_exact_likelihood(groups, num_iw):
    """A wrong gradient (sign, missing implicit term, wrong prior density) does not learn these
    four patterns: exact log p(x) rises from about -5.5 to near the -log 4 optimum."""
    torch.manual_seed(0)
    m = DVAE(n_pixels=N_PIX, n_visible=3, n_hidden=3, encoder_hidden=[32], decoder_hidden=[32],
             groups=groups, relaxation="power", power_beta=20.0, seed=0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    states = enumerate_states(6, 0, 64, torch.float32)

    def exact_nll():
        return float(-m.exact_log_px(PATTERNS, float(m.prior.log_partition())).mean())
    before = exact_nll()
    for _ in range(600):
        with torch.no_grad():  # exact negative-phase samples: isolate the relaxation
            p = torch.softmax(-m.prior_energy(states), 0)
            neg = states[torch.multinomial(p, 64, replacement=True, generator=g)]
        x = PATTERNS[torch.randint(0, 4, (32,), generator=g)]
        loss, _ = m.loss(x, neg, tau=1.0, num_samples=num_iw, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = exact_nll()
    assert before > 5.0
    assert after < math.log(4) + 0.6, (before, after)


def test_configs_and_checkpoints_carry_it(tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml",
                      ["model.relaxation=power", "model.power_beta=25", "train.steps=4",
                       "train.sample_grid=0", "eval.num_iw=4", "eval.max_examples=20",
                       "backend.num_samples=10"])
    result = train(cfg, tmp_path / "run", progress=False)
    from qvae import checkpoint

    model, saved, _ = checkpoint.load_model(tmp_path / "run")
    assert (model.relaxation, model.power_beta) == ("power", 25.0)
    assert saved.model.relaxation == "power"
    assert math.isfinite(result.evaluation["nll"])
    for bad, field in (
        (["model.relaxation=overlap"], "model.relaxation"),
        (["model.power_beta=0.5"], "model.power_beta"),
        (["model.relaxation=power", "data.dataset=mnist-labelled",
          "model.conditional.label_units=10"], "model.relaxation"),
        (["model.kind=sde", "model.relaxation=power"], "model.relaxation"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(ROOT / "configs/smoke.yaml", bad)


def test_gumbolt_default_is_unchanged():
    """The default relaxation draws and scores exactly what the GumBolt path always did."""
    m = DVAE(n_pixels=N_PIX, n_visible=3, n_hidden=3, encoder_hidden=[8], decoder_hidden=[8],
             groups=2, seed=0)
    assert m.relaxation == "gumbolt" and m.config_dict()["relaxation"] == "gumbolt"
    x = PATTERNS
    loss, metrics = m.loss(x, torch.zeros(2, 6), tau=0.5, generator=torch.Generator()
                           .manual_seed(0))
    logits, zeta = m.posterior(x, 1, tau=0.5, generator=torch.Generator().manual_seed(0))
    log_px = -F.binary_cross_entropy_with_logits(m.decode(zeta), x[None], reduction="none").sum(-1)
    energy = m.prior_energy(zeta)
    log_q = (zeta * F.logsigmoid(logits) + (1 - zeta) * F.logsigmoid(-logits)).sum(-1)
    assert torch.allclose(metrics["bound_minus_logz"], (log_px - energy - log_q).mean())


def test_divergence_message_names_the_power_relaxation_knob(tmp_path):
    from qvae.train import _diverged_message

    cfg = load_config(ROOT / "configs/smoke.yaml", ["model.relaxation=power"])
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    text = _diverged_message(cfg, 7, "the loss", opt, None, tmp_path / "last.pt", tau=0.5)
    assert "model.power_beta = 40" in text and "τ" not in text
    gumbolt = _diverged_message(load_config(ROOT / "configs/smoke.yaml"), 7, "the loss", opt,
                                None, tmp_path / "last.pt", tau=0.5)
    assert "τ = 0.5" in gumbolt


@pytest.mark.parametrize("groups", [1, 3])
def test_relaxed_bound_tends_to_the_discrete_elbo_as_beta_grows(groups):
    """At β = 1000, ζ is within e^-(1000·|log ρ|) of z and mean field is pinned, so the relaxed
    bound (with the mean-field prior) is the discrete ELBO, computed here by enumeration."""
    m = DVAE(n_pixels=12, n_visible=3, n_hidden=3, encoder_hidden=[16], decoder_hidden=[16],
             groups=groups, rbm_init_std=1.0, relaxation="power", power_beta=1000.0, seed=0)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.mul_(2)
    m.eval()
    x = torch.bernoulli(torch.full((8, 12), 0.5), generator=torch.Generator().manual_seed(1))
    states = enumerate_states(6, 0, 64, torch.float32)
    log_z = float(m.prior.log_partition())
    with torch.no_grad():
        log_q = m.log_posterior(x, states[:, None, :].expand(-1, 8, -1))  # (64, B)
        log_px = -F.binary_cross_entropy_with_logits(
            m.decode(states)[:, None, :].expand(-1, 8, -1), x.expand(64, -1, -1),
            reduction="none").sum(-1)
        log_joint = log_px - m.prior_energy(states)[:, None] - log_z
        elbo = float((log_q.exp() * (log_joint - log_q)).sum(0).mean())
        _, metrics = m.loss(x.repeat(2000, 1), torch.zeros(2, 6), tau=1.0,
                            generator=torch.Generator().manual_seed(3))
    relaxed = float(metrics["bound_minus_logz"]) - log_z
    # per-example sd of the bound is < 5 nats; the mean of 16,000 draws has se < 0.04
    assert relaxed == pytest.approx(elbo, abs=0.16)
