"""The gRPC port's bounds against hostile callers: malformed and oversized messages, compression
bombs, calls that send nothing, and each model's own size limit."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import ServerProcess, start_server
from tests.e2e.test_grpc import digits, tensor

pytestmark = pytest.mark.e2e


def request_bytes(**fields: object) -> bytes:
    return pb.ModelInferRequest(**fields).SerializeToString()


def _hostile() -> list[tuple[str, bytes, grpc.StatusCode, str]]:
    def message(
        shape: list[int], raw: bytes | None = None, datatype: str = "FP32", **extra
    ) -> bytes:
        m = pb.ModelInferRequest(model_name=extra.pop("model", "digits"), **extra)
        m.inputs.add(name="images", datatype=datatype, shape=shape)
        if raw is not None:
            m.raw_input_contents.append(raw)
        return m.SerializeToString()

    typed_int8 = pb.ModelInferRequest(model_name="digits")
    typed_int8.inputs.add(name="images", datatype="INT8", shape=[1]).contents.int_contents.append(
        300
    )
    both = pb.ModelInferRequest(model_name="digits")
    both.inputs.add(name="images", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    both.raw_input_contents.append(b"\0" * 4)
    twice = pb.ModelInferRequest(model_name="digits")
    twice.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    twice.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    twice.raw_input_contents.extend([b"\0" * 3136] * 2)
    no_value = pb.ModelInferRequest(model_name="digits")
    no_value.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    no_value.raw_input_contents.append(b"\0" * 3136)
    no_value.parameters["timeout"].CopyFrom(pb.InferParameter())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("garbage", b"\xff\xff\xff\xff\x0f", invalid, "not a ModelInferRequest"),
        ("no-inputs", request_bytes(model_name="digits"), invalid, "at least one input"),
        ("unknown-model", message([1], model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        ("short-raw", message([1, 1, 28, 28], b"\0" * 10), invalid, "needs 3136"),
        ("negative-dim", message([-1, 1, 28, 28], b""), invalid, "negative dimension"),
        ("huge-shape", message([1 << 40, 1 << 20], b""), invalid, "elements"),
        ("over-batch", message([65, 1, 28, 28], b""), invalid, "batch size 65"),
        ("unknown-dtype", message([1], b"\0", datatype="FP8"), invalid, "unknown datatype"),
        ("int8-range", typed_int8.SerializeToString(), invalid, "outside"),
        ("raw-and-typed", both.SerializeToString(), invalid, "both raw and typed"),
        ("repeated-input", twice.SerializeToString(), invalid, "more than once"),
        ("empty-parameter", no_value.SerializeToString(), invalid, "has no value"),
        (
            "long-id",
            message([1, 1, 28, 28], b"\0" * 3136, id="i" * 5000),
            invalid,
            "over the limit",
        ),
        (
            "nan",
            message([1, 1, 28, 28], np.full(784, np.nan, np.float32).tobytes()),
            invalid,
            "NaN",
        ),
    ]


@pytest.mark.parametrize(
    ("body", "code", "text"), [h[1:] for h in _hostile()], ids=[h[0] for h in _hostile()]
)
def test_hostile_messages_get_a_clear_status(
    server: ServerProcess, body: bytes, code: grpc.StatusCode, text: str
) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            call(body, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()
    assert len(err.value.details()) < 1200
    assert httpx.get(f"http://{server.url}/v2/health/live", timeout=10).status_code == 200


def test_oversized_and_compression_bomb_messages_are_refused(server: ServerProcess) -> None:
    blob = b"\0" * (65 << 20)  # past max_body_bytes (64 MiB), after decompression
    message = request_bytes(model_name="digits", raw_input_contents=[blob])
    options = [("grpc.max_send_message_length", 128 << 20)]
    with grpc.insecure_channel(server.grpc_url, options=options) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for compression in (None, grpc.Compression.Gzip):
            with pytest.raises(grpc.RpcError) as err:
                call(message, timeout=60, compression=compression)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        control = channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata")
        with pytest.raises(grpc.RpcError) as err:
            control(b"x" * (200 << 10), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(gzip.compress(blob)) < 1 << 20  # the bomb really was small on the wire
    assert httpx.get(f"http://{server.url}/v2/health/live", timeout=10).status_code == 200


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "BASTION_HTTP_BODY_TIMEOUT_S": "2",
        "BASTION_GRPC_MAX_CONCURRENT_RPCS": "4",
        "BASTION_GRPC_STREAM_IDLE_TIMEOUT_S": "2",
    }
    proc = start_server(tmp_path, env=env)
    yield proc
    proc.stop()


def stalled(seconds: float) -> Iterator[bytes]:
    """A request side that sends the call's headers, then nothing for ``seconds``."""
    time.sleep(seconds)
    yield from ()


