"""How a stored input tensor becomes bytes and back: ``.npy``, never pickle."""

from __future__ import annotations

import io

import numpy as np


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes keep dtype, shape, order and every bit; object arrays are refused because
    storing them would need pickle, and loading pickle from a database is code execution.
    Raises ``TypeError`` for a non-array and ``ValueError`` for an object array."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"input must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype.hasobject:
        raise ValueError(f"cannot store an object array (dtype {array.dtype})")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
