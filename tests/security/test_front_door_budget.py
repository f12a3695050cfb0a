"""The decode budget, end to end: a request that takes longer to decode than its budget is
refused with 413, and the next one is decoded under a budget of its own.

Per-model bounds keep every request of the bundled model cheap to decode (milliseconds), so the
server here runs with a 1 ms budget, which a body of 64 PNGs cannot meet.
"""

from __future__ import annotations

import io
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
    proc = start_server(tmp_path_factory.mktemp("budget"), env={"BASTION_DECODE_BUDGET_MS": "1"})
    yield proc
    proc.stop()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_a_request_past_its_decode_budget_gets_413_and_counts_as_such(
    server: ServerProcess,
) -> None:
    body, headers = hostile.bytes_body([png(i) for i in range(64)] * 1, [64])
    slow = hostile.request_bytes("POST", INFER, headers, body)
    replies, probes = under_attack(server, lambda: hostile.exchange(HOST, server.port, slow))
    for reply in replies:
        assert "decode budget of 1 ms" in reply_error(reply, 413)
    assert_live(probes)
    metrics = httpx.get(f"http://{server.url}/metrics", timeout=10).text
    assert f'bastion_http_rejected_total{{reason="decode_budget"}} {float(len(replies))}' in (
        metrics
    )
