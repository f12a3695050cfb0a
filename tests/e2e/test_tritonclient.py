"""The real server process driven by the unchanged ``tritonclient.http``."""

from __future__ import annotations

import gzip
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer s3cret"}
TRUNCATED_HEADER = (
    b'{"inputs":[{"name":"images","datatype":"FP32","shape":[1,1,28,28],'
    b'"parameters":{"binary_data_size":3136}}]}'
)


@pytest.fixture
def client(server: ServerProcess) -> th.InferenceServerClient:
    return th.InferenceServerClient(server.url, concurrency=8, network_timeout=60)


def infer(client: th.InferenceServerClient, x: np.ndarray, model: str = "digits",
          **kwargs: object) -> th.InferResult:
    tensor = th.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kwargs)  # type: ignore[arg-type]


def test_every_tritonclient_call_works(client: th.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "9")
    assert client.get_server_metadata()["name"] == "bastion"
    meta = client.get_model_metadata("digits", "1")
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert client.get_model_config("digits")["name"] == "digits"
    index = client.get_model_repository_index()
    assert {e["name"] for e in index} >= {"digits", "digits_onnx"}
    stats = client.get_inference_statistics("digits")["model_stats"][0]
    assert stats["name"] == "digits" and "batch_stats" in stats
    assert client.get_inference_statistics()["model_stats"]
    assert client.get_system_shared_memory_status() == []
    with pytest.raises(InferenceServerException, match="Bearer"):
        client.unload_model("digits_onnx")
    client.unload_model("digits_onnx", headers=ADMIN)
    assert not client.is_model_ready("digits_onnx")
    client.load_model("digits_onnx", headers=ADMIN)
    assert client.is_model_ready("digits_onnx")


def test_predictions_equal_the_model_called_directly(client: th.InferenceServerClient) -> None:
    images, labels = load_split("test")
    x = to_float(images[:100])
    with torch.inference_mode():
        expected = torch.softmax(load_digits()(torch.from_numpy(x)), 1).numpy()
    got, verdicts = [], []
    for start, stop in ((0, 1), (1, 8), (8, 40), (40, 100)):
        result = infer(client, x[start:stop], request_id=f"r{start}",
                       parameters={"screening_report": True}, headers=dict(ADMIN))
        got.append(result.as_numpy("probabilities"))
        verdicts += [v.decode() for v in result.as_numpy("screening_verdict")]
    probs = np.concatenate(got)
    served = np.array([not v.startswith("adversarial") for v in verdicts])  # clean, suspicious
    assert served.mean() >= 0.97  # clean test digits; about 0.5 % withheld by calibration
    np.testing.assert_allclose(probs[served], expected[served], atol=1e-5)
    assert np.isnan(probs[~served]).all()  # withheld images get no prediction
    assert (probs[served].argmax(1) == labels[:100][served]).mean() >= 0.97
    onnx = infer(client, x[:16], model="digits_onnx").as_numpy("probabilities")
    np.testing.assert_allclose(onnx, expected[:16], atol=1e-4)


def test_request_id_compression_and_classification(client: th.InferenceServerClient) -> None:
    x = to_float(load_split("test")[0][:3])
    outputs = [th.InferRequestedOutput("probabilities", class_count=2),
               th.InferRequestedOutput("logits", binary_data=False)]
    result = infer(client, x, outputs=outputs, request_id="abc-1",
                   request_compression_algorithm="gzip", response_compression_algorithm="deflate")
    assert result.get_response()["id"] == "abc-1"
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 2) and top[0, 0].decode().count(":") == 2
    assert result.as_numpy("logits").shape == (3, 10)


