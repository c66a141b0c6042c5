"""Binary datasets: the shipped statically binarized MNIST and users' own 0/1 arrays.

The MNIST splits live bit-packed in ``qvae/data/binarized_mnist.npz`` (see
``qvae/data/README.md``); every loader returns a float32 tensor (N, D) of exact 0/1 values.

>>> from qvae.datasets import load_dataset, batches
>>> import torch
>>> x = load_dataset("mnist", "valid")
>>> tuple(x.shape), x.dtype
((10000, 784), torch.float32)
>>> first = next(batches(x, 100, generator=torch.Generator().manual_seed(0)))
>>> tuple(first.shape)
(100, 784)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "valid", "test")
#: The shipped data file (bit-packed splits, see qvae/data/README.md).
MNIST_PATH = Path(__file__).parent / "data" / "binarized_mnist.npz"
#: Keys tried, in order, in a user's .npz holding more than one array.
NPZ_KEYS = ("x", "X", "data")

_MNIST_CACHE: dict[str, torch.Tensor] = {}

#: The labelled data set of the class-conditional mode (`model.conditional`): the MNIST test
#: images with their labels (the only shipped split that has them).
LABELLED_MNIST = "mnist-labelled"
#: The MNIST test set's class counts: the shipped test split is sorted by label, so digit k
#: is rows sum(counts[:k]) .. sum(counts[:k+1]) - 1 (checked in tests/test_bm_priors.py).
MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
#: Examples of the labelled set that train; the other 1,000 are its valid and test splits.
LABELLED_TRAIN = 9000
#: Seed of the labelled set's one fixed train/held-out split (not the run's seed, so every run
#: holds out the same 1,000 images).
LABELLED_SPLIT_SEED = 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")


def load_mnist(split: str) -> torch.Tensor:
    """Statically binarized MNIST, float32 (N, 784) of 0/1 (N = 50000 / 10000 / 10000).

    The unpacked split is cached per process; each call returns a fresh float32 tensor, so
    modifying it in place is safe.

    >>> load_mnist("test").shape
    torch.Size([10000, 784])
    """
    _check_split(split)
    if split not in _MNIST_CACHE:
        if not MNIST_PATH.is_file():
            raise FileNotFoundError(
                f"shipped MNIST file {MNIST_PATH} is missing; regenerate it with "
                "qvae/data/build_mnist.py (see qvae/data/README.md)"
            )
        with np.load(MNIST_PATH) as f:
            bits = np.unpackbits(f[split], axis=1, count=int(f["n_pixels"]))
        _MNIST_CACHE[split] = torch.from_numpy(bits)
    return _MNIST_CACHE[split].to(torch.float32)


def mnist_test_labels() -> torch.Tensor:
    """The digit (int64, 0-9) of each row of the shipped MNIST test split (sorted by label)."""
    return torch.repeat_interleave(torch.arange(10), torch.tensor(MNIST_TEST_CLASS_COUNTS))


def load_labelled_mnist(split: str) -> torch.Tensor:
    """The MNIST test images with one-hot labels: float32 (N, 784 + 10), each row its pixels
    then its label. One fixed seeded split: 'train' 9,000 images, 'valid' and 'test' the same
    other 1,000 (there is no further labelled data shipped). These are MNIST's *test* images:
    an NLL on them is not comparable with the unconditional table.

    >>> x = load_labelled_mnist("valid")
    >>> tuple(x.shape), bool((x[:, 784:].sum(1) == 1).all())
    ((1000, 794), True)
    """
    _check_split(split)
    x = load_mnist("test")
    onehot = torch.nn.functional.one_hot(mnist_test_labels(), 10).to(x.dtype)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(LABELLED_SPLIT_SEED))
    rows = order[:LABELLED_TRAIN] if split == "train" else order[LABELLED_TRAIN:]
    return torch.cat([x, onehot], 1)[rows]


def _read(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if len(keys) == 1:
                return f[keys[0]]
            for key in NPZ_KEYS:
                if key in keys:
                    return f[key]
        raise ValueError(
            f"{path}: cannot tell which array holds the data; the file has keys {keys}. "
            f"Store a single array, or name it one of {', '.join(map(repr, NPZ_KEYS))}"
        )
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .npy or .npz")


def load_array(path: str | Path) -> torch.Tensor:
    """Load a user's binary data set from .npy / .npz as float32 (N, D) of 0/1.

    Rank-3 arrays (N, H, W) are flattened to (N, H*W). Raises FileNotFoundError for a missing
    file and ValueError for empty, NaN, non-binary or wrongly shaped data.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(p, np.eye(3, dtype=np.uint8))
    >>> load_array(p).shape
    torch.Size([3, 3])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    x = np.asarray(_read(path))
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{path}: expected a numeric array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{path}: the array is empty (shape {x.shape})")
    if x.ndim == 3:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        raise ValueError(
            f"{path}: expected shape (N, D) or images (N, H, W), got rank {x.ndim} {x.shape}"
        )
    if np.iscomplexobj(x):
        raise ValueError(f"{path}: complex values are not binary data")
    nan = np.isnan(x) if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, bool)
    if nan.any():
        raise ValueError(f"{path}: the array contains {int(nan.sum())} NaN value(s)")
    bad = (x != 0) & (x != 1)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{path}: expected only 0/1 values, found {int(bad.sum())} other value(s), "
            f"e.g. {x[idx].item()!r} at index {idx}; binarize the data first"
        )
    return torch.from_numpy(x.astype(np.float32))


