"""Validates a decoded request against the model's inputs and builds its rows of the batch.

Done per request, before batching, so that one bad request fails alone. Image models (config
parameter ``input_range: "0,1"``) also take UINT8 pixels (scaled by 1/255) and BYTES holding
PNG/JPEG images, and reject FP32 values outside [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bastion.gateway.errors import InvalidInput
from bastion.gateway.protocol.dtypes import BY_V2
from bastion.gateway.protocol.images import decode_images
from bastion.gateway.protocol.types import InferRequest, InputTensor
from bastion.gateway.repository import ModelConfig, TensorSpec


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def prepare_inputs(
    config: ModelConfig, request: InferRequest, limits: ImageLimits
) -> tuple[dict[str, np.ndarray], int]:
    """Returns the model-ready arrays (batch axis first) and the request's row count."""
    given = {t.name: t for t in request.inputs}
    expected = {spec.name for spec in config.inputs}
    unknown = sorted(set(given) - expected)
    if unknown:
        raise InvalidInput(
            f"model {config.name!r} has no input {unknown[0]!r}; its inputs are {sorted(expected)}"
        )
    image_model = config.parameters.get("input_range") == "0,1"
    arrays: dict[str, np.ndarray] = {}
    rows: int | None = None
    for spec in config.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise InvalidInput(f"model {config.name!r} needs input {spec.name!r}")
        array = _convert(tensor, spec, config.max_batch_size, image_model, limits)
        if rows is not None and array.shape[0] != rows:
            raise InvalidInput(f"inputs have different batch sizes ({rows} and {array.shape[0]})")
        rows = array.shape[0]
        arrays[spec.name] = array
    assert rows is not None
    return arrays, rows


def _convert(
    tensor: InputTensor, spec: TensorSpec, max_batch: int, image_model: bool, limits: ImageLimits
) -> np.ndarray:
    if tensor.datatype == "BYTES" and spec.datatype != "BYTES":
        if not image_model:
            raise InvalidInput(f"input {spec.name!r} takes {spec.datatype}, not encoded images")
        _check_rows(tensor.shape[0] if tensor.shape else 0, spec.name, max_batch)
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidInput(f"input {spec.name!r}: encoded images need shape [n] or [n, 1]")
        pixels = decode_images(
            tensor.data.ravel(), spec.dims, limits.max_bytes, limits.max_pixels, spec.name
        )
        return _scale_uint8(pixels, spec)
    _check_shape(tensor, spec, max_batch)
    if tensor.datatype == spec.datatype:
        array = tensor.data
    elif image_model and tensor.datatype == "UINT8" and spec.datatype in ("FP32", "FP16"):
        return _scale_uint8(tensor.data, spec)
    else:
        raise InvalidInput(
            f"input {spec.name!r} has datatype {tensor.datatype}, the model expects {spec.datatype}"
        )
    if array.dtype.kind == "f" and array.size:
        _check_values(array, spec.name, image_model)
    return np.ascontiguousarray(array)


def _check_values(array: np.ndarray, name: str, image_model: bool) -> None:
    # NaN fails every comparison, so one min/max pass covers NaN, Inf and the pixel range
    low, high = array.min(), array.max()
    if image_model and low >= 0.0 and high <= 1.0:
        return
    if not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or Inf")
    if image_model:
        raise InvalidInput(f"input {name!r}: pixel values must lie in [0, 1]")


def _scale_uint8(pixels: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return pixels.astype(BY_V2[spec.datatype].numpy) * np.float32(1.0 / 255.0)


def _check_rows(rows: int, name: str, max_batch: int) -> None:
    if not 1 <= rows <= max_batch:
        raise InvalidInput(f"input {name!r}: batch size {rows} is outside 1..{max_batch}")


def _check_shape(tensor: InputTensor, spec: TensorSpec, max_batch: int) -> None:
    shape = tensor.shape
    wanted = ["-1", *map(str, spec.dims)]
    if len(shape) != len(spec.dims) + 1 or any(
        d != w and w != -1 for d, w in zip(shape[1:], spec.dims, strict=True)
    ):
        raise InvalidInput(
            f"input {spec.name!r} has shape {list(shape)}, the model expects [{', '.join(wanted)}]"
        )
    _check_rows(shape[0], spec.name, max_batch)
