"""Hierarchical posteriors q(z|x) = Π_g q(z_g | x, z_<g) checked against enumeration, and the
DVAE reference recipe's options (batch norm, weight decay, piecewise lr, KL warm-up fraction,
validation-based checkpoint selection).

The models are small enough (6 latent units, 12 pixels) to enumerate all 64 latent states, so
log p(x), the discrete ELBO and q(z|x) itself are exact. Monte Carlo estimates are compared with
them at 4 standard errors of the estimate (a false alarm about 1 in 16,000 per comparison).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qvae import checkpoint
from qvae.config import ConfigError, load_config
from qvae.dvae import DVAE
from qvae.networks import l2_penalty
from qvae.rbm import enumerate_states
from qvae.relax import sample_logistic
from qvae.train import BEST_NAME, kl_weight_at, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]
N_LATENT, N_PIXELS, BATCH = 6, 12, 8
STATES = enumerate_states(N_LATENT, 0, 2**N_LATENT, torch.float32)  # (64, 6)


def model(groups=2, batch_norm=False, seed=0):
    """A small DVAE whose posterior is far from the true one (so bounds are visibly apart)."""
    m = DVAE(n_pixels=N_PIXELS, n_visible=3, n_hidden=3, encoder_hidden=[16],
             decoder_hidden=[16], groups=groups, batch_norm=batch_norm, rbm_init_std=1.0,
             seed=seed)
    with torch.no_grad():  # sharper networks than the default init: larger bound gaps
        for p in m.decoder.parameters():
            p.mul_(3)
        for p in m.encoder.parameters():
            p.mul_(2)
    if batch_norm:  # non-trivial running statistics: a few training-mode passes
        m.train()
        for i in range(3):
            m.loss(data(seed=10 + i), torch.zeros(4, N_LATENT), tau=0.5)
    return m.eval()


def data(seed=1, n=BATCH):
    return torch.bernoulli(torch.full((n, N_PIXELS), 0.5), generator=torch.Generator()
                           .manual_seed(seed))


def exact_terms(m, x):
    """log q(z|x) and log p(x, z) for all 64 states z: each (64, B)."""
    log_z = float(m.prior.log_partition())
    with torch.no_grad():
        log_q = m.log_posterior(x, STATES[:, None, :].expand(-1, len(x), -1))
        logits = m.decode(STATES)[:, None, :].expand(-1, len(x), -1)
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, x.expand(len(STATES), *x.shape), reduction="none").sum(-1)
        log_joint = log_px_z - m.prior_energy(STATES)[:, None] - log_z
    return log_q, log_joint, log_z


def repeated(fn, reps):
    """Mean over examples of `reps` independent draws of fn(generator): (mean, stderr)."""
    g = torch.Generator().manual_seed(123)
    values = torch.stack([fn(g).double().mean() for _ in range(reps)])
    return float(values.mean()), float(values.std() / math.sqrt(reps))


@pytest.mark.parametrize("groups,batch_norm", [(1, False), (2, False), (3, False), (2, True),
                                               (6, True)])
def test_hierarchical_posterior_normalises(groups, batch_norm):
    m, x = model(groups, batch_norm), data()
    log_q, _, _ = exact_terms(m, x)
    assert torch.allclose(torch.logsumexp(log_q, 0), torch.zeros(BATCH), atol=1e-5)


@pytest.mark.parametrize("groups", [2, 3])
def test_posterior_samples_follow_the_posterior_they_score(groups):
    """The hard samples that the IW bound draws have the law log_posterior scores (TV test)."""
    m, x = model(groups), data()[:1]
    n = 20_000
    _, z = m.posterior(x, n, generator=torch.Generator().manual_seed(7))
    index = (z[:, 0, :] * 2 ** torch.arange(N_LATENT)).sum(-1).long()  # unit i is bit i
    empirical = torch.bincount(index, minlength=64).double() / n
    exact = m.log_posterior(x, STATES[:, None, :]).exp()[:, 0].double()
    tv = 0.5 * float((empirical - exact).abs().sum())
    # E[TV] <= ½ Σ sqrt(p(1-p)/n) <= ½ sqrt(64/n) = 0.028; 0.06 is > 4 sd above it
    assert tv < 0.06, tv


@pytest.mark.parametrize("groups", [2, 3])
def test_bounds_order_against_exact_log_px(groups):
    """discrete ELBO <= IW_K <= exact log p(x), IW rising with K, IW_K -> log p(x)."""
    m, x = model(groups), data()
    log_q, log_joint, log_z = exact_terms(m, x)
    exact = float(m.exact_log_px(x, log_z).double().mean())
    elbo_exact = float((log_q.exp() * (log_joint - log_q)).sum(0).double().mean())
    assert elbo_exact < exact - 0.5  # a visible gap, so the orderings below mean something
    assert exact == pytest.approx(float(torch.logsumexp(log_joint, 0).mean()), abs=1e-4)

    elbo_mc, elbo_se = repeated(lambda g: m.discrete_elbo(x, log_z, num_samples=50,
                                                          generator=g), 40)
    assert abs(elbo_mc - elbo_exact) < 4 * elbo_se + 1e-6, (elbo_mc, elbo_exact, elbo_se)

    iw = {k: repeated(lambda g, k=k: m.iw_bound(x, log_z, num_samples=k, generator=g), 60)
          for k in (1, 10, 100)}
    assert abs(iw[1][0] - elbo_exact) < 4 * iw[1][1]  # IW_1 is the ELBO in expectation
    for k, (mean, se) in iw.items():
        assert mean <= exact + 4 * se, (k, mean, exact)
        assert mean >= elbo_exact - 4 * se, (k, mean, elbo_exact)
    for lo, hi in ((1, 10), (10, 100)):
        assert iw[hi][0] - iw[lo][0] > 4 * math.hypot(iw[hi][1], iw[lo][1]), iw
    big, big_se = repeated(lambda g: m.iw_bound(x, log_z, num_samples=5000, generator=g), 4)
    assert exact - 0.05 < big <= exact + 4 * big_se


def test_relaxed_bound_tends_to_discrete_elbo_as_tau_falls():
    """The training path (relaxed samples fed to later groups) at small τ is the discrete ELBO."""
    m, x = model(3), data()
    log_q, log_joint, log_z = exact_terms(m, x)
    elbo_exact = (log_q.exp() * (log_joint - log_q)).sum(0)
    reps = 2000
    xs = x.repeat(reps, 1)
    _, metrics = m.loss(xs, torch.zeros(2, N_LATENT), tau=1e-3,
                        generator=torch.Generator().manual_seed(3))
    relaxed = metrics["bound_minus_logz"] - log_z
    # per-example sd of the bound is < 5 nats here; the mean of 16,000 draws has se < 0.04
    assert relaxed == pytest.approx(float(elbo_exact.mean()), abs=0.16)


def test_training_gradient_reaches_every_group_network():
    m = model(3).train()
    loss, _ = m.loss(data(), torch.bernoulli(torch.full((20, N_LATENT), 0.5)), tau=0.5)
    loss.backward()
    for g, net in enumerate(m.encoder):
        assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0, g
    # group 1's input layer sees group 0's relaxed sample: its weights on z_0 get a gradient
    assert m.encoder[1][0].weight.grad[:, N_PIXELS:].abs().sum() > 0


def test_importance_weighted_training_bound_is_above_k1():
    """train.num_iw = K > 1 (already in DVAE.loss): its bound is >= the k = 1 bound on average."""
    m, x = model(2).train(), data()
    neg = torch.zeros(2, N_LATENT)

    def bound(k, g):
        return torch.as_tensor(m.loss(x, neg, tau=0.5, num_samples=k, generator=g)[1]
                               ["bound_minus_logz"]).detach().clone()
    one, one_se = repeated(lambda g: bound(1, g), 200)
    many, many_se = repeated(lambda g: bound(20, g), 200)
    assert many - one > 4 * math.hypot(one_se, many_se), (one, many)


def test_default_model_is_the_factorial_one_as_before():
    """groups = 1: one encoder network under the old state-dict keys, drawing z = 1[α + L > 0]
    (hard) and σ((α + L)/τ) (relaxed) from one Logistic draw of shape (S, B, n), as before."""
    m, x = DVAE(n_pixels=N_PIXELS, n_visible=3, n_hidden=3, encoder_hidden=[16],
                decoder_hidden=[16], seed=0), data()
    assert [k for k in m.state_dict() if k.startswith("encoder")] == [
        "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias"]
    noise = sample_logistic((5, BATCH, N_LATENT), torch.Generator().manual_seed(1))
    logits, z = m.posterior(x, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, (m.encoder(x) + noise > 0).float())
    _, zeta = m.posterior(x, 5, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(zeta, torch.sigmoid((m.encoder(x) + noise) / 0.5))


def test_checkpoint_args_rebuild_a_hierarchical_batchnorm_model():
    m, x = model(3, batch_norm=True), data()
    again = DVAE(**m.config_dict())
    again.load_state_dict(m.state_dict())
    again.eval()
    a = m.iw_bound(x, 0.0, num_samples=20, generator=torch.Generator().manual_seed(1))
    b = again.iw_bound(x, 0.0, num_samples=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_evaluation_uses_running_statistics_whatever_the_mode():
    """Bounds are per-example (batch norm's running statistics) even when called in training
    mode, e.g. by validation inside the training loop; the caller's mode is restored."""
    m, x = model(2, batch_norm=True), data()
    g = torch.Generator().manual_seed
    in_eval = m.iw_bound(x, 0.0, num_samples=10, generator=g(2))
    m.train()
    in_train = m.iw_bound(x, 0.0, num_samples=10, generator=g(2))
    assert torch.equal(in_eval, in_train) and m.training
    batch_stats = m.decoder(STATES[:8])  # what training mode would have used instead
    m.eval()
    assert not torch.allclose(batch_stats, m.decoder(STATES[:8]), atol=1e-3)


def test_l2_penalty_covers_weights_gammas_and_rbm_not_biases():
    m = model(2, batch_norm=True)
    expect = 0.0
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.BatchNorm1d)):
            expect += float(mod.weight.detach().pow(2).sum())
    expect += float(m.prior.weight.detach().pow(2).sum())
    assert float(l2_penalty(m).detach()) == pytest.approx(0.5 * expect, rel=1e-5)


