"""Regenerate ``binarized_mnist.npz`` from the published ``.mat`` files.

Usage (from the repository root)::

    python qvae/data/build_mnist.py /path/to/binarized_mnist  [--out qvae/data/binarized_mnist.npz]

The source directory holds ``binarized_mnist_{train,valid,test}.mat`` (one variable ``X``,
uint8 0/1, shapes (50000, 784), (10000, 784), (10000, 784)). Each split is stored bit-packed
along the pixel axis (``np.packbits(x, axis=1)``, 98 bytes per image) under the split's name,
with ``n_pixels`` = 784, in one compressed npz. ``qvae.datasets.load_mnist`` unpacks it. The
script checks that unpacking gives back exactly the source arrays. It is never run at import.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import scipy.io

SPLITS = ("train", "valid", "test")
SHAPES = {"train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}


def read_mat(path: Path) -> np.ndarray:
    """The (N, 784) uint8 0/1 array ``X`` of one .mat file, checked."""
    x = np.asarray(scipy.io.loadmat(str(path))["X"])
    if x.ndim != 2 or x.shape[1] != 784 or not np.isin(x, (0, 1)).all():
        raise ValueError(f"{path}: expected an (N, 784) array of 0/1, got {x.shape} {x.dtype}")
    return x.astype(np.uint8)


def build(src: Path, out: Path) -> None:
    """Write the packed npz for the three splits in ``src`` to ``out`` and verify it."""
    arrays = {}
    for split in SPLITS:
        path = src / f"binarized_mnist_{split}.mat"
        x = read_mat(path)
        if x.shape != SHAPES[split]:
            raise ValueError(f"{path}: shape {x.shape}, expected {SHAPES[split]}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{split}: {x.shape} mean={x.mean():.4f} sha256={digest}")
        arrays[split] = x
    packed = {s: np.packbits(x, axis=1) for s, x in arrays.items()}
    np.savez_compressed(out, n_pixels=np.int64(784), **packed)
    with np.load(out) as f:
        for split, x in arrays.items():
            back = np.unpackbits(f[split], axis=1, count=int(f["n_pixels"]))
            if not np.array_equal(back, x):
                raise RuntimeError(f"round trip failed for {split}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="directory with binarized_mnist_*.mat")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("binarized_mnist.npz"))
    args = parser.parse_args()
    build(args.src, args.out)


if __name__ == "__main__":
    main()
