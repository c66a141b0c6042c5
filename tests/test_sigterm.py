"""`qvae train` stopped by SIGTERM (a batch scheduler's or a session's end) writes its
checkpoint, says how to resume and exits 143 (that `--resume` then continues exactly is
tested in test_train and test_hierarchical)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qvae import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETS = ["train.steps=4000", "train.checkpoint_every=100000", "train.log_every=20",
        "train.sample_grid=0", "eval.num_iw=2", "eval.max_examples=10",
        "model.n_visible=4", "model.n_hidden=4", "model.encoder_hidden=[16]",
        "model.decoder_hidden=[16]", "backend.num_samples=10"]


def qvae_train(out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "qvae", "train", "--config", "smoke", "--out", str(out),
            "--no-progress", "--no-eval", *[a for s in SETS for a in ("--set", s)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = qvae_train(run)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no metrics rows within 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    step = checkpoint.load(run)["step"]
    assert 0 < step < 4000  # written on SIGTERM, not by checkpoint_every
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert rows[-1]["step"] <= step
