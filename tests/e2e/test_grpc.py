"""The real server's KServe v2 gRPC port driven by the unchanged ``tritonclient.grpc``, and by a
raw gRPC channel for what tritonclient would never send."""

from __future__ import annotations

import gzip
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from models.data import load_split, to_float
from tests.conftest import ServerProcess, flag_every_image, start_server
from tests.e2e.test_tritonclient import delayed_batching_server

pytestmark = pytest.mark.e2e
ADMIN = {"authorization": "Bearer s3cret"}


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(
        server.grpc_url, options=[("grpc.max_send_message_length", 128 << 20)]
    )
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def digits(n: int, start: int = 0) -> np.ndarray:
    return to_float(load_split("test")[0][start : start + n])


def tensor(x: np.ndarray) -> tg.InferInput:
    t = tg.InferInput("images", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def test_every_tritonclient_grpc_call_works(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "9") and not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "bastion" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits", "1", as_json=True)
    assert model["outputs"][1] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": ["-1", "10"],
    }
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits" and config["max_batch_size"] == 64
    assert not any(k.startswith("screening") for k in config.get("parameters", {}))
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {e["name"] for e in index} >= {"digits", "digits_onnx"}
    stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert stats["name"] == "digits" and stats["version"] == "1"
    assert client.get_inference_statistics(as_json=True)["model_stats"]
    assert client.get_system_shared_memory_status(as_json=True) == {}
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("digits_onnx")
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "Bearer" in err.value.message()
    client.unload_model("digits_onnx", headers=ADMIN)
    assert not client.is_model_ready("digits_onnx")
    client.load_model("digits_onnx", headers=ADMIN)
    assert client.is_model_ready("digits_onnx")


def test_grpc_outputs_equal_http_outputs(
    server: ServerProcess, client: tg.InferenceServerClient
) -> None:
    x = digits(8, 10)
    got = client.infer("digits", [tensor(x)], request_id="g-1", headers={"x-client-id": "eq"})
    assert got.get_response().id == "g-1" and got.get_response().model_version == "1"
    http = th.InferenceServerClient(server.url)
    h_in = th.InferInput("images", list(x.shape), "FP32")
    h_in.set_data_from_numpy(x)
    want = http.infer("digits", [h_in], headers={"x-client-id": "eq"})
    for name in ("logits", "probabilities"):
        np.testing.assert_array_equal(got.as_numpy(name), want.as_numpy(name))
    onnx = client.infer("digits_onnx", [tensor(x)]).as_numpy("probabilities")
    np.testing.assert_allclose(onnx, want.as_numpy("probabilities"), atol=1e-4)
    top = tg.InferRequestedOutput("probabilities", class_count=2)
    classes = client.infer("digits", [tensor(x[:3])], outputs=[top]).as_numpy("probabilities")
    assert classes.shape == (3, 2) and classes[0, 0].decode().count(":") == 2


