"""scikit-learn's bundled 8×8 digits (1797 images, no download) as an :class:`ImageDataset`."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .images import _check_size, resize

__all__ = ["load_digits", "digits_split_ids"]

SPLITS = ("train", "heldout", "all")


def _digits_array() -> np.ndarray:
    """scikit-learn's ``digits.csv.gz`` ([1797, 65]: 64 pixels 0..16, then the class), read the way
    ``sklearn.datasets.load_digits`` reads it but without importing ``sklearn.datasets`` (13 MB and 0.3 s in every
    explorer kernel beside torch and scipy, for a 500 KB file); the import is the fallback where the file is not
    where expected."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "datasets" / "data" / "digits.csv.gz"
            if path.is_file():
                return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits as _sk_load

    d = _sk_load()
    return np.concatenate([d.data, d.target[:, None]], axis=1)


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = _digits_array()
    images = torch.from_numpy(np.asarray(data[:, :-1], dtype=np.float32).reshape(-1, 8, 8)) / 16.0  # 0..16 -> 0..1
    return images[:, None], torch.from_numpy(np.asarray(data[:, -1], dtype=np.int64))


def digits_split_ids(split: str = "train", heldout_fraction: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Sorted ids of a split: stratified by class, seeded, independent of image size and ``limit``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= float(heldout_fraction) < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    _, labels = _raw_digits()
    n = labels.numel()
    if split == "all":
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    heldout = torch.zeros(n, dtype=torch.bool)
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        k = int(round(float(heldout_fraction) * idx.numel()))
        heldout[idx[torch.randperm(idx.numel(), generator=g)[:k]]] = True
    return (heldout if split == "heldout" else ~heldout).nonzero().flatten()


def load_digits(size: int = 16, split: str = "train", heldout_fraction: float = 0.2, seed: int = 0,
                limit: int | None = None) -> ImageDataset:
    """The digits, resized (bilinear) to ``size × size`` and scaled to ``[-1, 1]``.

    ids are row indices in scikit-learn's array, so they are the same for every size, split and limit.
    ``split``: ``"train"``, ``"heldout"`` (a class-stratified ``heldout_fraction``, drawn with ``seed``) or
    ``"all"``. ``limit`` keeps the first ``limit`` ids of the split.
    """
    size = _check_size(size)
    ids = digits_split_ids(split, heldout_fraction, seed)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        ids = ids[: int(limit)]
    images, labels = _raw_digits()
    x = resize(images[ids], size) * 2 - 1
    return ImageDataset(images=x.clamp(-1, 1), ids=ids, labels=labels[ids],
                        name=f"digits{size}-{split}", meta={"source": "sklearn.datasets.load_digits"})
