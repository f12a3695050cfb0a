"""Attacks against a real gateway, with /v2/health/live probed while each one runs.

``under_attack`` repeats an attack in background threads for a short window while this thread
probes health over a kept-alive connection opened before the attack; ``assert_live`` then checks
the median probe (robust to one noisy moment on a shared 2-core machine, yet far over 50 ms if
the event loop is stalled for most of the window). Payloads and the raw HTTP exchange come from
``benchmarks.hostile``, which the abuse benchmark fires too.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import numpy as np

from bastion.benchmarks.hostile import HEADER_LENGTH, Reply, read_reply
from tests.conftest import ServerProcess

T = TypeVar("T")
HOST = "127.0.0.1"
STALL_MS = 500.0
LIVE_MS = 50.0
ADMIN_TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Probe:
    ms: float
    status: int  # 0: no answer within the probe's timeout


def probe(client: httpx.Client) -> Probe:
    started = time.perf_counter()
    try:
        status = client.get("/v2/health/live").status_code
    except httpx.HTTPError:
        status = 0
    return Probe((time.perf_counter() - started) * 1e3, status)


def under_attack(
    server: ServerProcess,
    attack: Callable[[], T],
    *,
    min_s: float = 0.6,
    workers: int = 1,
    interval_s: float = 0.02,
) -> tuple[list[T], list[Probe]]:
    """Runs ``attack`` in ``workers`` threads, each at least once and again until ``min_s`` has
    passed, probing health every ``interval_s`` until every thread is done."""
    results: list[T] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def repeat() -> None:
        try:
            results.append(attack())
            while not stop.is_set():
                results.append(attack())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    probes: list[Probe] = []
    with httpx.Client(base_url=f"http://{server.url}", timeout=2.0) as client:
        probe(client)  # the connection is open before the attack starts
        threads = [threading.Thread(target=repeat, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + min_s
        while any(thread.is_alive() for thread in threads):
            if time.monotonic() >= deadline:
                stop.set()
            probes.append(probe(client))
            time.sleep(interval_s)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results, probes


def assert_live(probes: list[Probe], limit_ms: float = LIVE_MS) -> None:
    """Health answered 200 to every probe, the median probe within ``limit_ms`` and none
    stalled (``STALL_MS``): a median alone would miss a loop blocked for seconds now and then,
    a strict maximum would fail on this shared 2-core machine's scheduling noise."""
    assert len(probes) >= 3, f"only {len(probes)} health probes ran during the attack"
    failed = [p for p in probes if p.status != 200]
    assert not failed, f"/v2/health/live failed during the attack: {failed[:5]}"
    median = statistics.median(p.ms for p in probes)
    slowest = max(p.ms for p in probes)
    assert median <= limit_ms and slowest <= STALL_MS, (
        f"/v2/health/live took {median:.1f} ms (median of {len(probes)} probes, slowest "
        f"{slowest:.0f} ms) during the attack; the limits are {limit_ms:g} ms (median) and "
        f"{STALL_MS:g} ms (slowest)"
    )


def error_message(status: int, body: bytes, expected: int) -> str:
    """Checks a v2 error answer: the exact status and a JSON ``{"error": "..."}`` body."""
    assert status == expected, f"expected {expected}, got {status}: {body[:300]!r}"
    payload = json.loads(body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str), payload
    assert payload["error"], payload
    return payload["error"]


def reply_error(reply: Reply, expected: int) -> str:
    return error_message(reply.status, reply.body, expected)


def response_error(response: httpx.Response, expected: int) -> str:
    return error_message(response.status_code, response.content, expected)


def trickle(
    server: ServerProcess, first: bytes, drip: bytes, every_s: float, timeout_s: float
) -> Reply:
    """Sends ``first``, then ``drip`` one byte every ``every_s`` until the server answers or
    closes (``Reply.seconds``: from the first byte to then)."""
    sock = socket.create_connection((HOST, server.port), timeout=timeout_s)
    started = time.monotonic()
    try:
        sock.sendall(first)
        for index in range(len(drip)):
            readable, _, _ = select.select([sock], [], [], every_s)
            if readable or time.monotonic() - started > timeout_s:
                break
            try:
                sock.send(drip[index : index + 1])
            except OSError:
                break
        reply = read_reply(sock, started + timeout_s)
    finally:
        sock.close()
    reply.seconds = time.monotonic() - started
    return reply


def wait_closed(sock: socket.socket, timeout_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (EOF or reset), and what it sent first."""
    started = time.monotonic()
    received = b""
    sock.settimeout(timeout_s)
    try:
        while data := sock.recv(1 << 16):
            received += data
    except TimeoutError:
        return float("inf"), received
    except OSError:
        pass
    return time.monotonic() - started, received


def digit_body(index: int = 0) -> tuple[bytes, dict[str, str]]:
    """One real test digit as a binary-extension infer body (FP32 [1, 1, 28, 28])."""
    from bastion.models.data import load_split, to_float

    image = to_float(load_split("test")[0][index : index + 1])
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": list(image.shape),
                "parameters": {"binary_data_size": image.nbytes},
            }
        ]
    }
    js = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(js))}
    return js + np.ascontiguousarray(image).tobytes(), headers


def digit_json(index: int = 0, **extra: object) -> dict[str, object]:
    """One real test digit as a JSON infer request, with extra top-level keys."""
    from bastion.models.data import load_split, to_float

    image = to_float(load_split("test")[0][index : index + 1])
    tensor = {"name": "images", "datatype": "FP32", "shape": list(image.shape)}
    return {"inputs": [{**tensor, "data": image.ravel().tolist()}], **extra}