def test_typed_contents_are_served_like_raw_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    x = digits(2, 20)
    typed = pb.ModelInferRequest(model_name="digits", id="typed")
    typed.inputs.add(name="images", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    raw = pb.ModelInferRequest(model_name="digits")
    raw.inputs.add(name="images", datatype="FP32", shape=x.shape)
    raw.raw_input_contents.append(x.tobytes())
    a, b = stub.ModelInfer(typed, timeout=30), stub.ModelInfer(raw, timeout=30)
    assert a.id == "typed" and [o.name for o in a.outputs] == ["logits", "probabilities"]
    assert a.raw_output_contents == b.raw_output_contents


def test_async_and_streaming_inference(client: tg.InferenceServerClient) -> None:
    x = digits(1, 30)
    done: queue.Queue = queue.Queue()
    client.async_infer(
        "digits", [tensor(x)], callback=lambda result, error: done.put((result, error))
    )
    result, error = done.get(timeout=30)
    assert error is None and result.as_numpy("probabilities").shape == (1, 10)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(20):
        client.async_stream_infer("digits", [tensor(digits(1, 40 + i))], request_id=f"s{i}")
    bad = tg.InferInput("images", [1, 1, 28, 28], "FP32")
    bad.set_data_from_numpy(np.full((1, 1, 28, 28), np.nan, np.float32))
    client.async_stream_infer("digits", [bad], request_id="nan")
    got = [answers.get(timeout=60) for _ in range(21)]
    client.stop_stream()
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [e.message() for r, e in got if e is not None]
    assert ids == sorted(f"s{i}" for i in range(20))  # the stream stayed open past the error
    assert len(errors) == 1 and "NaN" in errors[0]


def test_a_stream_error_names_its_request(server: ServerProcess) -> None:
    x = np.full((1, 1, 28, 28), np.nan, np.float32)
    message = pb.ModelInferRequest(model_name="digits", id="bad-1")
    message.inputs.add(name="images", datatype="FP32", shape=x.shape)
    message.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        (reply,) = list(stub.ModelStreamInfer(iter([message]), timeout=30))
    assert "NaN" in reply.error_message
    assert reply.infer_response.id == "bad-1" and reply.infer_response.model_name == "digits"


def test_concurrent_grpc_requests_are_batched(repository: Path, tmp_path: Path) -> None:
    server = delayed_batching_server(repository, tmp_path, 200_000, 16)
    try:
        client = tg.InferenceServerClient(server.grpc_url)
        x = digits(1)
        done: queue.Queue = queue.Queue()
        for _ in range(128):
            client.async_infer(
                "digits", [tensor(x)], callback=lambda result, error: done.put(error)
            )
        assert [done.get(timeout=60) for _ in range(128)] == [None] * 128
        stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        assert int(stats["inference_count"]) == 128
        assert int(stats["execution_count"]) <= 128 / 4, stats["execution_count"]
        assert max(int(b["batch_size"]) for b in stats["batch_stats"]) >= 16
        client.close()
    finally:
        server.stop()


def test_a_deadline_is_answered_not_computed(repository: Path, tmp_path: Path) -> None:
    server = delayed_batching_server(repository, tmp_path, 3_000_000, 64)  # waits 3 s to batch
    try:
        client = tg.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [tensor(digits(1))], client_timeout=0.5)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        time.sleep(3.5)  # past the batch delay: the expired request must not have run
        stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        assert int(stats.get("inference_count", 0)) == 0
        client.close()
    finally:
        server.stop()


def test_compressed_requests_and_the_health_service(
    server: ServerProcess, client: tg.InferenceServerClient
) -> None:
    x = digits(3, 50)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("digits", [tensor(x)], compression_algorithm=algorithm)
        assert result.as_numpy("probabilities").shape == (3, 10)
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


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
def flagging(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path, "--model-repository", str(flag_every_image(repository)))
    yield proc
    proc.stop()


def test_a_withheld_input_is_refused_with_the_http_403s_details(flagging: ServerProcess) -> None:
    x = digits(2)
    raw = pb.ModelInferRequest(model_name="digits", id="w-1")
    raw.inputs.add(name="images", datatype="FP32", shape=x.shape)
    raw.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(flagging.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw, timeout=30, metadata=[("x-client-id", "grpc-w")])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(err.value)
    assert status is not None and status.message == err.value.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    body = httpx.post(
        f"http://{flagging.url}/v2/models/digits/infer",
        json={
            "id": "w-2",
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": digits(2, 2).ravel().tolist(),  # a resend would be a "repeat"
                }
            ],
        },
        headers={"x-client-id": "http-w"},
        timeout=30,
    )
    assert body.status_code == 403
    http = body.json()
    assert info.domain == "bastion" and info.reason == http["reason"].upper() == "ADVERSARIAL"
    assert set(info.metadata) == {k for k, v in http.items() if k != "error" and v is not None}
    assert info.metadata["withheld"] == "[0,1]" and info.metadata["request_id"] == "w-1"
    assert len(http["quarantine_ids"]) == len(json.loads(info.metadata["quarantine_ids"]))
    client = tg.InferenceServerClient(flagging.grpc_url)
    with pytest.raises(InferenceServerException) as terr:
        client.infer("digits", [tensor(x)])
    assert terr.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "withheld" in terr.value.message()


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"BASTION_HTTP_BODY_TIMEOUT_S": "2", "BASTION_GRPC_MAX_CONCURRENT_RPCS": "4"}
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
