"""The ``repeat`` response's bookkeeping: a request's outputs as the rows the probe index keeps,
and a remembered row put back in place of a probe's outputs."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import numpy as np


def served_answers(
    outputs: Sequence[str], model: Hashable, results: dict[str, np.ndarray]
) -> tuple[np.ndarray, int]:
    """The named outputs as one float32 row per image (n, A), and a key for the model (name
    and version), the outputs and their widths: a remembered answer is repeated only to
    queries of the same model."""
    parts = [results[name].reshape(len(results[name]), -1).astype(np.float32) for name in outputs]
    shape = tuple((name, part.shape[1]) for name, part in zip(outputs, parts, strict=True))
    return np.concatenate(parts, axis=1), answer_key(model, shape)


def answer_key(model: Hashable, shape: tuple[tuple[str, int], ...]) -> int:
    """A nonzero int64 naming model and outputs, the same in every process (replicas share the
    answers they remember: Python's ``hash`` of a string differs from process to process)."""
    digest = hashlib.blake2b(repr((model, shape)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def put_back(outputs: Sequence[str], results: dict[str, np.ndarray], repeats: dict) -> None:
    """Replaces each probe's outputs (image index -> remembered row) with the remembered ones,
    in the order ``served_answers`` laid them out."""
    if not repeats:
        return
    start = 0
    for name in outputs:
        values = results[name] = results[name].copy()
        width = int(np.prod(values.shape[1:]))
        for i, answer in repeats.items():
            values[i] = answer[start : start + width].reshape(values.shape[1:])
        start += width