def test_bad_group_counts_fail_clearly():
    with pytest.raises(ValueError, match="groups must divide"):
        DVAE(n_pixels=4, n_visible=3, n_hidden=2, groups=2)
    with pytest.raises(ConfigError, match="model.groups=3 must divide"):
        load_config(None, ["model.groups=3"])
    with pytest.raises(ConfigError, match="kind=dvae only"):
        load_config(None, ["model.kind=sde", "model.batch_norm=true"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["train.kl_warmup_steps=10", "train.kl_warmup_fraction=0.3"])
    with pytest.raises(ValueError, match="posterior"):
        DVAE(n_pixels=4, n_visible=2, n_hidden=2, groups=2).encode(torch.zeros(1, 4))


def test_piecewise_schedule_and_warmup_fraction_match_the_reference():
    cfg = load_config(None, ["train.steps=1000", "train.lr_schedule=piecewise",
                             "train.kl_warmup_fraction=0.3"])
    lr = {s: lr_factor(cfg, s) for s in (0, 20, 21, 600, 601, 750, 751, 950, 951, 999)}
    assert lr == {0: 0.1, 20: 0.1, 21: 1.0, 600: 1.0, 601: 1 / 3, 750: 1 / 3, 751: 0.1,
                  950: 0.1, 951: 1 / 33, 999: 1 / 33}
    assert kl_weight_at(cfg, 149) == pytest.approx(0.5)
    assert kl_weight_at(cfg, 299) == 1.0 and kl_weight_at(cfg, 900) == 1.0
    default = load_config(None)
    assert (default.model.groups, default.model.batch_norm, default.train.weight_decay,
            default.train.adam_eps, default.train.validate_every) == (1, False, 0.0, 1e-8, 0)


TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "model.groups=4", "model.batch_norm=true",
    "data.batch_size=50", "backend.num_samples=50", "backend.options={num_sweeps: 2, burn_in: 20}",
    "train.log_every=5", "train.checkpoint_every=10", "train.sample_grid=4",
    "train.weight_decay=1e-4", "train.adam_eps=1e-3", "train.lr_schedule=piecewise",
    "train.kl_warmup_fraction=0.3", "train.validate_every=6", "train.validate_examples=40",
    "train.validate_num_iw=5", "eval.num_iw=10", "eval.max_examples=50",
]


