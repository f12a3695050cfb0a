"""Content fingerprints of queries, computed on the device in the serving batch (Blacklight).

Li et al., "Blacklight: Scalable Defense for Neural Networks against Query-Based Black-Box
Attacks" (USENIX Security 2022): a query-based attack sends long runs of near-identical images,
each a small step from the last. Quantise the pixels coarsely (step 50 of 255, with a secret
offset), slide a window of 20 values over the flattened image, hash every window, and keep the
top ``S`` distinct hashes as the query's fingerprint. Two images that share ``T`` of their ``S``
hashes are near-duplicates; an attack's queries share most of theirs, while distinct natural
images share few. The store of fingerprints is global, so changing identities does not help.

Hashing is a salted linear hash of each window modulo 2**64 (int64 arithmetic wraps), with
random odd multipliers drawn from the salt: one matrix product per batch, then a sort. The
numpy ``fingerprint_reference`` computes the same thing with Python integers, one image at a
time, for the CPU-reference test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASK64 = (1 << 64) - 1
EMPTY = np.iinfo(np.int64).min
"""Pads a fingerprint of an image with fewer than ``top`` distinct windows (never a real hash:
the multipliers are odd, and the pad is dropped before matching)."""


@dataclass(frozen=True)
class FingerprintSpec:
    """Blacklight's settings (step 50, window 20, top 50, threshold 25, as in the OARS code)."""

    step: int = 50  # quantisation step on the 0-255 scale
    window: int = 20  # values per hashed window
    top: int = 50  # distinct hashes kept per query (S)
    threshold: int = 25  # shared hashes that make two queries near-duplicates (T)
    salt: int = 0  # secret: quantisation offset and hash multipliers derive from it

    def __post_init__(self) -> None:
        if not (1 <= self.step <= 255 and self.window >= 1 and 1 <= self.threshold <= self.top):
            raise ValueError(f"invalid fingerprint settings {self}")

    @property
    def offset(self) -> int:
        return self.salt % self.step

    def multipliers(self) -> np.ndarray:
        """``window`` odd 64-bit multipliers (as int64), drawn from the salt."""
        rng = np.random.default_rng(self.salt)
        draws = rng.integers(0, 2**63, size=self.window, dtype=np.uint64) * np.uint64(2)
        return (draws | np.uint64(1)).view(np.int64)


def quantise(images: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """(n, ...) float pixels in [0, 1] -> (n, D) int64 buckets of the 0-255 scale."""
    pixels = torch.round(images.flatten(1).clamp(0, 1) * 255)
    return torch.div(pixels + spec.offset, spec.step, rounding_mode="floor").to(torch.int64)


def fingerprints(images: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """(n, ...) images -> (n, top) int64 fingerprints, descending, padded with ``EMPTY``.

    Runs on the images' device: one unfold, one wrapping product, two sorts per batch.
    """
    q = quantise(images, spec)
    windows = q.unfold(1, spec.window, 1)  # (n, D - window + 1, window)
    multipliers = torch.from_numpy(spec.multipliers()).to(q.device)
    hashes = (windows * multipliers).sum(dim=2)  # int64: wraps modulo 2**64
    ordered = hashes.sort(dim=1, descending=True).values
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    distinct = ordered.masked_fill(repeated, EMPTY).sort(dim=1, descending=True).values
    top = distinct[:, : spec.top]
    if top.shape[1] < spec.top:
        pad = torch.full((top.shape[0], spec.top - top.shape[1]), EMPTY, device=top.device)
        top = torch.cat([top, pad], dim=1)
    return top


def fingerprint_reference(image: np.ndarray, spec: FingerprintSpec) -> list[int]:
    """One image's fingerprint with Python integers (the CPU reference): the ``top`` largest
    distinct window hashes, as signed 64-bit values, descending."""
    pixels = np.rint(np.clip(np.asarray(image, np.float64).ravel(), 0, 1) * 255).astype(int)
    q = [(int(p) + spec.offset) // spec.step for p in pixels]
    mult = [int(m) & MASK64 for m in spec.multipliers()]
    hashes = set()
    for start in range(len(q) - spec.window + 1):
        value = sum(a * b for a, b in zip(q[start : start + spec.window], mult, strict=True))
        value &= MASK64
        hashes.add(value - (1 << 64) if value >= 1 << 63 else value)
    ordered = sorted(hashes, reverse=True)[: spec.top]
    return ordered + [int(EMPTY)] * (spec.top - len(ordered))