def test_calls_that_send_nothing_are_bounded_and_never_block_the_health_check(
    tight: ServerProcess,
) -> None:
    import concurrent.futures

    with grpc.insecure_channel(tight.grpc_url) as channel:
        infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as empty:  # headers, then the end: no message
            infer(iter(()), timeout=10)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # four calls hold every slot, sending nothing: each is cut after the 2 s timeout
            held = [pool.submit(infer, stalled(6), timeout=20) for _ in range(4)]
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as full:
                infer(iter([request_bytes(model_name="digits")]), timeout=10)
            assert full.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            codes = []
            for call in held:
                with pytest.raises(grpc.RpcError) as cut:
                    call.result(timeout=20)
                codes.append(cut.value.code())
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
        client = tg.InferenceServerClient(tight.grpc_url)
        assert client.infer("digits", [tensor(digits(1))]).as_numpy("logits").shape == (1, 10)
        client.close()


def test_health_watches_held_open_do_not_take_the_slots_inference_needs(
    tight: ServerProcess,
) -> None:
    """A Watch reads nothing after its request, so no idle timeout ends it: watches have their
    own few slots, and more of them than the call limit leave inference answering."""
    with grpc.insecure_channel(tight.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(8)]
        try:
            for watch in watches:  # each is open: it has sent its first status
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(3)  # past the stream idle timeout
            client = tg.InferenceServerClient(tight.grpc_url)
            probabilities = client.infer("digits", [tensor(digits(1))]).as_numpy("probabilities")
            assert probabilities.shape == (1, 10)
            client.close()
        finally:
            for watch in watches:
                watch.cancel()


def test_streams_that_send_nothing_or_go_idle_are_ended_and_free_their_slots(
    tight: ServerProcess,
) -> None:
    """Every slot taken by a stream that sends nothing, or sends one request and then
    nothing: each ends with DEADLINE_EXCEEDED (the body timeout, then the idle timeout, 2 s
    each here), and the slots serve again."""
    import concurrent.futures

    with grpc.insecure_channel(tight.grpc_url) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        x = digits(1)
        one = pb.ModelInferRequest(model_name="digits", id="first")
        one.inputs.add(name="images", datatype="FP32", shape=x.shape)
        one.raw_input_contents.append(x.tobytes())

        def then_idle(first: list[bytes]) -> Iterator[bytes]:
            yield from first
            time.sleep(8)  # well past both timeouts

        def drain(first: list[bytes]) -> tuple[list[str], grpc.StatusCode]:
            replies = []
            try:
                for reply in stream(then_idle(first), timeout=30):
                    replies.append(reply.infer_response.id)
            except grpc.RpcError as exc:
                return replies, exc.code()
            return replies, grpc.StatusCode.OK

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            held = [pool.submit(drain, [one.SerializeToString()] * (i % 2)) for i in range(4)]
            outcomes = [call.result(timeout=30) for call in held]
        assert time.monotonic() - started < 7  # cut at the timeouts, not at the client's 8 s
        deadline = grpc.StatusCode.DEADLINE_EXCEEDED
        assert sorted(outcomes) == sorted([([], deadline), (["first"], deadline)] * 2)
        client = tg.InferenceServerClient(tight.grpc_url)
        assert client.infer("digits", [tensor(x)]).as_numpy("logits").shape == (1, 10)
        client.close()


def test_a_message_over_the_models_own_limit_is_refused_as_over_http(
    server: ServerProcess,
) -> None:
    x = digits(1)
    message = pb.ModelInferRequest(model_name="digits")
    message.inputs.add(name="images", datatype="FP32", shape=x.shape)
    message.raw_input_contents.append(x.tobytes())
    message.parameters["padding"].string_param = "x" * (3 << 20)  # over digits' 1.6 MB
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(message, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC's own limit is the largest model's body limit; each model's own is checked after
    assert "larger than max" in err.value.details() or "for this model" in err.value.details()
