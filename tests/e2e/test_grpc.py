"""The real server's KServe v2 gRPC port driven by the unchanged ``tritonclient.grpc``, and by a
raw gRPC channel for what tritonclient would never send."""

from __future__ import annotations

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

from bastion.models.data import load_split, to_float
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
    client.async_stream_infer(
        "digits", [tensor(x)], request_id="last", enable_empty_final_response=True
    )
    got = [answers.get(timeout=60) for _ in range(22)]
    client.stop_stream()
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [e.message() for r, e in got if e is not None]
    assert ids == sorted([*(f"s{i}" for i in range(20)), "last"])  # open past the error
    assert len(errors) == 1 and "NaN" in errors[0]
    # as Triton answers a model that is not decoupled: the one answer carries the final flag,
    # only when asked for
    final = {
        r.get_response().id: r.get_response().parameters["triton_final_response"].bool_param
        for r, e in got
        if e is None and "triton_final_response" in r.get_response().parameters
    }
    assert final == {"last": True}
    last = next(r for r, e in got if e is None and r.get_response().id == "last")
    assert last.as_numpy("probabilities").shape == (1, 10)


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
                    "data": digits(2, 2).ravel().tolist(),  # other pictures, another client
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
