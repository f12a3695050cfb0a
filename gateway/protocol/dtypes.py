"""One table of tensor datatypes; every other mapping is derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    v2: str  # KServe v2 / Triton wire name
    config: str  # Triton model-config enum name
    numpy: np.dtype | None  # None for BYTES (variable length)


_TABLE = (
    DType("BOOL", "TYPE_BOOL", np.dtype(np.bool_)),
    DType("UINT8", "TYPE_UINT8", np.dtype("<u1")),
    DType("UINT16", "TYPE_UINT16", np.dtype("<u2")),
    DType("UINT32", "TYPE_UINT32", np.dtype("<u4")),
    DType("UINT64", "TYPE_UINT64", np.dtype("<u8")),
    DType("INT8", "TYPE_INT8", np.dtype("<i1")),
    DType("INT16", "TYPE_INT16", np.dtype("<i2")),
    DType("INT32", "TYPE_INT32", np.dtype("<i4")),
    DType("INT64", "TYPE_INT64", np.dtype("<i8")),
    DType("FP16", "TYPE_FP16", np.dtype("<f2")),
    DType("FP32", "TYPE_FP32", np.dtype("<f4")),
    DType("FP64", "TYPE_FP64", np.dtype("<f8")),
    DType("BYTES", "TYPE_STRING", None),
)

BY_V2: dict[str, DType] = {d.v2: d for d in _TABLE}
BY_CONFIG: dict[str, DType] = {d.config: d for d in _TABLE}
BY_NUMPY: dict[np.dtype, DType] = {d.numpy: d for d in _TABLE if d.numpy is not None}


def from_numpy(dtype: np.dtype) -> DType:
    if dtype.kind in "OSU":
        return BY_V2["BYTES"]
    return BY_NUMPY[dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype]
