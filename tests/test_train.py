"""The trainer end to end on tiny configs: learning, exact resume, checkpoints, CLI, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvae import checkpoint
from qvae.cli import main as cli_main
from qvae.config import ConfigError, load_config, validate_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[32]",
    "model.decoder_hidden=[32]", "data.batch_size=50", "backend.num_samples=50",
    "backend.options={num_sweeps: 2, burn_in: 20}", "train.log_every=5",
    "train.checkpoint_every=10", "train.sample_grid=4", "eval.num_iw=10",
    "eval.max_examples=50",
]


def tiny(*extra):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra])


def params(path):
    return checkpoint.load(path)["model"]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoke_training_lowers_the_loss(tmp_path):
    cfg = tiny("train.steps=150", "train.log_every=1", "eval.at_end=false", "train.lr=1e-2")
    train(cfg, tmp_path, progress=False)
    losses = [r["loss"] for r in rows(tmp_path)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 15, (first, last)
    assert "elbo_relaxed" in rows(tmp_path)[-1]  # small prior: true relaxed ELBO is logged


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = tiny("train.steps=24", "eval.at_end=false")
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, progress=False)

    def interrupt(step, _):
        if step == 13:
            raise KeyboardInterrupt

    res = train(cfg, part, progress=False, callback=interrupt)
    assert res.interrupted and checkpoint.load(part)["step"] == 13
    resumed = train(cfg, part, resume=True, progress=False)
    assert resumed.train_seconds > res.train_seconds > 0  # training time adds up across resumes
    a, b = params(full), params(part)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    assert [r["step"] for r in rows(part)] == [r["step"] for r in rows(full)]


def test_resume_refuses_other_model_shape(tmp_path):
    train(tiny("train.steps=2", "eval.at_end=false"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="model.n_visible"):
        train(tiny("train.steps=4", "model.n_visible=9"), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny("train.steps=4"), tmp_path, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_holds_everything_to_resume(tmp_path):
    train(tiny("train.steps=10", "eval.at_end=false"), tmp_path, progress=False)
    state = checkpoint.load(tmp_path)
    for key in ("config", "model", "optimizer", "scheduler", "step", "sampler_states",
                "model_args", "train_seconds"):
        assert key in state
    assert state["train_seconds"] > 0
    assert state["sampler_states"][0]["hidden"].shape == (50, 8)  # persistent chains
    assert validate_config(state["config"]).model.n_visible == 8


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.stepz=3", "train.stepz: unknown key"),
        ("train.steps=-1", "train.steps"),
        ("train.lr=fast", "train.lr"),
        ("model.activation=swish", "model.activation"),
        ("backend.name=qpu9000", "unknown backend 'qpu9000'"),
        ("backend.options={sweeps: 3}", "valid options"),
        ("eval.num_iw=6000", "eval.num_iw"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/smoke.yaml", [override])
    assert field in str(err.value)


def test_shipped_configs_validate():
    from qvae.service.settings import load_service_config

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.name == "service.yaml":  # `qvae serve`'s file, not an experiment
            load_service_config(path)
        else:
            load_config(path)


def test_cli_train_evaluate_sample(tmp_path, capsys):
    run = tmp_path / "run"
    sets = [a for s in [*TINY, "train.steps=12"] for a in ("--set", s)]
    assert cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"), "--out", str(run),
                     "--no-progress", *sets]) == 0
    out = capsys.readouterr().out
    assert "NLL" in out and "training_curve" in out
    for name in ("last.pt", "metrics.jsonl", "training_curve.png", "samples.png", "eval.json"):
        assert (run / name).is_file(), name
    ev = json.loads((run / "eval.json").read_text())
    assert ev["method"] == "exact" and ev["num_examples"] == 50
    assert ev["nll"] <= -ev["elbo"] + 1.0  # IW bound (K=10) is at least the ELBO, up to noise
    assert cli_main(["evaluate", str(run), "--num-iw", "5", "--max-examples", "20",
                     "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_iw"] == 5
    assert cli_main(["sample", str(run), "--backend", "neal", "-n", "9",
                     "--option", "num_sweeps=50", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert cli_main(["train", "--config", str(ROOT / "configs/smoke.yaml"),
                     "--set", "train.bogus=1"]) == 2
    assert "train.bogus: unknown key" in capsys.readouterr().err


def test_cli_backends_and_config(capsys):
    assert cli_main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "gibbs" in out and "neal" in out and "exact" in out
    assert cli_main(["config"]) == 0
    assert "backend.num_samples" in capsys.readouterr().out


def test_python_dash_m_is_the_cli():
    res = subprocess.run([sys.executable, "-m", "qvae", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    assert "train" in res.stdout and "evaluate" in res.stdout


def test_torchrun_two_cpu_processes(tmp_path):
    sets = [a for s in [*TINY, "train.steps=6", "eval.at_end=false"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "qvae", "train", "--config", str(ROOT / "configs/smoke.yaml"),
         "--out", str(tmp_path), "--no-progress", *sets],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    state = checkpoint.load(tmp_path)
    assert state["step"] == 6
    chains = [s["hidden"] for s in state["sampler_states"]]
    assert len(chains) == 2 and not torch.equal(chains[0], chains[1])  # each rank its own


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    import signal
    import time

    sets = [a for s in [*TINY, "train.steps=100000", "train.log_every=1"] for a in ("--set", s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qvae", "train", "--config", str(ROOT / "configs/smoke.yaml"),
         "--out", str(tmp_path), "--no-progress", *sets],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal: a suite started from a background job (`cmd &`) would
        # otherwise hand the child SIGINT ignored, and the run would rightly go on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    step = checkpoint.load(tmp_path)["step"]
    assert 0 < step < 100000


def test_sde_model_trains_without_a_negative_phase_and_evaluates(tmp_path):
    cfg = tiny("model.kind=sde", "model.sde_steps=5", "model.control_hidden=[16]",
               "train.steps=40", "train.log_every=1", "train.lr=1e-2")
    res = train(cfg, tmp_path, progress=False)
    metrics = rows(tmp_path)
    assert all("backend/num_chains" not in r for r in metrics)  # the sampler was never called
    assert sum(r["loss"] for r in metrics[-10:]) < sum(r["loss"] for r in metrics[:10])
    ev = res.evaluation
    assert ev["log_z"] is None and ev["method"].startswith("none")
    assert ev["nll"] <= -ev["elbo"] + 1.0
    assert (tmp_path / "samples.png").is_file()  # one-step generation from a binary backend


def test_a_run_without_last_pt_names_the_checkpoints_it_has(tmp_path):
    from qvae.checkpoint import load

    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has best.pt: give one"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="train first"):
        load(tmp_path / "empty")
