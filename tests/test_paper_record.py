"""`benchmarks/paper_table.py record`: a "beat it" row from a finished `qvae train` run, whose
command reproduces the run's config exactly, and the configs/beat recipes."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import torch

from qvae.config import load_config
from qvae.configs_path import resolve_config_path
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=4", "backend.num_samples=10", "train.validate_every=2",
         "train.validate_examples=20", "train.validate_num_iw=4", "train.validate_ais_betas=20",
         "train.validate_ais_runs=4", "eval.num_iw=4", "eval.max_examples=20",
         "eval.ais_betas=20", "eval.ais_runs=4", "train.checkpoint_every=2",
         "train.sample_grid=0", "model.relaxation=power", "model.power_beta=30"]


def paper_table():
    spec = importlib.util.spec_from_file_location("paper_table",
                                                  ROOT / "benchmarks/paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_writes_a_row_whose_command_reproduces_the_run(tmp_path, capsys):
    pt = paper_table()
    threads_before = torch.get_num_threads()
    cfg = load_config(resolve_config_path("beat/2-layer-nonlin"), SMALL)
    run = tmp_path / "runs" / "power-2-layer"
    train(cfg, run, progress=False)
    beat = tmp_path / "beat"
    assert pt.main(["record", str(run), "--change", "power relaxation", "--beat-dir",
                    str(beat)]) == 0
    row = json.loads((beat / "power-2-layer.json").read_text())
    assert row["structure"] == "2-layer-nonlin" and row["relaxation"] == "power"
    assert row["steps_done"] == 4 and row["test"]["checkpoint_step"] in (2, 4)
    # the training's thread count, whatever this process runs with
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["threads"]
    torch.set_num_threads(trained + 1)
    try:
        assert pt.main(["record", str(run), "--change", "power relaxation", "--beat-dir",
                        str(beat)]) == 0
    finally:
        torch.set_num_threads(threads_before)
    row = json.loads((beat / "power-2-layer.json").read_text())
    assert row["machine"]["torch_threads"] == row["threads"] == trained
    argv = shlex.split(row["command"])
    assert argv[:5] == ["OMP_NUM_THREADS=1", "qvae", "train", "--config", "beat/2-layer-nonlin"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    again = load_config(resolve_config_path("beat/2-layer-nonlin"), sets)
    assert again.model_dump(mode="json") == json.loads((run / "config.json").read_text())
    assert pt.main(["table", "--json-dir", str(tmp_path / "none"), "--beat-dir",
                    str(beat)]) == 0
    out = capsys.readouterr().out
    assert "| 2-layer-nonlin | power relaxation | k=1 bound |" in out


def test_qvae_evaluate_names_the_checkpoint_it_scored(tmp_path, capsys):
    from qvae.cli import main as cli_main

    cfg = load_config(resolve_config_path("smoke"), ["train.steps=2", "train.sample_grid=0",
                                                     "eval.num_iw=2", "eval.max_examples=10"])
    train(cfg, tmp_path / "run", progress=False)
    for target, name in ((tmp_path / "run", "last.pt"), (tmp_path / "run" / "last.pt",
                                                         "last.pt")):
        out = tmp_path / f"e-{target.name}.json"
        assert cli_main(["evaluate", str(target), "--num-iw", "2", "--max-examples", "10",
                         "--out", str(out), "--no-progress"]) == 0
        row = json.loads(out.read_text())
        assert (row["checkpoint"], row["checkpoint_step"]) == (name, 2)
    capsys.readouterr()


def test_record_refuses_a_model_of_no_paper_structure(tmp_path):
    pt = paper_table()
    cfg = load_config(resolve_config_path("smoke"), ["train.steps=2", "train.sample_grid=0",
                                                     "eval.num_iw=2", "eval.max_examples=10"])
    train(cfg, tmp_path / "run", progress=False)
    for bad in (["record", str(tmp_path / "missing"), "--change", "x"],
                ["record", str(tmp_path / "run"), "--change", "x", "--eval", "nope.json"]):
        with pytest.raises(SystemExit, match="not found"):
            pt.main(bad)
    with pytest.raises(SystemExit, match="none of the structures"):
        pt.main(["record", str(tmp_path / "run"), "--change", "x", "--beat-dir",
                 str(tmp_path / "beat")])


@pytest.mark.parametrize("name", ["1-layer-nonlin", "2-layer-nonlin", "4-layer-nonlin"])
def test_beat_configs_are_the_paper_structures_with_the_protocol_evaluation(name):
    beat, paper = (load_config(resolve_config_path(f"{kind}/{name}")) for kind in
                   ("beat", "paper"))
    pt = paper_table()
    assert pt.structure_of(beat.model.model_dump(mode="json")) == name
    assert beat.eval == paper.eval  # K = 4,000, AIS 10^4 x 100, test split
    for key in ("validate_every", "validate_examples", "validate_num_iw", "validate_ais_betas",
                "validate_ais_runs"):
        assert getattr(beat.train, key) == getattr(paper.train, key), key
    mnist = load_config(resolve_config_path("mnist"))  # qvae's own recipe
    for key in ("steps", "lr", "lr_schedule", "lr_final", "kl_warmup_steps", "tau_start",
                "tau_end", "weight_decay", "adam_eps"):
        assert getattr(beat.train, key) == getattr(mnist.train, key), key
    assert (beat.backend.num_samples, beat.backend.options) == (
        mnist.backend.num_samples, mnist.backend.options)


def test_plot_draws_every_curve_and_refuses_when_there_is_none(tmp_path):
    pt = paper_table()
    cells, beat = tmp_path / "cells", tmp_path / "beat"
    cells.mkdir()
    beat.mkdir()
    curve = [{"step": 20000, "nll": 100.0}, {"step": 40000, "nll": 98.5}]
    (cells / "1-layer-nonlin-k1.json").write_text(json.dumps(
        {"cell": "1-layer-nonlin-k1", "validation_curve": curve}))
    (beat / "r.json").write_text(json.dumps({"name": "r", "validation_curve": curve}))
    (beat / "no-curve.json").write_text(json.dumps({"name": "x", "validation_curve": []}))
    out = tmp_path / "png" / "curves.png"
    assert pt.main(["plot", "--json-dir", str(cells), "--beat-dir", str(beat),
                    "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no validation curves"):
        pt.main(["plot", "--json-dir", str(tmp_path / "none"), "--beat-dir",
                 str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])


def test_record_refuses_a_log_z_below_the_certified_bound(tmp_path):
    pt = paper_table()
    cfg = load_config(resolve_config_path("beat/1-layer-nonlin"), SMALL[:-2])
    run = tmp_path / "runs" / "r"
    train(cfg, run, progress=False)
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["log_z"] >= evaluation["log_z_lower_bound"]  # checked at evaluation
    beat = tmp_path / "beat"
    assert pt.main(["record", str(run), "--change", "x", "--beat-dir", str(beat)]) == 0
    assert json.loads((beat / "r.json").read_text())["log_z_check"]["checked_by"] == (
        "the evaluation")
    # an evaluation from before the check: record computes the bound from the checkpoint
    old = {k: v for k, v in evaluation.items() if not k.startswith("log_z_lower_bound")}
    (run / "old.json").write_text(json.dumps(old))
    assert pt.main(["record", str(run), "--change", "x", "--eval", "old.json", "--beat-dir",
                    str(beat)]) == 0
    assert json.loads((beat / "r.json").read_text())["log_z_check"]["checked_by"].startswith(
        "paper_table.py record")
    # ... and refuses one whose log Z that bound refutes (an AIS that missed the mode)
    (run / "low.json").write_text(json.dumps({**old, "log_z": old["log_z"] - 500.0}))
    with pytest.raises(SystemExit, match="not recorded: .*below"):
        pt.main(["record", str(run), "--change", "x", "--eval", "low.json", "--beat-dir",
                 str(beat)])


def test_table_names_a_json_in_the_beat_folder_that_is_not_a_row(tmp_path):
    (tmp_path / "a-check.json").write_text(json.dumps({"pt_log_z": 1.0}))
    with pytest.raises(SystemExit, match=r"a-check\.json: not a beat row"):
        paper_table().beat_table(tmp_path)