def load_dataset(name_or_path: str | Path, split: str) -> torch.Tensor:
    """``"mnist"`` -> shipped MNIST; ``"mnist-labelled"`` -> `load_labelled_mnist`; a file ->
    all of it as "train"; a directory -> its split.

    A directory must hold ``train.npy`` / ``valid.npy`` / ``test.npy`` (or ``.npz``).
    A single file only has a "train" split.

    >>> load_dataset("mnist", "valid").shape
    torch.Size([10000, 784])
    """
    _check_split(split)
    if str(name_or_path).lower() == "mnist":
        return load_mnist(split)
    if str(name_or_path).lower() == LABELLED_MNIST:
        return load_labelled_mnist(split)
    path = Path(name_or_path)
    if path.is_dir():
        for suffix in (".npy", ".npz"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return load_array(candidate)
        raise FileNotFoundError(f"{path}: no {split}.npy or {split}.npz in this directory")
    if path.is_file():
        if split != "train":
            raise ValueError(
                f"{path} is a single file, which only has a 'train' split; for {split!r} "
                "pass a directory holding train.npy / valid.npy / test.npy"
            )
        return load_array(path)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a known data set ('mnist') nor an existing file or directory"
    )


def batches(
    data: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield minibatches of the rows of `data`, shuffled by `generator` (one epoch).

    The same generator state gives the same batches. With ``drop_last`` the last, short
    batch is skipped.

    >>> x = torch.arange(10.0).unsqueeze(1)
    >>> [b.shape[0] for b in batches(x, 4, generator=None, shuffle=False, drop_last=False)]
    [4, 4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise ValueError("data must be a torch.Tensor with at least one dimension")
    n = data.shape[0]
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a torch.Generator (seeded) for reproducibility")
        order = torch.randperm(n, generator=generator, device=generator.device)
        order = order.to(data.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield data[start : start + batch_size]
        else:
            yield data[order[start : start + batch_size]]


def grid_shape(n_pixels: int) -> tuple[int, int]:
    """(H, W) to draw `n_pixels` values as an image when nothing says otherwise: the most
    nearly square factorisation, H <= W (784 -> (28, 28), 60 -> (6, 10), a prime p -> (1, p)).

    >>> grid_shape(784), grid_shape(60), grid_shape(7)
    ((28, 28), (6, 10), (1, 7))
    """
    h = max(d for d in range(1, math.isqrt(n_pixels) + 1) if n_pixels % d == 0)
    return h, n_pixels // h


def image_shape(name_or_path: str | Path, n_pixels: int) -> tuple[int, int]:
    """(H, W) of the examples of a data set: MNIST's 28×28, the (H, W) of a user's rank-3
    (N, H, W) array, else `grid_shape(n_pixels)` (also when the data is no longer there).

    >>> image_shape("mnist", 784)
    (28, 28)
    """
    if str(name_or_path).lower() in ("mnist", LABELLED_MNIST):
        return 28, 28
    path = Path(name_or_path)
    if path.is_dir():
        path = next((p for p in (path / "train.npy", path / "train.npz") if p.is_file()), path)
    try:
        shape = np.load(path, mmap_mode="r").shape if path.suffix == ".npy" else _read(path).shape
    except (OSError, ValueError):
        shape = ()
    if len(shape) == 3 and shape[1] * shape[2] == n_pixels:
        return int(shape[1]), int(shape[2])
    return grid_shape(n_pixels)
