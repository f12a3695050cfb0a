"""gRPC messages to requests and back: typed and raw contents, bounds, and status details."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from tritonclient.grpc import InferResult
from tritonclient.grpc import service_pb2 as pb

from bastion.gateway.errors import (
    Blocked,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from bastion.gateway.protocol.bounds import InputBound, Limits
from bastion.gateway.protocol.codec import tensor_bytes
from bastion.gateway.protocol.grpc_codec import to_infer_request, to_infer_response
from bastion.gateway.protocol.types import InferResponse, OutputTensor
from bastion.gateway.rpc.status import to_status

LIMITS = Limits(inputs={"x": InputBound("INT16", 4, 16)})


def typed(datatype: str, field: str, values: list, shape: list[int]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return message


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("INT16", "int_contents", [-3, 7], np.int16),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("INT64", "int64_contents", [-(1 << 40), 5], np.int64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("FP64", "fp64_contents", [0.5, -1.25], np.float64),
    ],
)
def test_typed_contents_keep_their_values_and_datatype(datatype, field, values, dtype) -> None:
    limits = Limits(inputs={"x": InputBound(datatype, 4, 16)})
    request = to_infer_request(typed(datatype, field, values, [2]), limits)
    data = request.inputs[0].data
    assert data.dtype == dtype and data.tolist() == values


def test_bytes_contents_are_an_object_array() -> None:
    limits = Limits(inputs={"x": InputBound("BYTES", 4, 4)})
    request = to_infer_request(typed("BYTES", "bytes_contents", [b"a", b"\0b"], [1, 2]), limits)
    assert request.inputs[0].data.shape == (1, 2) and request.inputs[0].data[0, 1] == b"\0b"


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (typed("INT16", "int_contents", [40000], [1]), "outside"),
        (typed("INT16", "int_contents", [1, 2, 3], [2]), "needs 2"),
        (typed("INT16", "fp32_contents", [1.0], [1]), "takes int_contents"),
        (typed("INT16", "int_contents", [1] * 5, [5]), "batch size 5"),
        (typed("FP16", "fp32_contents", [1.0], [1]), "no typed contents"),
        (
            typed("INT16", "int_contents", [], [1, 0, 2**62, 2**62]),
            "a dimension of .* over the limit",
        ),
    ],
)
def test_bad_typed_contents_are_invalid(message: pb.ModelInferRequest, text: str) -> None:
    limits = LIMITS if message.inputs[0].datatype == "INT16" else Limits()
    with pytest.raises(InvalidInput, match=text):
        to_infer_request(message, limits)


def test_raw_contents_must_cover_every_input_and_parameters_are_plain_values() -> None:
    message = pb.ModelInferRequest(model_name="m", id="r")
    message.inputs.add(name="a", datatype="INT32", shape=[1])
    message.inputs.add(name="b", datatype="INT32", shape=[1])
    message.raw_input_contents.append(np.int32(3).tobytes())
    with pytest.raises(InvalidInput, match="every input or for none"):
        to_infer_request(message, Limits())
    message.raw_input_contents.append(np.int32(4).tobytes())
    message.parameters["timeout"].int64_param = 5000
    message.parameters["screening_report"].bool_param = True
    out = message.outputs.add(name="y")
    out.parameters["classification"].int64_param = 3
    request = to_infer_request(message, Limits())
    assert [int(t.data[0]) for t in request.inputs] == [3, 4] and request.id == "r"
    assert request.timeout_us == 5000 and request.parameters["screening_report"] is True
    assert request.outputs is not None and request.outputs[0].class_count == 3
    message.parameters["timeout"].string_param = "soon"
    with pytest.raises(InvalidInput, match="timeout"):
        to_infer_request(message, Limits())


def test_a_response_reads_back_through_tritonclient() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    labels = np.array([b"1:0", b"0.5:2"], dtype=object).reshape(2, 1)
    response = InferResponse(
        "m",
        "1",
        [OutputTensor("logits", "FP32", logits), OutputTensor("top", "BYTES", labels)],
        id="q",
        parameters={"screening_flagged": "1"},
    )
    message = to_infer_response(response)
    assert message.raw_output_contents[1] == tensor_bytes(labels, "BYTES")
    result = InferResult(pb.ModelInferResponse.FromString(message.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert result.as_numpy("top").tolist() == labels.tolist()
    assert result.get_response().parameters["screening_flagged"].string_param == "1"


def details(status: grpc.Status) -> status_pb2.Status:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def test_errors_map_to_tritons_codes_with_the_http_bodys_details() -> None:
    assert to_status(NotFound("no")).code == grpc.StatusCode.NOT_FOUND
    assert to_status(Unavailable("full")).code == grpc.StatusCode.UNAVAILABLE
    assert to_status(InvalidInput("x" * 5000)).details.endswith("(truncated)")
    blocked = to_status(Blocked("withheld", {"reason": "adversarial", "withheld": [0, 2]}))
    assert blocked.code == grpc.StatusCode.PERMISSION_DENIED
    info = error_details_pb2.ErrorInfo()
    assert details(blocked).details[0].Unpack(info)
    assert info.reason == "ADVERSARIAL" and dict(info.metadata)["withheld"] == "[0,2]"
    keyless = to_status(
        Unauthorized("a valid client key is required: 'Authorization: Bearer <key>'")
    )
    assert "metadata 'authorization: Bearer <key>'" in keyless.details  # gRPC's lower-case key
    throttled = to_status(TooManyRequests("slow down", 7))
    assert throttled.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert details(throttled).details[0].Unpack(retry) and retry.retry_delay.seconds == 7


def test_a_boolean_timeout_is_refused() -> None:
    message = typed("INT16", "int_contents", [1], [1])
    message.parameters["timeout"].bool_param = True
    with pytest.raises(InvalidInput, match="timeout"):
        to_infer_request(message, LIMITS)