def delayed_batching_server(repository: Path, log_dir: Path, delay_us: int,
                            preferred: int) -> ServerProcess:
    """A server whose digits model waits up to ``delay_us`` to fill a batch of ``preferred``,
    so that queueing shows in the counters however slowly a loaded machine sends requests."""
    config = repository / "digits" / "config.pbtxt"
    text = config.read_text().replace("max_queue_delay_microseconds: 1000",
                                      f"max_queue_delay_microseconds: {delay_us}")
    config.write_text(text.replace("preferred_batch_size: [ 16, 32, 64 ]",
                                   f"preferred_batch_size: [ {preferred} ]"))
    return start_server(log_dir, "--model-repository", str(repository))


@pytest.fixture
def slow_batching_server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = delayed_batching_server(repository, tmp_path, 200_000, 16)
    yield proc
    proc.stop()


@pytest.fixture
def stalled_batching_server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = delayed_batching_server(repository, tmp_path, 5_000_000, 64)
    yield proc
    proc.stop()


def test_concurrent_requests_are_batched(slow_batching_server: ServerProcess) -> None:
    url = slow_batching_server.url
    client = th.InferenceServerClient(url, concurrency=64, network_timeout=60)
    x = to_float(load_split("test")[0][:1])
    tensor = th.InferInput("images", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    pending = [client.async_infer("digits", [tensor]) for _ in range(256)]
    results = [p.get_result(timeout=60).as_numpy("probabilities") for p in pending]
    assert all(r.shape == (1, 10) for r in results)
    stats = client.get_inference_statistics("digits")["model_stats"][0]
    assert stats["inference_count"] == 256
    assert stats["execution_count"] <= 256 / 4, stats["execution_count"]
    assert max(b["batch_size"] for b in stats["batch_stats"]) >= 16
    metrics = httpx.get(f"http://{url}/metrics", timeout=10).text
    assert 'nv_inference_count{model="digits",version="1"} 256' in metrics
    client.close()


def test_tritonclient_reports_the_servers_message(client: th.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, np.full((1, 1, 28, 28), np.nan, np.float32))
    assert err.value.status() == "400" and "NaN" in err.value.message()
    with pytest.raises(InferenceServerException, match="unknown model"):
        infer(client, np.zeros((1, 1, 28, 28), np.float32), model="nope")


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"x" * (65 << 20), {}, 413, "exceeds the limit"),
        (TRUNCATED_HEADER + b"\0" * 100,
         {"Inference-Header-Content-Length": str(len(TRUNCATED_HEADER))}, 400,
         "remain in the body"),
        (b"{}", {"Inference-Header-Content-Length": "-3"}, 400, "outside the body"),
        (gzip.compress(b"{}")[:-4], {"Content-Encoding": "gzip"}, 400, "truncated"),
        (b"\0" * 10, {"Inference-Header-Content-Length": "0"}, 400, "needs 3136"),
    ],
    ids=["oversized", "truncated-binary", "negative-header-length", "truncated-gzip", "raw-short"],
)
def test_hostile_bodies_against_the_real_server(
    server: ServerProcess, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    url = f"http://{server.url}"
    response = httpx.post(f"{url}/v2/models/digits/infer", content=body, headers=headers,
                          timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200


def test_sigterm_answers_every_accepted_request(stalled_batching_server: ServerProcess) -> None:
    """Requests queued when the server is told to stop are still answered (graceful drain)."""
    server = stalled_batching_server
    url = server.url
    client = th.InferenceServerClient(url, concurrency=12, network_timeout=60)
    tensor = th.InferInput("images", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(to_float(load_split("test")[0][:1]))
    pending = [client.async_infer("digits", [tensor]) for _ in range(12)]
    deadline = time.monotonic() + 30
    while 'nv_inference_pending_request_count{model="digits",version="1"} 12' not in httpx.get(
        f"http://{url}/metrics", timeout=10
    ).text:
        assert time.monotonic() < deadline, "requests never queued"
    server.process.send_signal(signal.SIGTERM)
    results = [p.get_result(timeout=60).as_numpy("probabilities") for p in pending]
    assert len(results) == 12 and all(r.shape == (1, 10) for r in results)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the process ends by that signal
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
