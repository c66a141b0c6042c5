"""`qvae compare`: statistics against the exact reference, fitted β, and the CLI's outputs."""

import json
from pathlib import Path

import pytest

from backends.testing import random_rbm
from qvae.cli import main as cli_main
from qvae.compare import compare_backends, fit_beta

ROOT = Path(__file__).resolve().parents[1]


def test_statistics_separate_right_from_wrong_temperature():
    rbm = random_rbm(6, 4, seed=1)
    res = compare_backends(rbm, ["exact", "gibbs", "neal"], num_samples=20000,
                           options={"gibbs": {"beta": 2.0}, "neal": {"num_sweeps": 100}})
    rows = res["backends"]
    assert res["reference"] == "exact"
    assert rows["exact"]["beta_fit"] == pytest.approx(1.0, abs=0.05)
    assert rows["neal"]["beta_fit"] == pytest.approx(1.0, abs=0.05)
    assert rows["gibbs"]["beta_fit"] == pytest.approx(2.0, rel=0.05)  # what it was told
    for name in ("exact", "neal"):
        assert rows[name]["tv_visible"] < 3 * rows[name]["tv_noise_floor"]
        assert rows[name]["mean_rms_error"] < 0.02
    assert rows["gibbs"]["tv_visible"] > 5 * rows["gibbs"]["tv_noise_floor"]
    assert rows["gibbs"]["mean_rms_error"] > 0.05


def test_large_rbm_uses_a_gibbs_reference():
    res = compare_backends(random_rbm(20, 10, scale=0.3), ["gibbs"], num_samples=500,
                           reference_samples=2000)
    assert res["reference"].startswith("gibbs") and "tv_visible" not in res["backends"]["gibbs"]


def test_fit_beta_recovers_known_temperature():
    import backends

    rbm = random_rbm(8, 8, seed=2)
    out = backends.get_sampler("exact").sample(rbm, 20000, seed=0)
    assert fit_beta(rbm, out.visible, out.hidden) == pytest.approx(1.0, abs=0.05)


def test_options_for_unlisted_backend_are_refused():
    with pytest.raises(ValueError, match="not compared"):
        compare_backends(random_rbm(3, 2), ["exact"], options={"neal": {}})


def test_cli_compare_writes_table_json_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["model.n_visible=6", "model.n_hidden=6", "model.encoder_hidden=[16]",
            "model.decoder_hidden=[16]", "train.steps=3", "eval.at_end=false",
            "train.sample_grid=0"]
    assert cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out", str(run),
                     "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(run), "--backends", "exact,gibbs,neal", "-n", "500",
                     "--option", "neal.num_sweeps=50", "--out", str(out), "--grid", "9"]) == 0
    printed = capsys.readouterr().out
    assert "beta_fit" in printed and "neal" in printed
    data = json.loads((out / "compare.json").read_text())
    assert set(data["backends"]) == {"exact", "gibbs", "neal"}
    for name in ("energies.png", "means.png", "samples_exact.png", "samples_neal.png"):
        assert (out / name).stat().st_size > 1000, name