def test_recipe_trains_selects_on_validation_and_resumes_exactly(tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", [*TINY, "train.steps=24"])
    full, part = tmp_path / "full", tmp_path / "part"
    res_full = train(cfg, full, progress=False)

    def interrupt(step, _):
        if step == 13:
            raise KeyboardInterrupt

    train(cfg, part, progress=False, callback=interrupt)
    assert checkpoint.load(part)["best_valid"]["step"] in (6, 12)
    train(cfg, part, resume=True, progress=False)
    a, b = checkpoint.load(full), checkpoint.load(part)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_valid"] == b["best_valid"]
    rows = [json.loads(r) for r in (full / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    best = min(rows, key=lambda r: r["nll"])
    assert a["best_valid"] == {"nll": best["nll"], "step": best["step"]}
    assert checkpoint.load(full / BEST_NAME)["step"] == best["step"]
    assert res_full.evaluation["checkpoint"] == BEST_NAME
    assert res_full.evaluation["checkpoint_step"] == best["step"]
    def no_time(run):
        return [{k: v for k, v in json.loads(r).items() if k != "seconds"}
                for r in (run / "validation.jsonl").read_text().splitlines()]
    assert no_time(full) == no_time(part)


@pytest.mark.parametrize("name,units,groups", [("1-layer-lin", 200, 1), ("1-layer-nonlin", 200, 1),
                                               ("2-layer-nonlin", 400, 2),
                                               ("4-layer-nonlin", 400, 4)])
def test_paper_configs_are_the_reference_structures(name, units, groups):
    cfg = load_config(ROOT / f"configs/paper/{name}.yaml")
    m = cfg.model
    assert m.n_visible + m.n_hidden == units and m.n_visible == m.n_hidden
    assert m.groups == groups and m.batch_norm
    depth = 0 if name == "1-layer-lin" else 2
    assert m.encoder_hidden == [200] * depth and m.decoder_hidden == [200] * depth
    t = cfg.train
    assert (t.steps, t.lr, t.lr_schedule, t.adam_eps, t.weight_decay, t.kl_warmup_fraction) == (
        1_000_000, 3e-3, "piecewise", 1e-3, 1e-4, 0.3)
    assert cfg.data.batch_size == 100 and cfg.backend.num_samples == 1000
    assert cfg.backend.options["num_sweeps"] == 40 and t.validate_every > 0
    assert cfg.eval.num_iw == 4000 and cfg.eval.logz == "ais"


def test_paper_table_script_trains_a_cell_resumes_and_labels_it(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_table",
                                                  ROOT / "benchmarks/paper_table.py")
    paper_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_table)
    small = ["train.steps=6", "backend.num_samples=20",
             "backend.options={num_sweeps: 2, num_chains: 20, burn_in: 5}",
             "train.validate_every=3", "train.validate_examples=20", "train.validate_num_iw=4",
             "train.validate_ais_betas=20", "train.validate_ais_runs=4", "eval.num_iw=4",
             "eval.max_examples=20", "eval.ais_betas=20", "eval.ais_runs=4",
             "train.checkpoint_every=3", "train.sample_grid=0"]
    args = ["train", "4-layer-nonlin", "--k", "2", "--run-root", str(tmp_path / "runs"),
            "--json-dir", str(tmp_path / "json"), *[a for s in small for a in ("--set", s)]]
    assert paper_table.main(args) == 0
    assert paper_table.main(args) == 2  # refuses to overwrite a run without --resume
    assert "--resume" in capsys.readouterr().err
    report = json.loads((tmp_path / "json/4-layer-nonlin-k2.json").read_text())
    assert report["status"] == "not the protocol" and not report["protocol"]
    assert [r["step"] for r in report["validation_curve"]] == [3, 6]
    assert report["steps_done"] == 6 and report["test"]["checkpoint"] == BEST_NAME
    assert report["objective"] == "importance-weighted bound, k=2"
    assert "--k 2" in report["command"]
    assert paper_table.main(["table", "--json-dir", str(tmp_path / "json")]) == 0
    out = capsys.readouterr().out
    assert "| 4-layer-nonlin | importance-weighted bound, k=2 |" in out
    # the whole grid is shown, so a cell nobody started is visible as a gap, not left out
    for structure in paper_table.STRUCTURES:
        for objective in ("k=1 bound", "importance-weighted bound, k=5"):
            assert f"| {structure} | {objective} | — | — | 0 |" in out
    row = next(line for line in out.splitlines() if "k=2" in line).split(" | ")
    rate, whole = float(row[6]), float(row[7])  # the full run at the measured rate, hours
    assert whole == pytest.approx(6 / rate / 3600, abs=0.06)


def test_a_run_stopped_during_validation_validates_that_step_on_resume(tmp_path, monkeypatch):
    """SIGTERM/Ctrl-C during the validation of step N saves last.pt at N; the resumed run must
    validate N before going on, or its model selection silently skips that point."""
    import qvae.train as train_module

    cfg = load_config(ROOT / "configs/smoke.yaml", [*TINY, "train.steps=18"])
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, progress=False)
    real_validate, calls = train_module.validate, []

    def stopped_at_12(model, cfg, data, step):
        calls.append(step)
        if step == 12 and calls.count(12) == 1:
            raise KeyboardInterrupt
        return real_validate(model, cfg, data, step)

    monkeypatch.setattr(train_module, "validate", stopped_at_12)
    assert train(cfg, part, progress=False).interrupted
    assert checkpoint.load(part)["step"] == 12
    train(cfg, part, resume=True, progress=False)
    assert calls == [6, 12, 12, 18]

    def no_time(run):
        return [{k: v for k, v in json.loads(r).items() if k != "seconds"}
                for r in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in no_time(part)] == [6, 12, 18]
    assert no_time(full) == no_time(part)
    assert checkpoint.load(full)["best_valid"] == checkpoint.load(part)["best_valid"]
    assert checkpoint.load(part)["validated_step"] == 18
