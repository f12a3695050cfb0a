"""The admin API in process: validation (always 400 in the v2 error format, never 500), the
quarantine stats route, quotas seen from a client, and the OpenAPI description of admin routes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient

from bastion.gateway.app import create_app
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float
from tests.conftest import flag_every_image

ADMIN = {"Authorization": "Bearer tok"}
METRICS = {"Authorization": "Bearer mtok"}  # the store's usage is behind the metrics token
INFER = "/v2/models/digits/infer"
ID = "0" * 32

MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(repository: Path, tmp_path: Path) -> Iterator[MakeClient]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(
            model_repository=flag_every_image(repository),
            admin_token="tok",
            torch_threads=1,
            quarantine_path=tmp_path / f"quarantine-{len(clients)}.db",
            **overrides,
        )
        client = TestClient(create_app(settings)).__enter__()
        clients.append(client)
        action = {"action": "quarantine"}
        response = client.post("/v2/models/digits/screening/action", json=action, headers=ADMIN)
        assert response.status_code == 200, response.text
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


def images(n: int) -> dict[str, Any]:
    pixels = to_float(load_split("test")[0][:n])
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}


def quarantine(client: TestClient, n: int, who: str = "mallory", request_id: str = "r") -> dict:
    body = {**images(n), "id": request_id}
    response = client.post(INFER, json=body, headers={"X-Client-ID": who})
    assert response.status_code == 403, response.text
    return response.json()


BAD_INPUTS = [
    ("POST", "/v2/quarantine/purge", {"json": {"older_than_s": "abc"}}),
    ("POST", "/v2/quarantine/purge", {"json": {"older_than_s": "12"}}),
    ("POST", "/v2/quarantine/purge", {"json": {"older_than_s": True}}),
    ("POST", "/v2/quarantine/purge", {"json": {"older_than_s": -1}}),
    ("POST", "/v2/quarantine/purge", {"content": b'{"older_than_s": 1e999}'}),
    ("POST", "/v2/quarantine/purge", {"content": b'{"older_than_s": NaN}'}),
    ("POST", "/v2/quarantine/purge", {"json": {"ids": 5}}),
    ("POST", "/v2/quarantine/purge", {"json": {"ids": "abc"}}),
    ("POST", "/v2/quarantine/purge", {"json": {"ids": [5]}}),
    ("POST", "/v2/quarantine/purge", {"json": {"ids": ["x" * 65]}}),
    ("POST", "/v2/quarantine/purge", {"json": {"ids": [ID] * 1001}}),
    ("POST", "/v2/quarantine/purge", {"json": {"status": "deleted"}}),
    ("POST", "/v2/quarantine/purge", {"json": {}}),
    ("POST", "/v2/quarantine/purge", {"json": {"status": "released", "everything": True}}),
    ("POST", "/v2/quarantine/purge", {"json": [1, 2]}),
    ("POST", "/v2/quarantine/purge", {"json": "released"}),
    ("POST", "/v2/quarantine/purge", {"content": b"{not json"}),
    ("POST", "/v2/quarantine/purge", {}),
    ("POST", f"/v2/quarantine/{ID}/release", {"json": {"note": {}}}),
    ("POST", f"/v2/quarantine/{ID}/release", {"json": {"note": 5}}),
    ("POST", f"/v2/quarantine/{ID}/release", {"json": {"note": ["a"]}}),
    ("POST", f"/v2/quarantine/{ID}/release", {"json": {"note": "n" * 1025}}),
    ("POST", f"/v2/quarantine/{ID}/release", {"json": {"reason": "x"}}),
    ("POST", f"/v2/quarantine/{ID}/release", {"content": b"[]"}),
    ("POST", f"/v2/quarantine/{'x' * 65}/release", {}),
    ("GET", "/v2/quarantine", {"params": {"offset": str(2**70)}}),
    ("GET", "/v2/quarantine", {"params": {"offset": str(2**53 + 1)}}),
    ("GET", "/v2/quarantine", {"params": {"offset": "-1"}}),
    ("GET", "/v2/quarantine", {"params": {"limit": "1001"}}),
    ("GET", "/v2/quarantine", {"params": {"limit": "-1"}}),
    ("GET", "/v2/quarantine", {"params": {"limit": "abc"}}),
    ("GET", "/v2/quarantine", {"params": {"status": "deleted"}}),
    ("GET", "/v2/quarantine", {"params": {"model": "m" * 257}}),
    ("GET", "/v2/quarantine", {"params": {"everything": "1"}}),
    ("GET", f"/v2/quarantine/{'x' * 65}", {}),
    ("POST", "/v2/models/digits/screening/action", {"json": {"action": "nuke"}}),
    ("POST", "/v2/models/digits/screening/action", {"json": {"action": 1}}),
    ("POST", "/v2/models/digits/screening/action", {"json": {}}),
    ("POST", "/v2/models/digits/screening/action", {"json": {"action": "block", "x": 1}}),
    ("POST", "/v2/models/digits/screening/action", {}),
    ("GET", f"/v2/models/{'m' * 257}/screening", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), BAD_INPUTS)
def test_bad_admin_input_is_a_400_in_the_v2_error_format(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = client.request(method, path, headers=ADMIN, **kwargs)
    assert response.status_code == 400, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_a_long_note_is_refused_without_being_echoed(client: TestClient) -> None:
    response = client.post(
        f"/v2/quarantine/{ID}/release", json={"note": "n" * 10_000}, headers=ADMIN
    )
    assert response.status_code == 400 and "1024" in response.json()["error"]
    assert len(response.content) < 1024


@pytest.mark.parametrize(("method", "path", "kwargs"), BAD_INPUTS[::6])
def test_the_token_is_checked_before_the_input(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code == 403 and "admin" in response.json()["error"]


def test_valid_admin_inputs_reach_the_store(client: TestClient) -> None:
    blocked = quarantine(client, 3)
    ids = blocked["quarantine_ids"]
    assert len(ids) == 3
    page = client.get("/v2/quarantine", params={"limit": 1000, "offset": 2**53}, headers=ADMIN)
    assert page.status_code == 200 and page.json() == {"total": 3, "items": []}
    page = client.get(
        "/v2/quarantine", params={"model": "digits", "status": "quarantined", "limit": 2},
        headers=ADMIN,
    ).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    released = client.post(f"/v2/quarantine/{ids[0]}/release", json={"note": "n" * 1024},
                           headers=ADMIN)
    assert released.status_code == 200 and released.json()["note"] == "n" * 1024
    bare = client.post(f"/v2/quarantine/{ids[1]}/release", headers=ADMIN)
    assert bare.status_code == 200 and bare.json()["note"] is None
    missing = client.post(f"/v2/quarantine/{ID}/release", json={"note": None}, headers=ADMIN)
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.get(f"/v2/quarantine/{ID}", headers=ADMIN).status_code == 404
    purge = client.post("/v2/quarantine/purge", json={"ids": [ids[2]], "older_than_s": 0},
                        headers=ADMIN)
    assert purge.json() == {"purged": 1}
    purge = client.post("/v2/quarantine/purge", json={"status": "released"}, headers=ADMIN)
    assert purge.json() == {"purged": 2}


def test_stats_route_is_not_taken_for_a_record_id(client: TestClient) -> None:
    quarantine(client, 2, who="mallory")
    quarantine(client, 1, who="alice")
    response = client.get("/v2/quarantine/stats", headers=ADMIN)
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["records"] == 3 and stats["bytes"] > 3 * 28 * 28 * 4
    assert stats["by_status"] == {"quarantined": 3, "released": 0, "review": 0}
    assert stats["by_model"] == {"digits": 3}
    assert stats["top_clients"] == [{"client_id": "mallory", "records": 2},
                                    {"client_id": "alice", "records": 1}]
    assert stats["oldest"] <= stats["newest"]
    assert stats["quota"] == {"max_records": 100_000, "max_records_per_client": 1_000,
                              "max_bytes": 1 << 30}
    assert stats["over_quota"] is False
    assert stats["dropped"] == {"records_quota": 0, "bytes_quota": 0, "client_quota": 0}
    assert client.get("/v2/quarantine/stats").status_code == 403


def test_a_request_over_its_client_quota_is_still_refused_and_the_drop_is_counted(
    make_client: MakeClient,
) -> None:
    client = make_client(quarantine_max_records_per_client=2, metrics_token="mtok")
    body = quarantine(client, 3, who="mallory", request_id="flood")
    assert body["withheld"] == [0, 1, 2] and body["reason"] == "adversarial"
    assert len(body["quarantine_ids"]) == 2 and body["request_id"] == "flood"
    # whether evidence was kept is the operator's to know, not the (possibly hostile) client's
    assert "quarantine_dropped" not in body and "quota" not in body["error"]
    again = quarantine(client, 1, who="mallory")
    assert again["withheld"] == [0] and again["quarantine_ids"] == []
    assert len(quarantine(client, 1, who="alice")["quarantine_ids"]) == 1
    metrics = client.get("/metrics", headers=METRICS).text
    assert 'bastion_quarantine_dropped_total{reason="client_quota"} 2.0' in metrics
    assert "bastion_quarantine_records 3.0" in metrics
    assert "bastion_quarantine_over_quota 0.0" in metrics
    stats = client.get("/v2/quarantine/stats", headers=ADMIN).json()
    assert stats["dropped"]["client_quota"] == 2 and stats["records"] == 3


def test_a_full_store_drops_new_records_and_raises_the_alarm(make_client: MakeClient) -> None:
    client = make_client(quarantine_max_records=2, metrics_token="mtok")
    first = quarantine(client, 2, who="a")
    body = quarantine(client, 2, who="b")
    assert body["withheld"] == [0, 1] and body["quarantine_ids"] == []
    metrics = client.get("/metrics", headers=METRICS).text
    assert 'bastion_quarantine_dropped_total{reason="records_quota"} 2.0' in metrics
    assert "bastion_quarantine_over_quota 1.0" in metrics
    listed = client.get("/v2/quarantine", headers=ADMIN).json()
    assert {r["id"] for r in listed["items"]} == set(first["quarantine_ids"])  # nothing evicted
    client.post("/v2/quarantine/purge", json={"ids": first["quarantine_ids"]}, headers=ADMIN)
    assert client.get("/v2/quarantine/stats", headers=ADMIN).json()["over_quota"] is False
    assert "bastion_quarantine_over_quota 0.0" in client.get("/metrics", headers=METRICS).text


def test_admin_routes_are_tagged_and_document_their_errors(client: TestClient) -> None:
    fastapi_app = client.app.app  # type: ignore[attr-defined]
    doc = get_openapi(title="t", version="1", routes=fastapi_app.routes)
    admin_paths = [p for p in doc["paths"] if "quarantine" in p or p.endswith("screening")
                   or p.endswith("/action")]
    assert "/v2/quarantine/stats" in admin_paths and len(admin_paths) == 8
    for path in admin_paths:
        for operation in doc["paths"][path].values():
            assert operation["tags"] == ["admin"], path
            responses = operation["responses"]
            assert "403" in responses and "422" not in responses, path
            schema = responses["403"]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("ErrorBody"), path
            if operation.get("requestBody") or operation.get("parameters"):
                assert "400" in responses, path
    for path in ("/v2/quarantine/{item}", "/v2/quarantine/{item}/release"):
        assert all("404" in op["responses"] for op in doc["paths"][path].values())


def test_withheld_images_are_never_served_when_the_store_is_full(
    make_client: MakeClient,
) -> None:
    client = make_client(quarantine_max_records=1)
    quarantine(client, 1)
    body = {**images(2), "parameters": {"screening_report": True}}
    response = client.post(INFER, json=body, headers={**ADMIN, "X-Client-ID": "ops"})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert np.isnan(np.asarray(outputs["probabilities"]["data"], np.float32)).all()
    verdicts = outputs["screening_verdict"]["data"]
    assert verdicts == ["adversarial:quarantine", "adversarial:quarantine"]  # no ids: dropped
