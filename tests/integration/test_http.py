"""The ASGI app in process: every route, errors in Triton's format, and the hostile-input suite."""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bastion.gateway.app import create_app
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float

INFER = "/v2/models/digits/infer"


@pytest.fixture
def client(repository: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=repository, admin_token="tok", max_body_bytes=1 << 20, torch_threads=1,
        quarantine_path=tmp_path / "quarantine.db",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def body(name: str, datatype: str, shape: list[int], raw: bytes) -> dict:
    """A tritonclient-style binary request for one input, asking for JSON probabilities."""
    header = orjson.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                     "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    )
    length = str(len(header))
    return {"content": header + raw, "headers": {"Inference-Header-Content-Length": length}}


def binary_body(array: np.ndarray, datatype: str = "FP32", name: str = "images") -> dict:
    return body(name, datatype, list(array.shape), array.tobytes())


def bytes_body(items: list[bytes]) -> dict:
    raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
    return body("images", "BYTES", [len(items)], raw)


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def probabilities(response) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}["probabilities"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_server_and_model_metadata_follow_the_v2_protocol(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert "binary_tensor_data" in meta["extensions"] and "statistics" in meta["extensions"]
    model = client.get("/v2/models/digits").json()
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert client.get("/v2/models/digits/versions/1").json()["versions"] == ["1"]
    assert client.get("/v2/models/digits/versions/1/ready").status_code == 200
    config = client.get("/v2/models/digits/config").json()
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]
    index = client.post("/v2/repository/index").json()
    assert {"name": "digits", "version": "1", "state": "READY"} in index


def test_json_uint8_and_image_inputs_give_the_same_prediction(client: TestClient) -> None:
    images, labels = load_split("test")
    pixels = images[:4]
    floats = to_float(pixels)
    p_float = probabilities(client.post(INFER, **binary_body(floats)))
    p_uint8 = probabilities(client.post(INFER, **binary_body(pixels, "UINT8")))
    p_png = probabilities(client.post(INFER, **bytes_body([png(p[0]) for p in pixels])))
    json_req = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [4, 1, 28, 28],
                            "data": floats.ravel().tolist()}]}
    p_json = probabilities(client.post(INFER, json=json_req))
    np.testing.assert_allclose(p_uint8, p_float, atol=1e-6)
    np.testing.assert_allclose(p_png, p_float, atol=1e-6)
    np.testing.assert_allclose(p_json, p_float, atol=1e-6)
    assert (p_float.argmax(1) == labels[:4]).all()


def test_classification_extension_returns_top_k_with_labels(client: TestClient) -> None:
    floats = to_float(load_split("test")[0][:2])
    request = binary_body(floats)
    header_len = int(request["headers"]["Inference-Header-Content-Length"])
    header = orjson.loads(request["content"][:header_len])
    header["outputs"] = [{"name": "probabilities", "parameters": {"classification": 3,
                                                                  "binary_data": False}}]
    new_header = orjson.dumps(header)
    response = client.post(
        INFER, content=new_header + request["content"][header_len:],
        headers={"Inference-Header-Content-Length": str(len(new_header))},
    )
    out = response.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    score, index, label = out["data"][0].split(":")
    assert index == label and 0.0 <= float(score) <= 1.0


