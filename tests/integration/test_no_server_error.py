"""No input, however malformed, gets a 5xx: a property test over URLs, queries and bodies.

Requests are drawn around the real routes (model names, versions, admin paths, infer bodies
that are almost right) so that they reach deep into validation instead of stopping at a 404.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.gateway.app import create_app
from bastion.gateway.settings import Settings

TOKEN = "tok"
ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
SEGMENTS = st.one_of(
    st.sampled_from(
        ["v2", "models", "digits", "digits_onnx", "versions", "1", "0", "infer", "ready",
         "config", "stats", "drift", "screening", "action", "quarantine", "purge", "release",
         "repository", "index", "load", "unload", "health", "live", "admin", "openapi.json",
         "metrics", "dashboard", "assets", "api", "summary", "²", "9" * 40, "-1", ""]
    ),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
ROUTES = [
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/v2/repository/index",
    "/v2/models/{m}", "/v2/models/{m}/versions/{v}", "/v2/models/{m}/ready",
    "/v2/models/{m}/versions/{v}/ready", "/v2/models/{m}/config", "/v2/models/{m}/stats",
    "/v2/models/{m}/versions/{v}/stats", "/v2/models/{m}/drift", "/v2/models/{m}/infer",
    "/v2/models/{m}/versions/{v}/infer", "/v2/models/{m}/screening",
    "/v2/models/{m}/versions/{v}/screening", "/v2/models/{m}/screening/action",
    "/v2/repository/models/{m}/load", "/v2/quarantine", "/v2/quarantine/stats",
    "/v2/quarantine/{v}", "/v2/quarantine/{v}/release", "/v2/quarantine/purge", "/metrics",
    "/dashboard", "/dashboard/assets/{v}", "/dashboard/api/summary", "/openapi.json",
    "/v2/admin/openapi.json",
]
MODELS = st.one_of(st.sampled_from(["digits", "digits_onnx", "nope"]), st.text(max_size=8))
VERSIONS = st.one_of(
    st.sampled_from(["1", "2", "0", "²", "¹", "9" * 5000, "-1", "1.0", " 1", "0x1", ""]),
    st.text(max_size=8),
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    """Mostly real route templates with odd values in their slots; sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        segments = draw(st.lists(SEGMENTS, min_size=1, max_size=7))
    else:
        template = draw(st.sampled_from(ROUTES))
        segments = [
            draw(MODELS) if part == "{m}" else draw(VERSIONS) if part == "{v}" else part
            for part in template.strip("/").split("/")
        ]
    # a leading "//" would be read as a network location by the client, not sent as a path
    return "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments).lstrip("/")


FIELDS = ["id", "inputs", "outputs", "parameters", "name", "shape", "datatype", "data",
          "binary_data_size", "binary_data_output", "classification", "screening_report",
          "timeout", "status", "older_than_s", "ids", "note", "action", "limit", "offset"]


def dumps(value: object) -> bytes:
    """Any JSON, big integers and NaN included (orjson refuses to write those)."""
    return json.dumps(value).encode()


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """An infer request that is nearly valid: one field or length replaced at random."""
    rows = draw(st.integers(0, 3))
    inp: dict[str, object] = {"name": draw(st.sampled_from(["images", "x"])),
                              "datatype": draw(st.sampled_from(["FP32", "UINT8", "BYTES", "X"])),
                              "shape": draw(st.one_of(st.just([rows, 1, 28, 28]),
                                                      st.lists(st.integers(-2, 70), max_size=5)))}
    binary = draw(st.booleans())
    payload = draw(st.binary(max_size=64)) if binary else b""
    if binary:
        inp["parameters"] = {"binary_data_size": draw(st.one_of(
            st.just(len(payload)), st.none(), st.integers(-5, 2**40), st.text(max_size=3)))}
    else:
        inp["data"] = draw(st.one_of(st.just([0.5] * rows * 784), JSON_VALUES))
    request = {"inputs": [inp], draw(st.sampled_from(FIELDS)): draw(JSON_VALUES)}
    header = dumps(request)
    headers = {"Inference-Header-Content-Length": draw(st.one_of(
        st.just(str(len(header))), st.text(ASCII, max_size=6)))} if binary else {}
    if draw(st.booleans()):
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity"]))
    return header + payload, headers


BODIES = st.one_of(
    infer_bodies(),
    st.tuples(JSON_VALUES.map(dumps), st.just({})),
    st.tuples(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES).map(dumps),
              st.just({})),
    st.tuples(st.binary(max_size=256), st.just({})),
    st.tuples(st.binary(max_size=8).map(lambda b: struct.pack("<I", 2**31) + b), st.just({})),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(admin_token=TOKEN, torch_threads=1, quarantine_path=Path(tmp) / "q.db",
                         drift=False)
    with TestClient(create_app(settings_)) as test_client:
        yield test_client


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=paths(),
    query=st.dictionaries(st.sampled_from(["version", "limit", "offset", "status", "model", "q"]),
                          st.one_of(VERSIONS, st.integers().map(str), st.just(str(2**70)))),
    body=BODIES,
    admin=st.booleans(),
)
def test_no_request_gets_a_server_error(
    client: TestClient,
    method: str,
    path: str,
    query: dict[str, str],
    body: tuple[bytes, dict[str, str]],
    admin: bool,
) -> None:
    if query:
        path += "?" + urllib.parse.urlencode(query)
    content, headers = body
    if admin:
        headers = {**headers, "Authorization": f"Bearer {TOKEN}"}
    if path.endswith("/unload"):  # keep the models for the rest of the run
        return
    response = client.request(method, path, content=content, headers=headers)
    ready_probe = path.startswith("/v2/health/ready") and response.status_code == 503
    assert response.status_code < 500 or ready_probe, (method, path, response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.json(), response.text[:300]
