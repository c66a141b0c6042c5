"""log Z by replica exchange (`qvae.logz_pt`): the stepping-stone estimate against exact
enumeration, the certified lower bound, and the evaluation refusing (or, under `auto`, replacing)
an AIS estimate the bound proves wrong — on a "trap" RBM whose dominant mode AIS cannot reach."""

import json

import pytest
import torch

from qvae import RBM
from qvae.boltzmann_graphs import multipartite
from qvae.boltzmann_logz import ais_log_partition as bm_ais_log_partition
from qvae.boltzmann_logz import exact_log_partition as bm_exact_log_partition
from qvae.config import ConfigError, load_config
from qvae.configs_path import resolve_config_path
from qvae.evaluate import estimate_log_z, evaluate_model, validation_nll
from qvae.logz import ais_log_partition, exact_log_partition
from qvae.logz_pt import (
    LogZBelowBound,
    LogZBound,
    check_above_bound,
    default_ladder,
    log_z_lower_bound,
    pt_log_partition,
    trap_rbm,
)
from qvae.train import build_model

SMALL_PT = ["eval.pt_replicas=40", "eval.pt_chains=40", "eval.pt_burn_in=100",
            "eval.pt_sweeps=300"]


@pytest.mark.parametrize("seed,std", [(0, 0.5), (1, 1.0), (2, 2.0)])
def test_pt_estimate_matches_exact_enumeration(seed, std):
    rbm = RBM(10, 8, init_std=std, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # biases too: every term of the stepping stones is exercised
        rbm.visible_bias.normal_(0, std, generator=gen)
        rbm.hidden_bias.normal_(0, std, generator=gen)
    exact = exact_log_partition(rbm)
    res = pt_log_partition(rbm, num_replicas=60, num_chains=50, burn_in=200, num_sweeps=1000,
                           seed=1)
    # measured spread 0.002-0.004 here; 5 standard errors plus a little for the log-mean's
    # O(1/N) bias, and the spread itself must be small enough for that to mean something
    assert res.log_z_std < 0.02
    assert abs(res.log_z - exact) < 5 * res.log_z_std + 0.005, (res.log_z, exact)
    assert all(0 < a <= 1 for a in res.swap_acceptance)
    assert len(res.swap_acceptance) == 59


def test_ais_misses_the_trap_and_the_bound_and_pt_do_not():
    rbm = trap_rbm()
    exact = exact_log_partition(rbm)
    assert exact == pytest.approx(96.0, abs=0.01)
    ais = ais_log_partition(rbm, num_betas=500, num_runs=20, seed=0)
    assert ais.log_z < exact - 80  # the failure this module exists for, with a tiny spread
    assert ais.log_z_std < 0.1
    bound = log_z_lower_bound(rbm)
    assert exact - 0.01 < bound.value <= exact + 1e-9  # certified: never above log Z
    with pytest.raises(LogZBelowBound, match="--logz pt"):
        check_above_bound(ais.log_z, ais.log_z_std, bound, "AIS")
    res = pt_log_partition(rbm, num_replicas=60, num_chains=40, burn_in=200, num_sweeps=400)
    assert res.log_z == pytest.approx(exact, abs=0.05)


def trap_bm(sizes=(8, 8, 8), a=5.0):
    """A non-bipartite trap: complete 3-partite, every coupling 1, every bias −a. The all-on
    state (energy 24a − 192 = −72) holds the mass; AIS's bias-only base never reaches it."""
    bm = multipartite(list(sizes), scale=1.0, seed=0)
    with torch.no_grad():
        bm.coupling.fill_(1.0)
        bm.bias.fill_(-a)
    return bm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pt_estimate_of_a_boltzmann_machine_matches_exact_enumeration(seed):
    bm = multipartite([4, 4, 4, 4], scale=1.0, seed=seed)
    exact = bm_exact_log_partition(bm)
    res = pt_log_partition(bm, num_replicas=40, num_chains=100, burn_in=300, num_sweeps=1000,
                           seed=seed)
    # measured spread 0.0025 here (10 groups: a t law with 9 degrees of freedom, so 5 of them)
    assert res.log_z_std < 0.01
    assert abs(res.log_z - exact) < 5 * res.log_z_std + 0.005, (res.log_z, exact)
    assert len(res.swap_acceptance) == 39


def test_on_a_non_bipartite_trap_ais_is_refuted_and_pt_is_right():
    bm = trap_bm()
    exact = bm_exact_log_partition(bm)
    assert exact == pytest.approx(72.0, abs=0.01)
    ais = bm_ais_log_partition(bm, num_betas=200, num_runs=10, seed=0)
    bound = log_z_lower_bound(bm)
    assert ais.log_z < exact - 60 and bound.value == pytest.approx(exact, abs=0.01)
    res = pt_log_partition(bm, num_replicas=40, num_chains=40, burn_in=100, num_sweeps=300)
    assert res.log_z == pytest.approx(exact, abs=0.05)
    # the same prior through the evaluation: auto switches to pt, ais is refused
    with pytest.raises(LogZBelowBound):
        estimate_log_z(bm, _cfg("eval.logz=ais"))
    auto = estimate_log_z(bm, _cfg("eval.logz=auto"))
    assert auto["method"].startswith("pt (AIS gave")
    assert auto["log_z"] == pytest.approx(exact, abs=0.1)


def test_the_bound_is_never_above_exact_log_z():
    for seed in range(4):
        rbm = RBM(9, 7, init_std=1.5, seed=seed)
        assert log_z_lower_bound(rbm, seed=seed).value <= exact_log_partition(rbm) + 1e-9


def test_check_above_bound_allows_three_standard_errors_and_no_more():
    bound = LogZBound(10.0, "test", 1, 0.0)
    check_above_bound(9.5, 0.2, bound, "AIS")  # 0.5 below, within 3 × 0.2
    with pytest.raises(LogZBelowBound, match="at least 0.7 nats too low"):
        check_above_bound(9.3, 0.1, bound, "AIS")


def test_ladder_runs_from_one_to_zero_and_arguments_are_checked():
    ladder = default_ladder(5)
    assert ladder[0] == 1.0 and ladder[-1] == 0.0 and ladder == sorted(ladder, reverse=True)
    rbm = RBM(4, 3, seed=0)
    for bad in ({"num_replicas": 2}, {"num_chains": 15}, {"num_sweeps": 1}, {"burn_in": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pt_log_partition(rbm, **bad)


def _cfg(*overrides):
    return load_config(resolve_config_path("smoke"), [*SMALL_PT, "eval.exact_limit_units=4",
                                                      "eval.ais_betas=200", "eval.ais_runs=10",
                                                      *overrides])


def test_evaluation_refuses_ais_below_the_bound_and_auto_switches_to_pt():
    rbm = trap_rbm()
    exact = exact_log_partition(rbm)
    with pytest.raises(LogZBelowBound, match="below"):
        estimate_log_z(rbm, _cfg("eval.logz=ais"))
    auto = estimate_log_z(rbm, _cfg("eval.logz=auto"))
    assert auto["method"].startswith("pt (AIS gave")
    assert auto["log_z"] == pytest.approx(exact, abs=0.1)
    assert auto["log_z_lower_bound"] <= exact + 1e-9
    pt = estimate_log_z(rbm, _cfg("eval.logz=pt"))
    assert pt["method"] == "pt" and pt["log_z"] == pytest.approx(exact, abs=0.1)
    fine = estimate_log_z(RBM(16, 16, init_std=0.1, seed=0), _cfg("eval.logz=ais"))
    assert fine["method"] == "ais" and fine["log_z"] >= fine["log_z_lower_bound"]


def test_evaluate_model_writes_nothing_when_log_z_is_refused(tmp_path):
    cfg = _cfg("eval.logz=ais", "eval.max_examples=20", "eval.num_iw=2")
    model = build_model(cfg)
    model.prior.load_state_dict(trap_rbm().state_dict())
    out = tmp_path / "eval.json"
    with pytest.raises(LogZBelowBound):
        evaluate_model(model, cfg, out, progress=False)
    assert not out.exists()
    cfg = _cfg("eval.logz=pt", "eval.max_examples=20", "eval.num_iw=2")
    result = evaluate_model(model, cfg, out, progress=False)
    assert json.loads(out.read_text())["method"] == result["method"] == "pt"


def test_validation_raises_a_log_z_the_bound_proves_low_and_flags_it():
    cfg = _cfg("train.validate_ais_betas=200", "train.validate_ais_runs=10",
               "train.validate_num_iw=2")
    model = build_model(cfg)
    model.prior.load_state_dict(trap_rbm().state_dict())
    data = torch.zeros(10, 784)
    row = validation_nll(model, cfg, data, seed=0)
    assert row["log_z_method"].startswith("lower bound (ais gave")
    assert row["log_z"] == row["log_z_lower_bound"] > 90
    assert row["log_z_ais_below_bound"] < 20


def test_evaluate_cli_pt_flags_reach_the_estimate_and_bad_ones_are_one_line(tmp_path, capsys):
    from qvae.cli import main
    from qvae.train import train

    cfg = load_config(resolve_config_path("smoke"), [
        "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[16]",
        "model.decoder_hidden=[16]", "train.steps=2", "train.sample_grid=4",
        "eval.at_end=false"])
    train(cfg, tmp_path, progress=False)
    base = ["evaluate", str(tmp_path), "--logz", "pt", "--num-iw", "2", "--max-examples", "10",
            "--no-progress"]
    out = tmp_path / "pt.json"
    assert main([*base, "--pt-replicas", "12", "--pt-chains", "20", "--pt-burn-in", "5",
                 "--pt-sweeps", "40", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["method"], row["pt_replicas"], row["pt_chains"], row["pt_sweeps"]) == (
        "pt", 12, 20, 40)
    capsys.readouterr()
    assert main([*base, "--pt-chains", "15", "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "eval.pt_chains: Input should be a multiple of 10" in err
    assert not (tmp_path / "bad.json").exists()


def test_config_takes_pt_for_any_boltzmann_prior_and_refuses_it_for_the_sde_model():
    cfg = load_config(resolve_config_path("smoke"), ["eval.logz=pt",
                                                     "model.prior.kind=multipartite",
                                                     "model.prior.parts=4"])
    assert cfg.eval.logz == "pt"
    with pytest.raises(ConfigError, match="eval.logz=pt"):
        load_config(resolve_config_path("smoke"), ["eval.logz=pt", "model.kind=sde"])



def test_module_examples():
    import doctest

    from qvae import logz_pt

    assert doctest.testmod(logz_pt).failed == 0
