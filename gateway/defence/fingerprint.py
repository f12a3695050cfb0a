"""Content fingerprints of queries, computed on the device in the serving batch (Blacklight).

Li et al., "Blacklight: Scalable Defense for Neural Networks against Query-Based Black-Box
Attacks" (USENIX Security 2022): a query-based attack sends long runs of near-identical images,
each a small step from the last. Quantise the pixels coarsely (step 50 of 255, with a secret
offset), slide a window of 20 values over the flattened image, hash every window, and keep the
top ``S`` distinct hashes as the query's fingerprint. Two images that share ``T`` of their ``S``
hashes are near-duplicates; an attack's queries share most of theirs, while distinct natural
images share few. The store of fingerprints is global, so changing identities does not help.

Each window's quantised values are small (0-6 at step 50), so a window of 20 packs exactly into
one 64-bit integer (3 bits a value, by doubling spans: five shifts and ors per batch); a salted
bijective mix of that integer (xor a key, multiply by an odd constant, xor-shift, multiply) is
the window's hash, so which windows are a query's top ``S`` is secret without the salt. The
numpy ``fingerprint_reference`` computes the same thing with Python integers, one image at a
time, for the CPU-reference test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

MASK64 = (1 << 64) - 1
LOW35 = (1 << 35) - 1
EMPTY = np.iinfo(np.int64).min
"""Pads a fingerprint of an image with fewer than ``top`` distinct windows. A window whose hash
happened to equal it (one value in 2**64) would only be left out of matching."""


@dataclass(frozen=True)
class FingerprintSpec:
    """Blacklight's settings (step 50, window 20, top 50, threshold 25, as in the OARS code)."""

    step: int = 50  # quantisation step on the 0-255 scale
    window: int = 20  # values per hashed window
    top: int = 50  # distinct hashes kept per query (S)
    threshold: int = 25  # shared hashes that make two queries near-duplicates (T)
    salt: int = 0  # secret: the quantisation offset and the hash's mixers derive from it

    def __post_init__(self) -> None:
        if not (1 <= self.step <= 255 and self.window >= 1 and 1 <= self.threshold <= self.top):
            raise ValueError(f"invalid fingerprint settings {self}")
        if self.bits * self.window > 64:
            raise ValueError(
                f"a window of {self.window} values at step {self.step} needs more "
                "than 64 bits: use a coarser step or a shorter window"
            )

    @property
    def offset(self) -> int:
        return self.salt % self.step

    @property
    def bits(self) -> int:
        """Bits per quantised value: the largest bucket is (255 + step - 1) // step."""
        return ((255 + self.step - 1) // self.step).bit_length()

    def mixers(self) -> tuple[int, int, int]:
        """The hash's secret: a key and two odd multipliers (signed 64-bit), from the salt."""
        rng = np.random.default_rng(self.salt)
        key, m1, m2 = (int(v) for v in rng.integers(0, 2**63, size=3, dtype=np.uint64))
        return _signed(key), _signed(2 * m1 + 1), _signed(2 * m2 + 1)


def _signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def quantise(images: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """(n, ...) float pixels in [0, 1] -> (n, D) int64 buckets of the 0-255 scale."""
    pixels = torch.round(images.flatten(1).clamp(0, 1) * 255)
    return torch.div(pixels + spec.offset, spec.step, rounding_mode="floor").to(torch.int64)


def packed(q: torch.Tensor, window: int, bits: int) -> torch.Tensor:
    """(n, D) small non-negative ints -> (n, D - window + 1) int64: each window's values packed
    exactly, ``bits`` each, the first lowest. Spans double (1, 2, 4, ... values) by one shift
    and one or each, and the window is assembled from the largest spans."""
    spans, width = {1: q}, 1
    while width * 2 <= window:
        span = spans[width]
        spans[width * 2] = span[:, :-width] | (span[:, width:] << (bits * width))
        width *= 2
    length = q.shape[1] - window + 1
    out, done = spans[width][:, :length].clone(), width
    for size in sorted(spans, reverse=True):
        if done + size <= window:
            out |= spans[size][:, done : done + length] << (bits * done)
            done += size
    return out


def mixed(x: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """A salted bijection of int64 values (wrapping arithmetic): xor, multiply, xor-shift,
    multiply. The shift is logical: the sign bits an arithmetic shift brings in are masked."""
    key, m1, m2 = spec.mixers()
    x = (x ^ key) * m1
    x = x ^ ((x >> 29) & LOW35)
    return x * m2


def fingerprints(images: torch.Tensor, spec: FingerprintSpec) -> torch.Tensor:
    """(n, ...) images in [0, 1] -> (n, top) int64 fingerprints, descending, ``EMPTY``-padded.

    Runs on the images' device: a packing, a mix, one sort (numpy's on the CPU: several times
    faster than torch's there), then the first ``top`` distinct values by a running count.
    """
    if images.shape[0] == 0:
        return torch.full((0, spec.top), EMPTY, dtype=torch.int64, device=images.device)
    q = quantise(images, spec)
    if q.shape[1] < spec.window:
        raise ValueError(f"an image of {q.shape[1]} values is shorter than the window")
    hashes = mixed(packed(q, spec.window, spec.bits), spec)
    if hashes.device.type == "cpu":
        ordered = torch.from_numpy(np.ascontiguousarray(np.sort(hashes.numpy(), axis=1)[:, ::-1]))
    else:
        ordered = hashes.sort(dim=1, descending=True).values
    distinct = torch.ones_like(ordered, dtype=torch.bool)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = distinct.cumsum(1) - 1
    kept = distinct & (rank < spec.top)
    out = torch.full((ordered.shape[0], spec.top + 1), EMPTY, dtype=torch.int64, device=q.device)
    out.scatter_(1, torch.where(kept, rank, spec.top), ordered)  # the rest land in a spare column
    return out[:, : spec.top]


def fingerprint_reference(image: np.ndarray, spec: FingerprintSpec) -> list[int]:
    """One image's fingerprint with Python integers (the CPU reference): the ``top`` largest
    distinct window hashes, as signed 64-bit values, descending."""
    pixels = np.rint(np.clip(np.asarray(image, np.float64).ravel(), 0, 1) * 255).astype(int)
    q = [(int(p) + spec.offset) // spec.step for p in pixels]
    key, m1, m2 = (v & MASK64 for v in spec.mixers())
    hashes = set()
    for start in range(len(q) - spec.window + 1):
        value = sum(v << (spec.bits * j) for j, v in enumerate(q[start : start + spec.window]))
        value = ((value ^ key) * m1) & MASK64
        value = ((value ^ (value >> 29)) * m2) & MASK64
        hashes.add(_signed(value))
    ordered = sorted(hashes, reverse=True)[: spec.top]
    return ordered + [int(EMPTY)] * (spec.top - len(ordered))


def picture_hash(image: np.ndarray) -> int:
    """A 64-bit hash of an input row as an 8-bit picture (values in [0, 1] scaled to 0-255 and
    rounded, the scale the fingerprints read), as a signed int64: the same picture sent again,
    as FP32, as UINT8 or as a lossless PNG, has the same one; a change of any pixel by half a
    level or more gives another."""
    levels = np.rint(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return content_hash(levels)


def content_hash(image: np.ndarray) -> int:
    """A 64-bit hash of an input row's raw bytes (BLAKE2b), as a signed int64: an exact
    resend (a retry) has the same one, a near-duplicate a different one."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
