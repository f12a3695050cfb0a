"""What an attacker's review of the hardened front door found, each fixed and kept fixed.

Every test reproduces one finding against a real server: a chunked request with an endless
trailer, a 123-byte request naming an input the model lacks with 64 M BYTES elements, 2 KB of
gzip that inflates to half a million nested JSON arrays, a client that never reads its
responses, a ``data:`` URI without a comma, PNGs whose text chunks inflate to megabytes, a head
past the limit hidden behind a pipelined request, and the screening policy in the public config.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from bastion.benchmarks import hostile
from tests.conftest import ServerProcess, start_server
from tests.security.harness import HOST, assert_live, reply_error, under_attack

pytestmark = pytest.mark.e2e
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"BASTION_HTTP_WRITE_TIMEOUT_S": "1", "BASTION_HTTP_BODY_TIMEOUT_S": "5"}
    proc = start_server(tmp_path_factory.mktemp("review"), env=env)
    yield proc
    proc.stop()


def post(body: bytes, headers: dict[str, str]) -> bytes:
    return hostile.request_bytes("POST", INFER, headers, body)


def test_an_endless_chunked_trailer_is_refused_431(server: ServerProcess) -> None:
    def attack() -> hostile.Reply:
        head = (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\n\r\n0\r\nX-Trailer: "
        ).encode()
        return hostile.exchange(HOST, server.port, head + b"a" * (256 << 10))

    replies, probes = under_attack(server, attack)
    for reply in replies:
        assert "trailers exceed" in reply_error(reply, 431)
    assert_live(probes)


def test_an_input_the_model_lacks_is_refused_before_its_bytes_are_split(
    server: ServerProcess,
) -> None:
    header = json.dumps(
        {"inputs": [{"name": "not_an_input", "datatype": "BYTES", "shape": [67108864],
                     "parameters": {"binary_data_size": 4}}]}
    ).encode()
    request = post(header + b"\0\0\0\0", {hostile.HEADER_LENGTH: str(len(header))})
    assert len(request) < 400
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert "has no input 'not_an_input'" in reply_error(reply, 400)
        assert reply.seconds < 1.0
    assert_live(probes)


def test_deeply_nested_json_is_refused_before_it_is_parsed(server: ServerProcess) -> None:
    data = b"[" + b",".join([b"[[0]]"] * 250_000) + b"]"
    body = b'{"inputs":[{"name":"images","datatype":"FP32","shape":[1,1,28,28],"data":' + data
    body = gzip.compress(body + b"}]}")
    assert len(body) < 10_000
    request = post(body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    replies, probes = under_attack(
        server, lambda: hostile.exchange(HOST, server.port, request), workers=2
    )
    for reply in replies:
        assert "more values than the model's inputs can take" in reply_error(reply, 400)
    assert_live(probes)


def test_a_client_that_never_reads_is_dropped_after_the_write_timeout(
    server: ServerProcess,
) -> None:
    def dropped() -> float:
        text = httpx.get(f"http://{server.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('bastion_http_rejected_total{reason="write_timeout"}'):
                return float(line.split()[-1])
        return 0.0

    before = dropped()
    asset = "/dashboard/assets/uPlot.iife.min.js"
    request = f"GET {asset} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 200
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, server.port))
    try:
        sock.sendall(request)
        deadline = time.monotonic() + 10
        while dropped() == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dropped() > before, "the server kept writing to a client that never reads"
    finally:
        sock.close()
    assert httpx.get(f"http://{server.url}/v2/health/live", timeout=5).status_code == 200


def test_a_data_uri_without_a_comma_is_a_400(server: ServerProcess) -> None:
    body = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["data:x"]}]}
    ).encode()
    reply = hostile.exchange(HOST, server.port, post(body, {"Content-Type": "application/json"}))
    assert "not a readable PNG or JPEG" in reply_error(reply, 400)


def png_with_text_chunks(chunks: int, inflated: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(out, "PNG")
    png = out.getvalue()
    text = zlib.compress(b"a" * inflated, 9)
    chunk = b"k\0\0" + text  # keyword, separator, compression method, data
    blob = struct.pack(">I", len(chunk)) + b"zTXt" + chunk
    blob += struct.pack(">I", zlib.crc32(b"zTXt" + chunk))
    return png[:33] + blob * chunks + png[33:]  # after IHDR


def test_png_text_chunks_that_inflate_to_megabytes_cost_nothing(server: ServerProcess) -> None:
    png = png_with_text_chunks(16, 1 << 20)
    assert len(png) < hostile.model_limits("digits")[1]
    body, headers = hostile.bytes_body([png] * 64, [64])
    request = post(body, headers)
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert reply.status in (200, 400, 403), reply
        assert reply.seconds < 1.0, reply.seconds
    assert_live(probes)


def test_a_head_past_the_limit_behind_a_pipelined_request_is_refused_431(
    server: ServerProcess,
) -> None:
    first = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 120_000 + b"\r\n\r\n"
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(first + second)
        received = b""
        deadline = time.monotonic() + 10
        while b"431" not in received and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    # the pipelined health check may or may not be answered before the connection is closed
    assert b"HTTP/1.1 431" in received and b"request head exceeds" in received


def test_the_public_model_config_leaves_out_the_screening_policy(server: ServerProcess) -> None:
    config = httpx.get(f"http://{server.url}/v2/models/digits/config", timeout=10).json()
    names = set(config.get("parameters", {}))
    assert names and not {n for n in names if n.startswith(("screening", "squeeze"))}
