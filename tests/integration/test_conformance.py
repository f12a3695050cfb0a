"""Protocol conformance found in public Triton and KServe bug reports, each kind fixed whole."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from bastion.gateway.app import create_app
from bastion.gateway.protocol.content_encoding import preferred_coding
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float

INFER = "/v2/models/digits/infer"
ADMIN = {"Authorization": "Bearer tok"}


@pytest.fixture
def client(repository: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=repository,
        admin_token="tok",
        torch_threads=1,
        quarantine_path=tmp_path / "quarantine.db",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def json_request(outputs: list | None = None) -> dict:
    x = to_float(load_split("test")[0][:1])
    request: dict = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }
    if outputs is not None:
        request["outputs"] = outputs
    return request


def test_an_empty_outputs_list_returns_every_output(client: TestClient) -> None:
    for outputs in ([], None):
        response = client.post(INFER, json=json_request(outputs))
        assert response.status_code == 200, response.text
        assert [o["name"] for o in response.json()["outputs"]] == ["logits", "probabilities"]
    one = client.post(INFER, json=json_request([{"name": "logits"}])).json()
    assert [o["name"] for o in one["outputs"]] == ["logits"]


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip", "gzip"),
        ("gzip;q=0", None),
        ("deflate;q=1, gzip;q=0", "deflate"),
        ("gzip;q=0.2, deflate;q=0.8", "deflate"),
        ("GZIP ; Q=0.5, deflate;q=0.5", "gzip"),
        ("*", "gzip"),
        ("*;q=0, deflate;q=0.1", "deflate"),
        ("identity", None),
        ("br", None),
        ("gzip;q=banana", None),
        ("gzip;q=2", None),
        ("", None),
    ],
)
def test_accept_encoding_weights_are_honoured(accept: str, coding: str | None) -> None:
    assert preferred_coding(accept) == coding


def test_a_response_is_encoded_as_the_weights_say(client: TestClient) -> None:
    for accept, coding in (("gzip;q=0", None), ("deflate;q=1, gzip;q=0", "deflate")):
        response = client.post(INFER, json=json_request(), headers={"Accept-Encoding": accept})
        assert response.headers.get("content-encoding") == coding
        assert orjson.loads(response.content)["outputs"]  # decoded by the client
    gz = client.post(INFER, json=json_request(), headers={"Accept-Encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", INFER, "POST"),
        ("PUT", "/v2/models/digits/versions/1/infer", "POST"),
        ("GET", "/v2/repository/index", "POST"),
        ("DELETE", "/v2/health/ready", "GET"),
        ("POST", "/v2/models/digits", "GET"),
    ],
)
def test_a_wrong_method_on_a_known_route_is_405_with_allow(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert allow in response.headers["allow"]
    assert response.json()["error"]


def test_binary_tensors_without_their_header_say_the_header_is_missing(
    client: TestClient,
) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": [1, 1, 28, 28],
                    "parameters": {"binary_data_size": 3136},
                }
            ]
        }
    )
    x = np.full((1, 1, 28, 28), 0.5, np.float32).tobytes()
    x = b"\xed\xa0\x80" + x[3:]  # bytes that are not UTF-8, as raw float data often is
    response = client.post(INFER, content=header + x)
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]


def test_ready_stays_200_after_an_admin_unloads_a_model(client: TestClient) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v2/repository/models/digits_onnx/unload", headers=ADMIN).status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/digits_onnx/ready").status_code == 404
    index = client.post("/v2/repository/index").json()
    assert {"name": "digits_onnx", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert client.post("/v2/repository/models/digits_onnx/load", headers=ADMIN).status_code == 200


def test_ready_is_503_when_a_model_failed_to_load(repository: Path, tmp_path: Path) -> None:
    (repository / "digits_onnx" / "config.pbtxt").write_text("this is not a config")
    settings = Settings(
        model_repository=repository, torch_threads=1, quarantine_path=tmp_path / "q.db"
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/digits/ready").status_code == 200


def admin_operations(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) of the admin API: in the admin document, not in the public one."""
    public = client.get("/openapi.json").json()["paths"]
    whole = client.get("/v2/admin/openapi.json", headers=ADMIN).json()["paths"]
    found = []
    for path, methods in whole.items():
        for method in methods:
            if method in ("get", "post", "put", "delete") and method not in public.get(path, {}):
                found.append((method.upper(), path))
    return found


def test_a_missing_or_wrong_admin_token_is_403_on_every_admin_route(client: TestClient) -> None:
    operations = admin_operations(client)
    assert len(operations) > 20  # the walk found the admin API
    for method, path in operations:
        concrete = path.replace("{model}", "digits").replace("{version}", "1")
        concrete = re.sub(r"\{[a-z_]+\}", "1", concrete)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "tok"}):
            response = client.request(method, concrete, headers=headers, json={})
            assert response.status_code == 403, (method, concrete, headers, response.text)
            assert "admin token" in response.json()["error"]


def test_health_answers_head_and_a_wrong_admin_token_is_named(client: TestClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert client.head(path).status_code == 200
    missing = client.post("/v2/repository/models/digits/unload").json()["error"]
    wrong = client.post(
        "/v2/repository/models/digits/unload", headers={"Authorization": "Bearer nope"}
    ).json()["error"]
    assert "needs" in missing and "wrong" in wrong
