"""What an anonymous caller may send and see: identities, versions, parameters, documents.

Before the fix anyone could fill the quarantine store (a 1 MiB request id, a 1 MiB client id),
read the screening thresholds in /metrics and the per-detector scores of their own requests
(``screening_report``), find the admin routes in /openapi.json, and get a 500 for a model
version written in Unicode digits.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import httpx
import pytest

from bastion.benchmarks import hostile
from tests.conftest import ServerProcess, start_server
from tests.security.harness import (
    ADMIN,
    ADMIN_TOKEN,
    HOST,
    assert_live,
    digit_json,
    reply_error,
    response_error,
    under_attack,
)

pytestmark = pytest.mark.e2e
INFER = "/v2/models/digits/infer"
SERVED = (200, 403)  # 403: screening withheld a clean digit (about 5 % by calibration)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("exposure"), env={"BASTION_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{server.url}", timeout=30) as http:
        yield http


def refused(server: ServerProcess, send: object, status: int, min_s: float = 0.3) -> list[str]:
    """Sends a request (``send()`` -> httpx.Response) again and again while health is probed;
    every answer must be ``status`` with a JSON error. Returns the messages."""
    responses, probes = under_attack(server, send, min_s=min_s)  # type: ignore[arg-type]
    messages = [response_error(response, status) for response in responses]
    assert_live(probes)
    return messages


@pytest.mark.parametrize("length", [129, 4096])
def test_an_over_long_client_id_is_refused_400(
    server: ServerProcess, client: httpx.Client, length: int
) -> None:
    headers = {"X-Client-ID": "a" * length}
    for message in refused(
        server, lambda: client.post(INFER, json=digit_json(), headers=headers), 400
    ):
        assert "over 128 characters" in message


def test_a_1_mib_client_id_is_refused_by_the_head_limit(server: ServerProcess) -> None:
    """A client id past the request-head limit never reaches the id check: 431."""
    body, headers = b"{}", {"X-Client-ID": "a" * (1 << 20)}
    request = hostile.request_bytes("POST", INFER, headers, body)
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        reply_error(reply, 431)
    assert_live(probes)


@pytest.mark.parametrize("length", [257, 1 << 20])
def test_an_over_long_request_id_is_refused_400(
    server: ServerProcess, client: httpx.Client, length: int
) -> None:
    body = digit_json(id="r" * length)
    for message in refused(server, lambda: client.post(INFER, json=body), 400):
        assert "over the limit of 256" in message


@pytest.mark.parametrize(
    "client_id",
    [b"bad client", b"a;b", b"<script>", b"caf\xe9", b"a\tb", b"a,b"],
    ids=["space", "semicolon", "angle-brackets", "latin-1", "tab", "comma"],
)
def test_a_client_id_outside_the_charset_is_refused_400(
    server: ServerProcess, client: httpx.Client, client_id: bytes
) -> None:
    headers = {"X-Client-ID": client_id}
    for message in refused(
        server, lambda: client.post(INFER, json=digit_json(), headers=headers), 400
    ):
        assert "may hold only" in message


def test_metrics_show_no_thresholds_and_no_scores(client: httpx.Client) -> None:
    assert client.post(INFER, json=digit_json()).status_code in SERVED
    text = client.get("/metrics").text
    assert "bastion_screening_verdicts" in text  # the screening ran and is counted
    assert "bastion_screening_threshold" not in text
    assert "bastion_screening_score" not in text


def test_screening_report_needs_the_admin_token(
    server: ServerProcess, client: httpx.Client
) -> None:
    body = digit_json(parameters={"screening_report": True})
    for message in refused(server, lambda: client.post(INFER, json=body), 403):
        assert "needs the admin token" in message
    wrong = {"Authorization": "Bearer not-the-token"}
    response_error(client.post(INFER, json=body, headers=wrong), 403)
    answer = client.post(INFER, json=body, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    outputs = {out["name"]: out for out in answer.json()["outputs"]}
    assert {"screening_verdict", "screening_scores"} <= set(outputs)
    assert len(outputs["screening_scores"]["data"]) == outputs["screening_scores"]["shape"][1]


def test_the_public_openapi_document_has_no_admin_route(
    server: ServerProcess, client: httpx.Client
) -> None:
    responses, probes = under_attack(server, lambda: client.get("/openapi.json"), min_s=0.3)
    assert_live(probes)
    for response in responses:
        assert response.status_code == 200
        paths = set(response.json()["paths"])
        assert {"/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"} <= paths
        admin = [
            path
            for path in paths
            if path.startswith(("/v2/quarantine", "/v2/admin"))
            or "/screening" in path
            or path.startswith("/v2/repository/models/")
        ]
        assert not admin, admin
    response_error(client.get("/v2/admin/openapi.json"), 403)
    full = client.get("/v2/admin/openapi.json", headers=ADMIN)
    assert full.status_code == 200
    assert {"/v2/quarantine", "/v2/repository/models/{model}/load"} <= set(full.json()["paths"])


@pytest.mark.parametrize(
    "version",
    ["\u0661", "\uff11", "\u00b9", "\u0967", "1" * 5000],
    ids=["arabic-indic-1", "fullwidth-1", "superscript-1", "devanagari-1", "5000-digits"],
)
def test_a_version_that_is_not_ascii_digits_is_refused_400(
    server: ServerProcess, client: httpx.Client, version: str
) -> None:
    quoted = urllib.parse.quote(version)
    sends = [
        lambda: client.post(f"/v2/models/digits/versions/{quoted}/infer", json=digit_json()),
        lambda: client.get(f"/v2/models/digits/versions/{quoted}"),
        lambda: client.get(f"/v2/models/digits/versions/{quoted}/stats"),
        lambda: client.get(
            "/v2/models/digits/screening", params={"version": version}, headers=ADMIN
        ),
    ]
    for send in sends:
        for message in refused(server, send, 400, min_s=0.1):
            assert "is not a positive integer" in message


def test_a_null_binary_data_size_is_refused_400(
    server: ServerProcess, client: httpx.Client
) -> None:
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28]}
    body = {"inputs": [{**tensor, "parameters": {"binary_data_size": None}}]}
    for message in refused(server, lambda: client.post(INFER, json=body), 400):
        assert "binary_data_size" in message


@pytest.mark.parametrize(
    "path",
    [
        "/v2/quarantine/purge",
        "/v2/models/digits/screening/action",
        "/v2/repository/models/digits/load",
    ],
)
@pytest.mark.parametrize("token", [None, "wrong", ADMIN_TOKEN], ids=["anonymous", "wrong", "admin"])
def test_a_1_mib_body_to_an_admin_route_is_refused_413(
    server: ServerProcess, path: str, token: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = hostile.request_bytes("POST", path, headers, b"x" * (1 << 20))
    replies, probes = under_attack(
        server, lambda: hostile.exchange(HOST, server.port, request), min_s=0.2
    )
    for reply in replies:
        assert "exceeds the limit of 131072 bytes" in reply_error(reply, 413)
    assert_live(probes)


def test_a_chunked_1_mib_body_to_an_admin_route_is_refused_413(server: ServerProcess) -> None:
    chunk = b"x" * (64 << 10)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"0\r\n\r\n"
    head = hostile.request_bytes(
        "POST",
        "/v2/quarantine/purge",
        {**ADMIN, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    reply = hostile.exchange(HOST, server.port, head + chunks)
    reply_error(reply, 413)
