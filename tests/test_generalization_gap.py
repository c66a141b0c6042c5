"""`benchmarks/generalization_gap.py`: train vs held-out NLL of a checkpoint, one log Z for both."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from qvae.config import load_config
from qvae.train import train

ROOT = Path(__file__).resolve().parents[1]


def gap_script():
    spec = importlib.util.spec_from_file_location("generalization_gap",
                                                  ROOT / "benchmarks/generalization_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_model_fit_to_few_images_shows_a_gap(tmp_path):
    # 20 training images, 200 held-out ones from the same pixel distribution: 300 steps at a
    # high learning rate memorise the 20, so the held-out NLL is several nats worse
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    p = rng.uniform(0.1, 0.9, size=64)
    for split, n in (("train", 20), ("valid", 200), ("test", 20)):
        np.save(data / f"{split}.npy", (rng.uniform(size=(n, 64)) < p).astype(np.float32))
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"data.dataset={data}", "data.batch_size=20", "data.eval_batch_size=20",
        "model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[64]",
        "model.decoder_hidden=[64]", "backend.num_samples=50",
        "backend.options={num_sweeps: 2, burn_in: 20}", "train.steps=300", "train.lr=1e-2",
        "train.log_every=100", "train.checkpoint_every=300", "train.sample_grid=0",
        "train.validate_num_iw=20", "eval.at_end=false"])
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "gap.json"
    assert gap_script().main([str(tmp_path / "run" / "last.pt"), "--examples", "20",
                              "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["step"] == 300 and row["num_iw"] == 20
    assert row["train"]["num_examples"] == row["valid"]["num_examples"] == 20
    assert row["train"]["log_z"] == row["valid"]["log_z"]
    assert row["train"]["log_z_method"] == "exact"
    assert row["gap"] == row["valid"]["nll"] - row["train"]["nll"]
    assert row["gap"] > 4 * row["gap_stderr"], row
