"""KServe v2 HTTP bodies with Triton's binary tensor extension.

A body is a JSON header, optionally followed by raw tensors in the order of the JSON's inputs
(``Inference-Header-Content-Length`` gives the JSON's size). Every length and shape here comes from
an untrusted client, so each is checked before it is used and every failure is an ``InvalidInput``.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from bastion.gateway.errors import InvalidInput, PayloadTooLarge
from bastion.gateway.protocol.bounds import Limits, RawInput, check_bound
from bastion.gateway.protocol.budget import checkpoint
from bastion.gateway.protocol.content_encoding import decompress
from bastion.gateway.protocol.dtypes import BY_V2, DType
from bastion.gateway.protocol.types import InferRequest, InferResponse, InputTensor, RequestedOutput

MAX_RANK = 16
_U32 = struct.Struct("<I")


_CHECK_EVERY = 4096  # elements between two decode-budget checkpoints


def decode_infer_body(
    body: bytes | bytearray,
    header_length: str | None,
    content_encoding: str | None,
    limits: Limits,
    raw: RawInput | None = None,
) -> InferRequest:
    """An HTTP infer body as it arrives: maybe compressed, maybe with binary tensors."""
    return decode_request(
        decompress(body, content_encoding, limits.max_body_bytes), header_length, limits, raw
    )


def decode_request(
    body: bytes | bytearray, header_length: str | None, limits: Limits, raw: RawInput | None = None
) -> InferRequest:
    """Parses an infer request body; ``raw`` describes the model's only input for raw bodies."""
    json_size = _json_size(header_length, len(body), limits)
    if json_size == 0:
        return _raw_request(body, raw, limits)
    json_part = body[:json_size]
    if limits.max_json_tokens and _tokens(json_part) > limits.max_json_tokens:
        # orjson would build every value the client wrote, GIL held, before any check
        raise InvalidInput(
            "request JSON holds more values than the model's inputs can take "
            f"(at most {limits.max_json_tokens} commas and brackets)"
        )
    try:
        header = parse_json_object(json_part)
    except InvalidInput as exc:
        if header_length is None:  # likely binary tensors sent without their header
            raise InvalidInput(
                "a body with binary tensors needs the Inference-Header-Content-Length header "
                f"(the JSON part's size in bytes); without it the body is read as JSON: "
                f"{exc.message}"
            ) from None
        raise
    binary = memoryview(body)[json_size:]
    inputs, used = _decode_inputs(header.get("inputs"), binary, limits)
    if used != len(binary):
        raise InvalidInput(
            f"body has {len(binary) - used} bytes after the binary inputs "
            f"(binary_data_size values add up to {used})"
        )
    params = _dict(header.get("parameters", {}), "request parameters")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("request 'id' must be a string")
    if request_id is not None and len(request_id) > limits.max_request_id_chars:
        raise InvalidInput(
            f"request 'id' has {len(request_id)} characters, over the limit of "
            f"{limits.max_request_id_chars}"
        )
    return InferRequest(
        inputs=inputs,
        outputs=_decode_outputs(header.get("outputs")),
        id=request_id,
        binary_output=_bool(params.get("binary_data_output", False), "binary_data_output"),
        timeout_us=_optional_uint(params.get("timeout"), "timeout"),
        parameters=params,
    )


def _json_size(header_length: str | None, body_size: int, limits: Limits) -> int | None:
    if header_length is None:
        size = body_size
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length!r} is not an integer"
            ) from None
        if not 0 <= size <= body_size:
            raise InvalidInput(
                f"Inference-Header-Content-Length {size} is outside the body's {body_size} bytes"
            )
    if size > limits.max_json_bytes:
        raise PayloadTooLarge(f"JSON header of {size} bytes exceeds {limits.max_json_bytes}")
    return size


