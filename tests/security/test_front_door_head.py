"""Request heads: size and count limits (431), head and body read timeouts (408), idle close.

Before the front door was hardened a 16 MiB header and 20,000 headers were accepted (a 128 MiB
header cost 16.7 s of CPU on the event loop), and 200 slowloris connections held for 60 s were
never closed. Here the timeouts are 1 s so that each case takes about a second.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from bastion.benchmarks import hostile
from tests.conftest import ServerProcess, start_server
from tests.security.harness import (
    HOST,
    assert_live,
    reply_error,
    trickle,
    under_attack,
    wait_closed,
)

pytestmark = pytest.mark.e2e
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "BASTION_HTTP_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "BASTION_HTTP_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "BASTION_HTTP_KEEPALIVE_TIMEOUT_S": str(TIMEOUT_S),
    }
    proc = start_server(tmp_path_factory.mktemp("head"), env=env)
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (hostile.huge_header(16 << 20), "exceeds 32768 bytes"),
        (hostile.many_headers(20_000), ""),  # over the head size before the count: either
        (hostile.many_headers(101), "more than 100 headers"),
    ],
    ids=["a-16-MiB-header", "20000-headers", "101-small-headers"],
)
def test_an_oversized_head_is_refused_431_and_closed(
    server: ServerProcess, payload: bytes, words: str
) -> None:
    replies, probes = under_attack(
        server, lambda: hostile.exchange(HOST, server.port, payload), workers=2
    )
    for reply in replies:
        assert words in reply_error(reply, 431)
        assert reply.closed
    assert_live(probes)


def test_a_slowloris_head_gets_408_after_the_header_timeout_and_is_closed(
    server: ServerProcess,
) -> None:
    def slowloris() -> hostile.Reply:
        return trickle(server, hostile.SLOW_HEAD, hostile.SLOW_HEAD_TRICKLE, 0.1, 10)

    replies, probes = under_attack(server, slowloris, min_s=0.1, workers=4)
    for reply in replies:
        assert "not received within 1 s" in reply_error(reply, 408)
        assert reply.closed
        assert TIMEOUT_S * 0.9 <= reply.seconds <= TIMEOUT_S + 2.0
    assert_live(probes)


def test_a_slow_body_gets_408_after_the_body_timeout_and_is_closed(server: ServerProcess) -> None:
    head = hostile.request_bytes(
        "POST", "/v2/models/digits/infer", {"Content-Length": "100000"}, b""
    )

    def slow_body() -> hostile.Reply:
        return trickle(server, head + b"{", b" " * 1000, 0.1, 10)

    replies, probes = under_attack(server, slow_body, min_s=0.1, workers=4)
    for reply in replies:
        assert "body not received within 1 s" in reply_error(reply, 408)
        assert reply.closed
        assert TIMEOUT_S * 0.9 <= reply.seconds <= TIMEOUT_S + 2.0
    assert_live(probes)


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(server: ServerProcess) -> None:
    def silent() -> tuple[float, bytes]:
        with socket.create_connection((HOST, server.port)) as sock:
            return wait_closed(sock, 10)

    def idle_after_a_request() -> tuple[float, bytes]:
        with socket.create_connection((HOST, server.port)) as sock:
            sock.sendall(hostile.request_bytes("GET", "/v2/health/live"))
            reply = hostile.read_reply(sock, time.monotonic() + 5)
            assert reply.status == 200 and not reply.closed
            return wait_closed(sock, 10)

    for idle in (silent, idle_after_a_request):
        results, probes = under_attack(server, idle, min_s=0.1, workers=4)
        for seconds, sent in results:
            assert sent == b""  # closed without a word: nothing was asked
            assert TIMEOUT_S * 0.9 <= seconds <= TIMEOUT_S + 2.0
        assert_live(probes)
