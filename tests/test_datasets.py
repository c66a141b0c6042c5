"""Shipped binarized MNIST, users' 0/1 arrays, and minibatching."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qvae.datasets import MNIST_PATH, batches, load_array, load_dataset, load_mnist

SHARED = Path(__file__).resolve().parents[2] / "shared/data/binarized_mnist"
SIZES = {"train": 50000, "valid": 10000, "test": 10000}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_mnist_shapes_dtype_binary(split):
    x = load_mnist(split)
    assert tuple(x.shape) == (SIZES[split], 784)
    assert x.dtype == torch.float32
    assert bool(((x == 0) | (x == 1)).all())
    assert 0.12 < float(x.mean()) < 0.14


def test_mnist_train_mean_pixel_and_fresh_copies():
    x = load_mnist("train")
    assert abs(float(x.mean()) - 0.131) < 0.001
    x.zero_()  # callers may modify their copy in place ...
    assert float(load_mnist("train").mean()) > 0.13  # ... without touching the cache


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="train, valid, test"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="train, valid, test"):
        load_dataset("mnist", "dev")


def test_shipped_file_is_small():
    assert MNIST_PATH.stat().st_size < 4_000_000


@pytest.mark.skipif(not SHARED.is_dir(), reason="source .mat files not available")
def test_npz_round_trips_to_the_mat_files():
    import scipy.io

    readme = (MNIST_PATH.parent / "README.md").read_text()
    for split in ("train", "valid", "test"):
        path = SHARED / f"binarized_mnist_{split}.mat"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert re.search(rf"binarized_mnist_{split}\.mat\s*\|\s*{digest}", readme), split
        expected = scipy.io.loadmat(str(path))["X"]
        assert np.array_equal(load_mnist(split).numpy().astype(np.uint8), expected)


def test_license_and_readme_ship_with_the_data():
    assert (MNIST_PATH.parent / "LICENSE-binarized-mnist.txt").read_text().startswith("The MIT")
    assert "Larochelle" in (MNIST_PATH.parent / "README.md").read_text()


# ------------------------------------------------------------------ user arrays
@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.float64, np.int64])
def test_load_array_npy(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = (rng.random((7, 5)) < 0.5).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    out = load_array(tmp_path / "x.npy")
    assert out.dtype == torch.float32
    assert np.array_equal(out.numpy(), x.astype(np.float32))


def test_rank3_images_are_flattened(tmp_path):
    x = np.zeros((4, 3, 2), np.uint8)
    x[1, 2, 1] = 1
    np.save(tmp_path / "img.npy", x)
    out = load_array(tmp_path / "img.npy")
    assert tuple(out.shape) == (4, 6) and out[1, 5] == 1 and out.sum() == 1


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2, 2)])
def test_wrong_rank_rejected(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=f"rank {len(shape)}"):
        load_array(tmp_path / "x.npy")


def test_non_binary_says_how_many_and_an_example(tmp_path):
    x = np.zeros((3, 4))
    x[1, 2], x[2, 0] = 0.5, 255
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match=r"2 other value\(s\), e.g. 0.5 at index \(1, 2\)"):
        load_array(tmp_path / "x.npy")


def test_empty_nan_missing_and_bad_suffix(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 784), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_array(tmp_path / "empty.npy")
    x = np.zeros((2, 3))
    x[0, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match="1 NaN"):
        load_array(tmp_path / "nan.npy")
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_array(missing)
    (tmp_path / "x.csv").write_text("0,1\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_array(tmp_path / "x.csv")


def test_npz_key_handling(tmp_path):
    a, b = np.eye(3, dtype=np.uint8), np.ones((2, 3), np.uint8)
    np.savez(tmp_path / "single.npz", whatever=a)
    assert torch.equal(load_array(tmp_path / "single.npz"), torch.eye(3))
    for key in ("x", "X", "data"):
        np.savez(tmp_path / f"{key}.npz", labels=np.arange(3), **{key: b})
        assert tuple(load_array(tmp_path / f"{key}.npz").shape) == (2, 3)
    np.savez(tmp_path / "ambiguous.npz", images=a, labels=b)
    with pytest.raises(ValueError, match=r"keys \['images', 'labels'\]"):
        load_array(tmp_path / "ambiguous.npz")


def test_load_dataset_paths(tmp_path):
    assert tuple(load_dataset("MNIST", "valid").shape) == (10000, 784)
    np.save(tmp_path / "all.npy", np.ones((6, 2), np.uint8))
    assert tuple(load_dataset(str(tmp_path / "all.npy"), "train").shape) == (6, 2)
    with pytest.raises(ValueError, match="only has a 'train' split"):
        load_dataset(tmp_path / "all.npy", "test")
    d = tmp_path / "splits"
    d.mkdir()
    np.save(d / "train.npy", np.ones((5, 2), np.uint8))
    np.savez(d / "valid.npz", x=np.zeros((3, 2), np.uint8))
    assert tuple(load_dataset(d, "train").shape) == (5, 2)
    assert float(load_dataset(d, "valid").sum()) == 0 and len(load_dataset(d, "valid")) == 3
    with pytest.raises(FileNotFoundError, match="test.npy"):
        load_dataset(d, "test")
    with pytest.raises(FileNotFoundError, match="mnistt"):
        load_dataset("mnistt", "train")


# ---------------------------------------------------------------------- batches
def test_batches_reproducible_and_cover_every_row():
    x = torch.arange(103.0).unsqueeze(1)

    def run(seed, **kw):
        return [
            b.squeeze(1).tolist()
            for b in batches(x, 10, generator=torch.Generator().manual_seed(seed), **kw)
        ]

    first = run(0)
    assert first == run(0)
    assert first != run(1)
    assert len(first) == 10 and all(len(b) == 10 for b in first)  # last 3 rows dropped
    full = run(0, drop_last=False)
    assert len(full[-1]) == 3
    assert sorted(v for b in full for v in b) == list(range(103))
    plain = [b.squeeze(1).tolist() for b in batches(x, 50, generator=None, shuffle=False)]
    assert plain == [list(range(50)), list(range(50, 100))]


def test_batches_bad_arguments():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, 0, generator=torch.Generator()))
    with pytest.raises(ValueError, match="Generator"):
        next(batches(x, 2, generator=None))
