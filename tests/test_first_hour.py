"""Issue 11, the first hour: README commands that failed as written, work lost after training,
invisible fallback and messages. Each test reproduces one measured bullet at a tiny size;
subprocess `qvae` runs only where the CLI's own behaviour (exit code, stderr, run name) is tested.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backends
from qvae import RBM
from qvae.cli import main as cli_main
from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]
#: Tiny sizes for every run here (the smoke config, shrunk).
TINY = ["model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[16]",
        "model.decoder_hidden=[16]", "data.batch_size=20", "backend.num_samples=20",
        "train.log_every=1", "train.checkpoint_every=50", "train.sample_grid=4",
        "eval.num_iw=4", "eval.max_examples=20"]
KEY = "first-hour-key-0001"


def tiny(*extra: str, backend: str | None = None, notes: list | None = None):
    return load_config(ROOT / "configs/smoke.yaml", [*TINY, *extra], backend=backend,
                       notes=notes)


@pytest.fixture(autouse=True)
def no_qpu_token(monkeypatch):
    """No QPU here: dwave falls back to neal (or refuses, strict) whatever the host has."""
    for var in ("DWAVE_API_TOKEN", "DWAVE_API_ENDPOINT", "QVAE_API_KEY", "QVAE_SERVICE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DWAVE_CONFIG_FILE", os.devnull)


def qvae(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qvae", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------- README commands that fail as written
@pytest.mark.parametrize("name", ["neal", "exact", "dwave", "langevin", "mala"])
def test_backend_flag_drops_the_files_options_of_another_backend(name):
    notes: list[str] = []
    cfg = tiny(backend=name, notes=notes)  # smoke.yaml holds gibbs options: burn_in, num_sweeps
    assert cfg.backend.name == name and cfg.backend.options == {}
    assert len(notes) == 1 and "burn_in" in notes[0] and "gibbs" in notes[0]


def test_set_options_are_kept_for_the_new_backend_and_same_backend_keeps_the_file():
    cfg = tiny("backend.options.num_sweeps=7", backend="neal")
    assert cfg.backend.options == {"num_sweeps": 7}
    notes: list[str] = []
    assert tiny(backend="gibbs", notes=notes).backend.options["burn_in"] == 50 and not notes
    # remote sampling with the file's own backend keeps its options (they are the target's)
    cfg = tiny("backend.target=gibbs", "backend.url=http://127.0.0.1:1", backend="remote")
    assert cfg.backend.options["burn_in"] == 50


def test_cli_train_with_another_backend_runs_and_says_what_it_dropped(tmp_path):
    res = qvae("train", "--config", "smoke", "--backend", "neal", "--set", "train.steps=2",
               "--no-eval", "--set", "train.sample_grid=0", "--no-progress",
               "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "dropped the file's backend.options" in res.stderr and "burn_in" in res.stderr
    assert (tmp_path / "run" / "last.pt").is_file()


def test_compare_defaults_leave_out_exact_on_a_big_model_and_refuse_it_before_work(monkeypatch):
    from qvae import compare

    names, notes = compare.default_backends(RBM(100, 100, seed=0))
    assert names == ["gibbs", "neal"] and "exact" in notes[0] and "2^100" in notes[0]
    assert compare.default_backends(RBM(6, 4, seed=0))[0] == ["exact", "gibbs", "neal"]

    def no_reference(*a, **k):
        raise AssertionError("the reference run started before the feasibility check")

    monkeypatch.setattr(compare, "reference", no_reference)
    with pytest.raises(ValueError, match="cannot compare exact: .*2\\^100"):
        compare.compare_backends(RBM(100, 100, seed=0), ["gibbs", "exact"], num_samples=10)


# ------------------------------------------------------------ work lost after training
def _binary(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) < 0.3).astype(np.uint8)


def test_single_npy_without_test_split_is_refused_before_the_first_step(tmp_path):
    np.save(tmp_path / "x.npy", _binary((100, 16)))
    cfg = tiny("train.steps=3", f"data.dataset={tmp_path / 'x.npy'}")
    steps = []
    with pytest.raises(ValueError, match="'test' split.*--no-eval"):
        train(cfg, tmp_path / "run", progress=False, callback=lambda s, r: steps.append(s))
    assert steps == [] and not (tmp_path / "run").exists()
    # with --no-eval the same file trains
    ok = train(tiny("train.steps=2", f"data.dataset={tmp_path / 'x.npy'}", "eval.at_end=false"),
               tmp_path / "run2", progress=False)
    assert ok.step == 2


def test_non_square_images_train_to_the_end_with_a_grid(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, split in enumerate(("train", "valid", "test")):
        np.save(data / f"{split}.npy", _binary((60, 6, 10), seed=i))
    from qvae.datasets import image_shape

    assert image_shape(data, 60) == (6, 10)
    res = train(tiny("train.steps=2", f"data.dataset={data}"), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "samples.png").is_file() and res.evaluation is not None


def test_unwritable_output_is_refused_before_the_first_step(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    steps = []
    with pytest.raises(PermissionError, match="--out .*cannot write"):
        train(tiny("train.steps=2"), tmp_path / "a-file" / "run", progress=False,
              callback=lambda s, r: steps.append(s))
    assert steps == []


def test_failed_start_leaves_no_run_directory(tmp_path):
    cfg = tiny("train.steps=2", "backend.options.strict=true", backend="dwave")
    with pytest.raises(RuntimeError, match="strict"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_evaluate_writes_a_new_file_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny("train.steps=2"), run, progress=False)
    first = (run / "eval.json").read_text()
    args = ["evaluate", str(run), "--num-iw", "2", "--max-examples", "10", "--no-progress"]
    assert cli_main(args) == 0
    assert (run / "eval.json").read_text() == first  # training's evaluation is kept
    new = sorted(run.glob("eval-*.json"))
    assert len(new) == 1 and json.loads(new[0].read_text())["num_iw"] == 2
    capsys.readouterr()
    assert cli_main([*args, "--out", str(run / "eval.json")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--out", str(run / "eval.json"), "--overwrite"]) == 0
    assert json.loads((run / "eval.json").read_text())["num_iw"] == 2


# ---------------------------------------------------------------- invisible fallback
def test_fallback_is_counted_in_result_metrics_eval_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="backend.options.strict=true"):
        res = train(tiny("train.steps=3", backend="dwave"), run, progress=False)
    assert res.sampling["served_by"] == {"neal": 3} and res.sampling["fallbacks"] == 3
    assert "DWAVE_API_TOKEN" in res.sampling["fallback_reason"]
    assert rows(run)[-1]["served_by/neal"] == 3 and rows(run)[-1]["fallbacks"] == 3
    ev = json.loads((run / "eval.json").read_text())
    assert ev["training_sampler"]["served_by"] == {"neal": 3}
    from qvae.train import SamplerCounters

    line = SamplerCounters.from_dict("dwave", res.sampling).summary()
    assert line.startswith("dwave: 0 of 3 calls; neal fallback served 3 (reason: ")


def test_counters_survive_resume(tmp_path):
    run = tmp_path / "run"
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "eval.at_end=false", backend="dwave")

    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning):
        first = train(cfg, run, progress=False, callback=stop)
    assert first.interrupted and first.sampling["fallbacks"] == 2
    with pytest.warns(UserWarning):
        done = train(cfg, run, resume=True, progress=False)
    assert done.sampling["fallbacks"] == 4 and done.sampling["served_by"] == {"neal": 4}
    assert done.sampling["sampler_s_total"] >= first.sampling["sampler_s_total"] > 0
    assert rows(run)[-1]["fallbacks"] == 4


def test_cli_names_the_run_and_prints_who_served(tmp_path):
    res = qvae("train", "--config", "smoke", "--backend", "dwave", "--set", "train.steps=2",
               "--no-eval", "--set", "train.sample_grid=0", "--no-progress", cwd=tmp_path,
               env={"DWAVE_CONFIG_FILE": os.devnull})
    assert res.returncode == 0, res.stderr
    assert "dwave: 0 of 2 calls; neal fallback served 2 (reason: " in res.stdout
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("smoke-dwave-fallback-neal-") and (run / "last.pt").is_file()


def _service(tmp_path, **dwave):
    from qvae.service.testing import running_service

    return running_service({"keys": [{"name": "t", "key": KEY}],
                            "backends": {"dwave": dwave} if dwave else {}})


def test_remote_client_learns_the_servers_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("QVAE_API_KEY", KEY)
    with _service(tmp_path) as url:
        cfg = tiny("train.steps=2", "eval.at_end=false", "train.sample_grid=0",
                   "backend.target=dwave", f"backend.url={url}", backend="remote")
        res = train(cfg, tmp_path / "run", progress=False)
    assert res.sampling["backend"] == "dwave" and res.sampling["served_by"] == {"neal": 2}
    assert res.sampling["fallbacks"] == 2 and "token" in res.sampling["fallback_reason"]
    assert rows(tmp_path / "run")[-1]["served_by/neal"] == 2


# ------------------------------------------------------------------------- messages
def _one_line_failure(capsys, args, code):
    assert cli_main(args) == code  # returned, not raised: no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"qvae {args[0]}: ")
    return err


TRAIN = ["train", "--config", str(ROOT / "configs/smoke.yaml"), "--set", "train.steps=2",
         "--no-eval", "--no-progress"]


def test_remote_failures_are_one_line(tmp_path, capsys, monkeypatch):
    from qvae.service.testing import free_port

    down = f"http://127.0.0.1:{free_port()}"
    remote = ["--backend", "remote", "--set", "backend.target=gibbs",
              "--set", "backend.remote.max_retries=0"]
    err = _one_line_failure(capsys, [*TRAIN, *remote, "--set", f"backend.url={down}",
                                     "--out", str(tmp_path / "a")], 1)
    assert "cannot reach the qvae service" in err and not (tmp_path / "a").exists()
    with _service(tmp_path, locked=["strict"]) as url:
        err = _one_line_failure(capsys, [*TRAIN, *remote, "--set", f"backend.url={url}",
                                         "--out", str(tmp_path / "b")], 1)
        assert "401" in err and "QVAE_API_KEY" in err
        monkeypatch.setenv("QVAE_API_KEY", KEY)
        err = _one_line_failure(
            capsys, [*TRAIN, "--backend", "remote", "--set", "backend.target=dwave",
                     "--set", f"backend.url={url}", "--set", "backend.options.strict=true",
                     "--out", str(tmp_path / "c")], 1)
        assert "403" in err and "strict" in err


def test_strict_without_token_is_one_line(tmp_path, capsys):
    err = _one_line_failure(capsys, [*TRAIN, "--backend", "dwave", "--set",
                                     "backend.options.strict=true", "--out",
                                     str(tmp_path / "run")], 1)
    assert "no D-Wave API token" in err and not (tmp_path / "run").exists()


def test_evaluate_messages(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    err = _one_line_failure(capsys, ["evaluate", str(tmp_path / "x.pt")], 2)
    assert "not a readable checkpoint" in err
    missing = tmp_path / "runs" / "nothere"
    err = _one_line_failure(capsys, ["evaluate", str(missing)], 2)
    assert f"--out {missing}`" in err  # the run directory itself, not its parent


def test_messages_speak_cli_and_help_is_current(capsys):
    with pytest.raises(ValueError, match="--logz ais"):
        RBM(30, 30, seed=0).log_partition(max_states=2**10)
    with pytest.warns(UserWarning, match="--set backend.options.strict=true"):
        backends.get_sampler("dwave").sample(RBM(4, 3, seed=0), 5, seed=0)
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "as they land" not in capsys.readouterr().out
    assert "later" not in backends.__doc__.splitlines()[0]
    readme = (ROOT / "README.md").read_text()
    assert "# ['exact', 'gibbs', 'neal']" not in readme


def test_docs_page_needs_no_key_as_the_readme_says(tmp_path):
    import httpx

    with _service(tmp_path) as url:
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/openapi.json").status_code == 200
    readme = (ROOT / "README.md").read_text()
    assert "`/docs` and `/openapi.json` need no key" in readme
