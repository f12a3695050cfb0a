"""Overload: open connections, requests in flight and the decode queue are bounded (503).

The limits are tiny here (8 connections, 2 requests in flight, one decode thread with room for
one job, a 50 ms decode budget) so that a handful of sockets reach each of them. Health checks
are never counted against the in-flight limit; a kept-alive probe opened before a connection
flood keeps its place under the connection cap.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from bastion.benchmarks import hostile
from tests.conftest import ServerProcess, start_server
from tests.security.harness import (
    ADMIN,
    ADMIN_TOKEN,
    HOST,
    assert_live,
    digit_body,
    reply_error,
    under_attack,
)

pytestmark = pytest.mark.e2e
MAX_CONNECTIONS = 8
MAX_IN_FLIGHT = 4
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "BASTION_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BASTION_MAX_REQUESTS_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "BASTION_DECODE_WORKERS": "1",
        "BASTION_DECODE_QUEUE_SIZE": "1",
        "BASTION_DECODE_BUDGET_MS": "50",
        "BASTION_HTTP_BODY_TIMEOUT_S": "5",
        "BASTION_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    proc = start_server(tmp_path_factory.mktemp("overload"), env=env)
    yield proc
    proc.stop()


def get(server: ServerProcess, path: str) -> hostile.Reply:
    return hostile.exchange(HOST, server.port, hostile.request_bytes("GET", path))


def eventually(check: object, timeout_s: float = 5.0) -> None:
    """Polls ``check()`` (with backoff) until it is true."""
    delay, deadline = 0.01, time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def test_a_connection_flood_past_the_cap_gets_503_json_and_the_server_recovers(
    server: ServerProcess,
) -> None:
    flood: list[socket.socket] = []
    request = hostile.request_bytes("GET", "/v2")

    def flood_connections() -> list[hostile.Reply]:
        replies = []
        for _ in range(3 * MAX_CONNECTIONS):
            flood.append(socket.create_connection((HOST, server.port)))
        for sock in flood:
            with contextlib.suppress(OSError):  # past twice the cap: answered and closed at once
                sock.sendall(request)
            replies.append(hostile.read_reply(sock, time.monotonic() + 5))
        time.sleep(0.5)  # the connections served are held open while health is probed
        return replies

    try:
        results, probes = under_attack(server, flood_connections, min_s=0)
    finally:
        for sock in flood:
            sock.close()
    replies = results[0]
    refused = [reply for reply in replies if reply.status == 503]
    assert len(refused) >= 2 * MAX_CONNECTIONS  # the probe and earlier sockets hold the rest
    assert all(reply.status in (200, 503) for reply in replies), [r.status for r in replies]
    for reply in refused:
        assert "connections" in reply_error(reply, 503)
        assert reply.closed
    assert_live(probes)  # a kept-alive probe opened before the flood keeps its place
    eventually(lambda: get(server, "/v2").status == 200)
    eventually(lambda: get(server, "/v2/health/live").status == 200)


def test_requests_in_flight_past_the_cap_get_503(server: ServerProcess) -> None:
    # an admin request whose body is awaited is in flight (an inference is counted only once
    # its body is in: heads alone hold connections, which have their own cap and timeouts)
    head = hostile.request_bytes(
        "POST", "/v2/quarantine/purge", {**ADMIN, "Content-Length": "1000"}
    )
    holders = [socket.create_connection((HOST, server.port)) for _ in range(MAX_IN_FLIGHT)]
    try:
        for sock in holders:
            sock.sendall(head + b"{")
        eventually(lambda: get(server, "/v2").status == 503)
        replies, probes = under_attack(server, lambda: get(server, "/v2"), workers=2)
        for reply in replies:
            assert "requests in flight" in reply_error(reply, 503)
        assert_live(probes)  # health checks are never counted nor refused
        for sock in holders:
            sock.sendall(b" " * 999)  # the bodies end: each request is answered and leaves
            assert hostile.read_reply(sock, time.monotonic() + 5).status == 400
    finally:
        for sock in holders:
            sock.close()
    eventually(lambda: get(server, "/v2").status == 200)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# the slowest decode the model's bounds allow: 64 PNGs, a few milliseconds of decoding
SLOW_BODY = hostile.bytes_body([png(i) for i in range(64)], [64])


def test_a_full_decode_queue_answers_503(server: ServerProcess) -> None:
    """One decode thread with room for one job: while 64 PNGs decode, every other infer
    request is refused at once rather than queued."""
    bomb_body, bomb_headers = SLOW_BODY
    bomb = hostile.request_bytes("POST", INFER, bomb_headers, bomb_body)
    clean_body, clean_headers = digit_body()
    clean = hostile.request_bytes("POST", INFER, clean_headers, clean_body)
    bombing = threading.Event()
    bomb_replies: list[hostile.Reply] = []

    def bomber() -> None:
        while not bombing.is_set():
            bomb_replies.append(hostile.exchange(HOST, server.port, bomb))

    threads = [threading.Thread(target=bomber, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        replies, probes = under_attack(
            server, lambda: hostile.exchange(HOST, server.port, clean), min_s=3.0, workers=2
        )
    finally:
        bombing.set()
        for thread in threads:
            thread.join(timeout=30)
    assert bomb_replies and {r.status for r in bomb_replies} <= {200, 403, 413, 503}
    for reply in bomb_replies:  # on a loaded machine 64 PNGs can outlast the 50 ms budget
        if reply.status == 413:
            assert "decode budget" in reply_error(reply, 413)
    refused = [reply for reply in replies if reply.status == 503]
    assert refused, [reply.status for reply in replies]
    assert {reply.status for reply in replies} <= {200, 403, 503}  # 403: screening withheld it
    for reply in refused:
        assert "decoded" in reply_error(reply, 503)
    assert_live(probes)