def parse_json_object(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request JSON is malformed: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("request JSON must be an object")
    return header


def _raw_request(body: bytes, raw: RawInput | None, limits: Limits) -> InferRequest:
    if raw is None:
        raise InvalidInput("a raw binary body (header length 0) needs a model with one input")
    shape = (1, *raw.dims)
    dtype = BY_V2[raw.datatype]
    tensor, _ = binary_tensor(raw.name, dtype, shape, len(body), memoryview(body), limits)
    return InferRequest(inputs=[tensor], binary_output=True)


def _decode_inputs(specs: Any, binary: memoryview, limits: Limits) -> tuple[list[InputTensor], int]:
    if not isinstance(specs, list) or not specs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    offset = 0
    for item in specs:
        spec, name = _named(item, "input", seen)
        dtype = parse_dtype(spec.get("datatype"), name)
        shape = parse_shape(spec.get("shape"), name, limits)
        check_bound(name, dtype.v2, shape, limits)
        params = _dict(spec.get("parameters", {}), f"parameters of input {name!r}")
        if "binary_data_size" in params:
            if "data" in spec:
                raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
            size = _uint(params["binary_data_size"], "binary_data_size")
            tensor, size = binary_tensor(name, dtype, shape, size, binary[offset:], limits)
            offset += size
        else:
            if "data" not in spec:
                raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
            tensor = InputTensor(
                name, dtype.v2, shape, _json_tensor(spec["data"], dtype, shape, name)
            )
        tensor.parameters = params
        inputs.append(tensor)
    return inputs, offset


def binary_tensor(
    name: str,
    dtype: DType,
    shape: tuple[int, ...],
    size: int,
    buf: memoryview,
    limits: Limits,
) -> tuple[InputTensor, int]:
    if size > len(buf):
        raise InvalidInput(
            f"input {name!r}: binary_data_size {size} but only {len(buf)} bytes remain in the body"
        )
    count = math.prod(shape)
    chunk = buf[:size]
    if dtype.numpy is None:
        data = _split_bytes(chunk, count, name)
    else:
        expected = count * dtype.numpy.itemsize
        if size != expected:
            raise InvalidInput(
                f"input {name!r}: {size} bytes of data, but shape {list(shape)} of "
                f"{dtype.v2} needs {expected}"
            )
        data = np.frombuffer(chunk, dtype=dtype.numpy, count=count).reshape(shape)
    return InputTensor(name, dtype.v2, shape, data), size


def _split_bytes(chunk: memoryview, count: int, name: str) -> np.ndarray:
    """Splits Triton's BYTES serialisation: each element a 4-byte LE length, then bytes."""
    pos, end = 0, len(chunk)
    if 4 * count > end:  # before allocating: every element needs its 4-byte length
        raise InvalidInput(
            f"input {name!r}: {count} BYTES elements need at least {4 * count} bytes, "
            f"{end} were given"
        )
    items = np.empty(count, dtype=object)
    for i in range(count):
        if i % _CHECK_EVERY == 0:
            checkpoint()
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES element {i} is missing its length prefix")
        (length,) = _U32.unpack_from(chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(
                f"input {name!r}: BYTES element {i} claims {length} bytes, {end - pos} remain"
            )
        items[i] = bytes(chunk[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInput(f"input {name!r}: {end - pos} bytes left after {count} BYTES elements")
    return items


_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def _json_tensor(data: Any, dtype: DType, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if dtype.numpy is None:
        items = _flatten_strings(data, name)
        if len(items) != count:
            raise InvalidInput(f"input {name!r} has {len(items)} values, shape needs {count}")
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    if not isinstance(data, list) or len(data) not in (count, shape[0] if shape else 1):
        # before np.asarray, which would build whatever the client nested, GIL held
        raise InvalidInput(
            f"input {name!r}: 'data' must be a list of {count} values or nested to {list(shape)}"
        )
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: 'data' is not a regular array of numbers") from None
    if arr.size and arr.dtype.kind == "f" and dtype.numpy.kind in "iu":
        arr = _big_integers(data, dtype, name)
    if arr.size and arr.dtype.kind not in _KINDS[dtype.numpy.kind]:
        raise InvalidInput(f"input {name!r}: 'data' holds values that are not {dtype.v2}")
    if arr.size != count:
        raise InvalidInput(
            f"input {name!r} has {arr.size} values, shape {list(shape)} needs {count}"
        )
    if dtype.numpy.kind in "iu" and arr.size:
        info = np.iinfo(dtype.numpy)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input {name!r}: values out of range for {dtype.v2}")
    return arr.astype(dtype.numpy).reshape(shape)


def _big_integers(data: Any, dtype: DType, name: str) -> np.ndarray:
    """Integers numpy promoted to float64 (a UINT64 above 2⁶³ beside small ones) stay exact."""
    values = np.asarray(data, dtype=object)
    if not all(type(v) is int for v in values.flat):
        raise InvalidInput(f"input {name!r}: 'data' holds values that are not {dtype.v2}")
    info = np.iinfo(dtype.numpy)
    if values.size and (min(values.flat) < info.min or max(values.flat) > info.max):
        raise InvalidInput(f"input {name!r}: values out of range for {dtype.v2}")
    return values.astype(dtype.numpy)


def _flatten_strings(data: Any, name: str) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode())
            if len(out) % _CHECK_EVERY == 0:
                checkpoint()
        else:
            raise InvalidInput(f"input {name!r}: BYTES data in JSON must be strings")
    return out


def _decode_outputs(specs: Any) -> list[RequestedOutput] | None:
    """The requested outputs; none (absent or ``[]``) means every output, as Triton answers."""
    if specs is None or specs == []:
        return None
    if not isinstance(specs, list):
        raise InvalidInput("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for item in specs:
        spec, name = _named(item, "output", seen)
        params = _dict(spec.get("parameters", {}), f"parameters of output {name!r}")
        binary = params.get("binary_data")
        outputs.append(
            RequestedOutput(
                name=name,
                binary=None if binary is None else _bool(binary, "binary_data"),
                class_count=_optional_uint(params.get("classification"), "classification") or 0,
            )
        )
    return outputs


def _named(item: Any, kind: str, seen: set[str]) -> tuple[dict[str, Any], str]:
    """An input or output entry: a JSON object with a non-empty name not seen before."""
    spec = _dict(item, f"each {kind}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"each {kind} needs a non-empty string 'name'")
    if name in seen:
        raise InvalidInput(f"{kind} {name!r} appears more than once")
    seen.add(name)
    return spec, name


def parse_dtype(value: Any, name: str) -> DType:
    dtype = BY_V2.get(value) if isinstance(value, str) else None
    if dtype is None:
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise InvalidInput(f"input {name!r}: unknown datatype {shown}; known: {sorted(BY_V2)}")
    return dtype


def parse_shape(value: Any, name: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} dims")
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise InvalidInput(f"input {name!r}: shape {value} has a non-integer dimension")
        if dim < 0:
            raise InvalidInput(f"input {name!r}: shape {value} has a negative dimension")
        if dim > limits.max_elements:  # only a zero dimension beside it keeps the count small
            raise InvalidInput(
                f"input {name!r}: a dimension of {dim} is over the limit on elements"
            )
    count = math.prod(value)
    if count > limits.max_elements:
        raise InvalidInput(
            f"input {name!r}: shape {value} has {count} elements, over the limit of "
            f"{limits.max_elements}"
        )
    return tuple(value)


def _tokens(json_part: bytes | bytearray) -> int:
    return json_part.count(b",") + json_part.count(b"[") + json_part.count(b"{")


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {what!r} must be true or false")
    return value


def _optional_uint(value: Any, what: str) -> int | None:
    return None if value is None else _uint(value, what)


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"parameter {what!r} must be a non-negative integer")
    return value


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Returns the body and, when binary outputs follow the JSON, the JSON's length."""
    blobs: list[bytes] = []
    outputs = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            blob = tensor_bytes(out.data, out.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.datatype == "BYTES":
            entry["data"] = [item.decode(errors="replace") for item in out.data.ravel()]
        else:
            entry["data"] = np.ascontiguousarray(out.data).ravel()
        outputs.append(entry)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs
    js = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return js, None
    return b"".join([js, *blobs]), len(js)


def tensor_bytes(data: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(_U32.pack(len(item)) + item for item in data.ravel())
    return np.ascontiguousarray(data, dtype=BY_V2[datatype].numpy).tobytes()