def test_statistics_and_metrics_count_requests_and_batches(client: TestClient) -> None:
    floats = to_float(load_split("test")[0][:3])
    for _ in range(2):
        probabilities(client.post(INFER, **binary_body(floats)))
    stats = client.get("/v2/models/digits/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 2
    assert stats["inference_count"] == 6 and stats["execution_count"] == 2
    assert stats["batch_stats"][0]["batch_size"] == 3
    text = client.get("/metrics").text
    assert 'nv_inference_request_success{model="digits",version="1"} 2' in text
    assert 'nv_inference_count{model="digits",version="1"} 6' in text
    assert 'bastion_batch_size_count{model="digits",version="1"} 2.0' in text
    assert "bastion_request_duration_seconds_bucket" in text


def test_unknown_model_version_and_output_are_errors_in_v2_format(client: TestClient) -> None:
    request = binary_body(np.zeros((1, 1, 28, 28), np.float32))
    cases = {
        "/v2/models/nope/infer": (404, "unknown model"),
        "/v2/models/digits/versions/7/infer": (404, "no version 7"),
        "/v2/models/digits/versions/x/infer": (400, "not a positive integer"),
    }
    for path, (status, message) in cases.items():
        response = client.post(path, **request)
        assert response.status_code == status and message in response.json()["error"]
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/nothing").json() == {"error": "Not Found"}


def test_repository_control_needs_the_admin_token(client: TestClient, repository: Path) -> None:
    assert client.post("/v2/repository/models/digits/unload").status_code == 403
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/v2/repository/models/digits/unload", headers=wrong).status_code == 403
    admin = {"Authorization": "Bearer tok"}
    assert client.post("/v2/repository/models/digits/unload", headers=admin).status_code == 200
    assert client.get("/v2/models/digits/ready").status_code == 404
    (repository / "digits" / "2").mkdir()
    for name in ("model.safetensors", "calibration.json", "mahalanobis.safetensors"):
        source = repository / "digits" / "1" / name
        (repository / "digits" / "2" / name).write_bytes(source.read_bytes())
    assert client.post("/v2/repository/models/digits/load", headers=admin).status_code == 200
    assert client.get("/v2/models/digits").json()["versions"] == ["2"]
    log = client.app.app.state.incident_log  # each change of what is served is on record
    changes = [e for e in log.entries(limit=10_000) if e.kind == "policy_change"][-2:]
    assert [(e.subject, e.body["event"], e.actor) for e in changes] == [
        ("digits", "unload", "admin"),
        ("digits", "load", "admin"),
    ]
    assert changes[1].body["versions"]["2"]["action"]


def test_screened_model_without_calibration_is_refused_with_a_clear_error(
    client: TestClient, repository: Path
) -> None:
    (repository / "digits" / "3").mkdir()
    weights = repository / "digits" / "1" / "model.safetensors"
    (repository / "digits" / "3" / "model.safetensors").write_bytes(weights.read_bytes())
    admin = {"Authorization": "Bearer tok"}
    response = client.post("/v2/repository/models/digits/load", headers=admin)
    assert response.status_code == 503
    assert "no calibration; run `bastion calibrate digits`" in response.json()["error"]
    index = client.post("/v2/repository/index").json()
    assert {e["name"]: e["state"] for e in index}["digits"] == "READY"  # version 1 still serves


IMAGE = np.zeros((28, 28), np.uint8)
HOSTILE = {
    "wrong input shape": (binary_body(np.zeros((1, 1, 27, 28), np.float32)), 400, "expects"),
    "wrong datatype": (binary_body(np.zeros((1, 1, 28, 28), np.float64), "FP64"), 400, "FP32"),
    "unknown input": (binary_body(np.zeros((1, 1, 28, 28), np.float32), name="x"), 400,
                      "no input 'x'"),
    "batch over max": (binary_body(np.zeros((65, 1, 28, 28), np.float32)), 400, "outside 1..64"),
    "empty batch": (binary_body(np.zeros((0, 1, 28, 28), np.float32)), 400, "outside 1..64"),
    "NaN pixels": (binary_body(np.full((1, 1, 28, 28), np.nan, np.float32)), 400, "NaN or Inf"),
    "Inf pixels": (binary_body(np.full((1, 1, 28, 28), np.inf, np.float32)), 400, "NaN or Inf"),
    "pixels out of range": (binary_body(np.full((1, 1, 28, 28), 3, np.float32)), 400, "[0, 1]"),
    "broken PNG": (bytes_body([png(IMAGE)[:40]]), 400, "not a readable PNG"),
    "not an image": (bytes_body([b"hello world"]), 400, "not a readable PNG"),
    "wrong image size": (bytes_body([png(np.zeros((32, 32), np.uint8))]), 400, "expects 28x28"),
    "truncated JPEG": (bytes_body([png(IMAGE, "JPEG")[:100]]), 400, "not a readable PNG"),
    "oversized body": ({"content": b"x" * (2 << 20)}, 413, "exceeds the limit"),
    "gzip bomb": ({"content": gzip.compress(b"{" * (8 << 20)),
                   "headers": {"Content-Encoding": "gzip"}}, 413, "larger than the limit"),
    "deep JSON": ({"content": b"[" * 100_000 + b"]" * 100_000}, 400, "depth limit"),
    "bad header length": ({"content": b"{}", "headers": {"Inference-Header-Content-Length": "x"}},
                          400, "not an integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_gets_a_4xx_and_the_server_stays_live(client: TestClient, case: str) -> None:
    kwargs, status, message = HOSTILE[case]
    response = client.post(INFER, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.get("/v2/health/live").status_code == 200
    ok = client.post(INFER, **binary_body(to_float(load_split("test")[0][:1])))
    assert ok.status_code == 200, ok.text


def test_drift_endpoint_reports_the_monitor_of_a_profiled_model(client: TestClient) -> None:
    state = client.get("/v2/models/digits/drift").json()
    assert state["enabled"] and state["reference"]["samples"] == 1000
    assert state["images_seen"] == 0  # warm-up batches run before the monitor is attached
    onnx = client.get("/v2/models/digits_onnx/drift").json()
    assert onnx == {
        "model": "digits_onnx",
        "version": "1",
        "enabled": False,
        "reason": "no reference profile for this version (bastion calibrate writes one)",
    }
    assert client.get("/v2/models/nope/drift").status_code == 404


def test_a_broken_reference_profile_turns_drift_off_but_the_model_serves(
    repository: Path, tmp_path: Path
) -> None:
    profile = repository / "digits" / "1" / "reference.safetensors"
    profile.write_bytes(profile.read_bytes()[:1000])  # truncated
    settings = Settings(model_repository=repository, quarantine_path=tmp_path / "q.db")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/digits/ready").status_code == 200
        assert client.get("/v2/models/digits/drift").json()["enabled"] is False
        digit = np.zeros((1, 1, 28, 28), np.float32)
        digit[0, 0, 4:24, 13:15] = 1.0  # a plain "1"
        assert client.post(INFER, **binary_body(digit)).status_code == 200


def test_an_unscreened_model_is_monitored_too(repository: Path, tmp_path: Path) -> None:
    config = repository / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "on"', 'string_value: "off"'))
    settings = Settings(
        model_repository=repository, quarantine_path=tmp_path / "q.db", drift_hop_images=10,
        drift_min_images=10,
    )
    digits = np.random.default_rng(0).random((12, 1, 28, 28), dtype=np.float32)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/digits/screening").status_code in (401, 403)  # no token
        response = client.post(INFER, **binary_body(digits))
        assert response.status_code == 200 and "screening_flagged" not in response.text
        state = client.get("/v2/models/digits/drift").json()
    assert state["images_seen"] == 12 and state["windows"] == 1
    assert "flag_rate_z" not in state["latest"]["scores"]  # nothing screened, no flag rate
    assert state["latest"]["scores"]["psi_pixel_mean"] > 0.15  # uniform noise is not a digit
