"""The v2 body codec: round trips with tritonclient's own encoder, and hostile bodies."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as th
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.gateway.errors import InvalidInput, PayloadTooLarge
from bastion.gateway.protocol.bounds import InputBound, Limits, RawInput
from bastion.gateway.protocol.codec import decode_infer_body, decode_request, encode_response
from bastion.gateway.protocol.content_encoding import compress, decompress
from bastion.gateway.protocol.dtypes import from_numpy
from bastion.gateway.protocol.types import InferResponse, OutputTensor

LIMITS = Limits()
NUMERIC = st.sampled_from(
    [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64,
     np.float16, np.float32, np.float64, np.bool_]
)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)


def client_body(array: np.ndarray, binary: bool, name: str = "x") -> tuple[bytes, str | None]:
    """The exact body tritonclient.http sends for one input."""
    tensor = th.InferInput(name, list(array.shape), from_numpy(array.dtype).v2)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, json_size = th.InferenceServerClient.generate_request_body([tensor])
    return body, None if json_size is None else str(json_size)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), binary=st.booleans())
def test_numeric_tensor_from_tritonclient_decodes_to_the_same_array(
    data: st.DataObject, binary: bool
) -> None:
    dtype = np.dtype(data.draw(NUMERIC))
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    array = data.draw(hnp.arrays(dtype, SHAPES, elements=elements))
    body, length = client_body(array, binary)
    request = decode_request(body, length, LIMITS)
    decoded = request.inputs[0]
    assert decoded.shape == array.shape
    assert decoded.datatype == from_numpy(dtype).v2
    if dtype.kind == "f" and not binary:
        np.testing.assert_allclose(decoded.data, array, rtol=1e-3 if dtype.itemsize == 2 else 1e-6)
    else:
        np.testing.assert_array_equal(decoded.data, array)


@settings(max_examples=40, deadline=None)
@given(items=st.lists(st.binary(max_size=20), min_size=1, max_size=6))
def test_bytes_tensor_from_tritonclient_decodes_to_the_same_elements(items: list[bytes]) -> None:
    array = np.array(items, dtype=np.object_)
    request = decode_request(*client_body(array, binary=True), LIMITS)
    assert list(request.inputs[0].data) == items


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(np.float32, SHAPES, elements=st.floats(-1e6, 1e6, width=32)),
    binary=st.booleans(),
    encoding=st.sampled_from([None, "gzip", "deflate"]),
)
def test_response_parses_with_tritonclient(
    array: np.ndarray, binary: bool, encoding: str | None
) -> None:
    response = InferResponse("m", "1", [OutputTensor("y", "FP32", array, binary)], id="r-1")
    body, json_size = encode_response(response)
    body, used = compress(body, encoding)
    result = th.InferenceServerClient.parse_response_body(
        body, header_length=json_size, content_encoding=used
    )
    assert result.get_response()["id"] == "r-1"
    np.testing.assert_array_equal(result.as_numpy("y"), array)


def test_bytes_output_parses_with_tritonclient() -> None:
    data = np.array([[b"0.9:1:one", b"0.1:0:zero"]], dtype=object)
    body, size = encode_response(InferResponse("m", "1", [OutputTensor("c", "BYTES", data, True)]))
    result = th.InferenceServerClient.parse_response_body(body, header_length=size)
    assert result.as_numpy("c").tolist() == data.tolist()


def test_request_id_parameters_and_outputs_are_read() -> None:
    tensor = th.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    outputs = [th.InferRequestedOutput("y", class_count=3), th.InferRequestedOutput("z")]
    body, size = th.InferenceServerClient.generate_request_body(
        [tensor], outputs, request_id="abc", timeout=500
    )
    request = decode_request(body, str(size), LIMITS)
    assert request.id == "abc"
    assert request.timeout_us == 500
    assert [(o.name, o.class_count, o.binary) for o in request.outputs or []] == [
        ("y", 3, True), ("z", 0, True),
    ]


def test_raw_body_with_zero_header_length_is_the_models_only_input() -> None:
    pixels = np.random.default_rng(0).random((1, 1, 4, 4), dtype=np.float32)
    raw = RawInput("images", "FP32", (1, 4, 4))
    request = decode_request(pixels.tobytes(), "0", LIMITS, raw)
    np.testing.assert_array_equal(request.inputs[0].data, pixels)
    assert request.binary_output
    with pytest.raises(InvalidInput, match="one input"):
        decode_request(pixels.tobytes(), "0", LIMITS, None)


def test_gzip_and_deflate_bodies_are_accepted() -> None:
    body, size = client_body(np.arange(6, dtype=np.float32).reshape(2, 3), binary=True)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        request = decode_infer_body(packed, size, encoding, LIMITS)
        assert request.inputs[0].data.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_decompression_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (4 << 20))
    with pytest.raises(PayloadTooLarge):
        decompress(bomb, "gzip", limit=1 << 20)
    with pytest.raises(InvalidInput, match="truncated"):
        decompress(gzip.compress(b"x" * 100)[:-12], "gzip", limit=1 << 20)
    with pytest.raises(InvalidInput, match="Content-Encoding"):
        decompress(b"abc", "br", limit=100)


def js(header: object, binary: bytes = b"") -> tuple[bytes, str]:
    text = orjson.dumps(header)
    return text + binary, str(len(text))


def one_input(**fields: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], **fields}]}


HOSTILE = {
    "header length not a number": ((b"{}", "abc"), "not an integer"),
    "header length beyond body": ((b"{}", "99"), "outside the body"),
    "header length negative": ((b"{}", "-1"), "outside the body"),
    "not JSON": ((b"{not json", None), "malformed"),
    "JSON not an object": ((b"[1, 2]", None), "must be an object"),
    "deep JSON": ((b"[" * 5000 + b"]" * 5000, None), "malformed"),
    "no inputs": (js({"inputs": []}), "non-empty 'inputs'"),
    "negative dims": (js(one_input(shape=[1, -2], data=[1, 2])), "negative dimension"),
    "element count overflow": (
        js(one_input(shape=[2**31, 2**31, 2**31], data=[1])), "over the limit"
    ),
    "a zero dim beside huge ones": (
        js(one_input(shape=[1, 0, 2**62, 2**62], data=[])), "a dimension of .* over the limit"
    ),
    "non-integer dims": (js(one_input(shape=[1, "2"], data=[1, 2])), "non-integer"),
    "data length differs from shape": (js(one_input(data=[1, 2, 3])), "a list of 2 values"),
    "ragged data": (js(one_input(data=[[1], [2, 3]])), "regular array"),
    "strings for numbers": (js(one_input(data=["1", "2"])), "not FP32"),
    "unknown datatype": (js(one_input(datatype="FP128", data=[1, 2])), "unknown datatype"),
    "duplicate input names": (
        js({"inputs": [one_input(data=[1, 2])["inputs"][0]] * 2}), "more than once"  # type: ignore[index]
    ),
    "duplicate output names": (
        js({**one_input(data=[1, 2]), "outputs": [{"name": "y"}, {"name": "y"}]}),
        "more than once",
    ),
    "binary size mismatch": (
        js(one_input(parameters={"binary_data_size": 4}), b"\0" * 4), "needs 8"
    ),
    "truncated binary": (
        js(one_input(parameters={"binary_data_size": 8}), b"\0" * 5), "only 5 bytes remain"
    ),
    "trailing bytes": (js(one_input(data=[1, 2]), b"junk"), "after the binary inputs"),
    "both data and binary": (
        js(one_input(data=[1, 2], parameters={"binary_data_size": 8}), b"\0" * 8), "both"
    ),
    "uint8 out of range": (
        js({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, 300]}]}),
        "out of range",
    ),
    "bad bytes length prefix": (
        js(
            {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                         "parameters": {"binary_data_size": 6}}]},
            struct.pack("<I", 1000) + b"ab",
        ),
        "claims 1000 bytes",
    ),
    "bytes prefix cut short": (
        js(
            {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
                         "parameters": {"binary_data_size": 7}}]},
            struct.pack("<I", 1) + b"a" + b"\0\0",
        ),
        "2 BYTES elements need at least 8 bytes",
    ),
    "negative timeout": (js({**one_input(data=[1, 2]), "parameters": {"timeout": -5}}), "timeout"),
    "id not a string": (js({**one_input(data=[1, 2]), "id": 5}), "'id' must be a string"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_body_is_rejected_with_a_clear_message(case: str) -> None:
    (body, length), message = HOSTILE[case]
    with pytest.raises(InvalidInput, match=message):
        decode_request(body, length, LIMITS)


def test_oversized_json_header_is_refused() -> None:
    body, length = js(one_input(data=[1, 2]))
    with pytest.raises(PayloadTooLarge):
        decode_request(body, length, Limits(max_json_bytes=10))


def test_json_uint64_above_int64_range_decodes_exactly() -> None:
    array = np.array([2**63, 0], dtype=np.uint64)
    body, size = client_body(array, binary=False)
    (tensor,) = decode_request(body, size, LIMITS).inputs
    np.testing.assert_array_equal(tensor.data, array)


BOUNDED = Limits(
    inputs={"images": InputBound("FP32", max_rows=64, max_elements=64 * 784)},
    max_request_id_chars=16,
)


def binary_header(name: str, datatype: str, shape: list[int], size: object) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                     "parameters": {"binary_data_size": size}}]}
    )


@pytest.mark.parametrize(
    ("datatype", "shape", "message"),
    [
        ("BYTES", [16_000_000], "batch size 16000000 is outside 1..64"),
        ("BYTES", [64, 2], "at most 64 per request"),
        ("FP32", [65, 1, 28, 28], "batch size 65 is outside 1..64"),
        ("FP32", [1, 1, 28, 28 * 65], "at most 50176 per request"),
    ],
)
def test_a_tensor_larger_than_the_model_takes_is_refused_before_its_data_is_read(
    datatype: str, shape: list[int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bastion.gateway.protocol.codec as codec

    def must_not_split(*args: object) -> None:
        raise AssertionError("BYTES data was split before the element count was checked")

    monkeypatch.setattr(codec, "_split_bytes", must_not_split)
    header = binary_header("images", datatype, shape, 0)
    with pytest.raises(InvalidInput, match=message):
        decode_request(header, str(len(header)), BOUNDED)


def test_a_binary_data_size_of_null_is_an_invalid_input_not_a_crash() -> None:
    header = binary_header("images", "FP32", [1, 1, 28, 28], None)
    with pytest.raises(InvalidInput, match="binary_data_size"):
        decode_request(header, str(len(header)), BOUNDED)


def test_a_request_id_over_the_limit_is_refused() -> None:
    body = orjson.dumps({"id": "x" * 17, "inputs": [
        {"name": "images", "datatype": "FP32", "shape": [1], "data": [0.5]}]})
    with pytest.raises(InvalidInput, match="over the limit of 16"):
        decode_request(body, None, BOUNDED)


def test_splitting_bytes_elements_stops_at_the_decode_budget() -> None:
    import time

    from bastion.gateway.protocol.budget import budget

    count = 10_000
    raw = struct.pack("<I", 0) * count
    header = binary_header("s", "BYTES", [count], len(raw))
    with budget(time.monotonic() - 1, 5), pytest.raises(PayloadTooLarge, match="decode budget"):
        decode_request(header + raw, str(len(header)), LIMITS)
