"""Hostile infer bodies are refused from what is cheap to check, off the event loop.

Before the fix, PNG decoding, BYTES splitting and gzip inflation ran on the event loop: four
clients sending 65 KB PNGs of 4096x4096 pushed /v2/health/live to 472 ms, and one 64 MiB body
of 16 M empty BYTES elements stalled every route for 6 s. The server runs with every limit at
its default here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bastion.benchmarks import hostile
from tests.conftest import ServerProcess, start_server
from tests.security.harness import HOST, assert_live, reply_error, under_attack

pytestmark = pytest.mark.e2e
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("bodies"))
    yield proc
    proc.stop()


def infer_request(body_headers: tuple[bytes, dict[str, str]]) -> bytes:
    body, headers = body_headers
    return hostile.request_bytes("POST", INFER, headers, body)


BODY_LIMIT, IMAGE_LIMIT = hostile.model_limits("digits")


def test_an_oversized_png_is_refused_400_from_its_header(server: ServerProcess) -> None:
    png = hostile.oversized_png(2048, 2048)
    assert len(png) < IMAGE_LIMIT  # small on the wire, 16 MiB of pixels once decoded
    request = infer_request(hostile.image_body(png))
    replies, probes = under_attack(
        server, lambda: hostile.exchange(HOST, server.port, request), workers=4
    )
    for reply in replies:
        assert "is 2048x2048, the model expects 28x28" in reply_error(reply, 400)
    assert_live(probes)


def test_an_image_larger_than_the_model_could_need_is_refused_before_it_is_opened(
    server: ServerProcess,
) -> None:
    png = hostile.oversized_png()  # 65 KB: a 28x28 image never needs that many bytes
    request = infer_request(hostile.image_body(png))
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert f"over the limit of {IMAGE_LIMIT}" in reply_error(reply, 400)
    assert_live(probes)


def test_a_bytes_flood_of_16m_elements_is_refused_413_before_its_body_is_read(
    server: ServerProcess,
) -> None:
    request = infer_request(hostile.bytes_flood(16_000_000))
    assert len(request) > 64_000_000
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert f"exceeds the limit of {BODY_LIMIT}" in reply_error(reply, 413)
    assert_live(probes)


def test_a_bytes_flood_within_the_body_limit_is_refused_400_before_splitting(
    server: ServerProcess,
) -> None:
    count = (BODY_LIMIT - 4096) // 4
    request = infer_request(hostile.bytes_flood(count))
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert f"batch size {count} is outside 1..64" in reply_error(reply, 400)
    assert_live(probes)


@pytest.mark.parametrize(
    ("inflated", "status", "words"),
    [
        (hostile.MAX_BODY_BYTES + (1 << 20), 413, "decompressed body is larger than the limit"),
        (BODY_LIMIT + 1, 413, f"decompressed body is larger than the limit of {BODY_LIMIT}"),
        (BODY_LIMIT - 1, 400, "bytes after the binary inputs"),
    ],
    ids=["past-the-global-limit", "past-the-model-limit", "just-under-it"],
)
def test_a_gzip_bomb_is_refused_without_a_5xx(
    server: ServerProcess, inflated: int, status: int, words: str
) -> None:
    body, headers = hostile.gzip_bomb(inflated)
    assert len(body) < 100_000  # about 1,000:1
    request = infer_request((body, headers))
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert words in reply_error(reply, status)
    assert_live(probes)


def test_a_16_mib_json_body_is_refused_413_before_it_is_read(server: ServerProcess) -> None:
    request = infer_request(hostile.json_strings(16 << 20))
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, request))
    for reply in replies:
        assert f"exceeds the limit of {BODY_LIMIT}" in reply_error(reply, 413)
    assert_live(probes)


def test_the_largest_json_body_the_model_allows_does_not_stall_the_event_loop(
    server: ServerProcess,
) -> None:
    """Parsing holds the GIL on its decode thread: the per-model bound keeps that short."""
    request = infer_request(hostile.json_strings(BODY_LIMIT - 1024))
    replies, probes = under_attack(
        server, lambda: hostile.exchange(HOST, server.port, request), interval_s=0.005
    )
    for reply in replies:
        reply_error(reply, 400)  # far more values than shape [1] holds
    assert_live(probes)
