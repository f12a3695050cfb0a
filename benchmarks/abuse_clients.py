"""The processes of the abuse benchmark: a health prober, a clean client and the attackers.

Each runs in a process of its own (``multiprocessing`` spawn), so one attacker's work never
delays the prober's clock through the load generator's GIL. Times are ``time.monotonic()``,
one clock for every process on Linux, so the parent can cut the samples into phases.

The prober and the clean client send at a fixed rate and measure each latency from the moment
the request was *scheduled* (as wrk2 does): a server that stalls for a second cannot hide the
stall by making the client send fewer requests (coordinated omission). The time from the actual
send is kept too.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from bastion.benchmarks import hostile

# scheduled time, seconds from then to the answer, seconds from the actual send, status
Sample = tuple[float, float, float, int]
TIMED_OUT, NO_RESPONSE = -1, 0  # the status of a sample without a response
ATTACKS = ("image", "bytes_flood", "gzip_bomb", "header_flood")
EXTRA_ATTACKS = ("slowloris", "json_strings")  # slowloris: only the held connections
HANG = "hang"
NO_ANSWER = "closed_without_answer"


def _paced(rate_hz: float, stop: Event) -> Any:
    """Yields scheduled send times at ``rate_hz`` until ``stop``; late ticks are not skipped."""
    period, start, tick = 1.0 / rate_hz, time.monotonic(), 0
    while not stop.is_set():
        scheduled = start + tick * period
        delay = scheduled - time.monotonic()
        if delay > 0:
            stop.wait(delay)
            if stop.is_set():
                return
        yield scheduled
        tick += 1


def probe_health(
    host: str, port: int, rate_hz: float, timeout_s: float, ready: Queue, stop: Event, out: Queue
) -> None:
    """GET /v2/health/live at ``rate_hz`` over one kept-alive connection (re-opened if the server
    closes it); every fourth tick also over a fresh connection."""
    ready.put("health")
    kept: list[Sample] = []
    fresh: list[Sample] = []
    conn: http.client.HTTPConnection | None = None
    request = hostile.request_bytes("GET", "/v2/health/live")
    for tick, scheduled in enumerate(_paced(rate_hz, stop)):
        sent, status = time.monotonic(), NO_RESPONSE
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            status = TIMED_OUT if isinstance(exc, TimeoutError) else NO_RESPONSE
            if conn is not None:
                conn.close()
            conn = None
        done = time.monotonic()
        kept.append((scheduled, done - scheduled, done - sent, status))
        if tick % 4 == 0:
            sent = time.monotonic()
            try:
                reply = hostile.exchange(host, port, request, timeout_s)
                status = TIMED_OUT if reply.error == "timeout" else reply.status
            except OSError:
                status = NO_RESPONSE
            done = time.monotonic()
            fresh.append((sent, done - sent, done - sent, status))
    if conn is not None:
        conn.close()
    out.put(("health", {"kept_alive": kept, "fresh": fresh}))


def clean_client(
    host: str,
    port: int,
    rate_hz: float,
    timeout_s: float,
    ready: Queue,
    stop: Event,
    out: Queue,
    concurrency: int = 8,
) -> None:
    """Real test digits, one per request (binary tensor extension, as ``tritonclient`` encodes
    them), sent at a steady rate over up to ``concurrency`` kept-alive connections: open loop,
    so a slow answer does not hold back the next request (unless all are in use)."""
    import httpx

    from bastion.benchmarks.workload import build_request
    from bastion.models.data import load_split, to_float

    images = to_float(load_split("test")[0])
    bodies = [build_request(image) for image in images]
    url = f"http://{host}:{port}/v2/models/digits/infer"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def send(client: httpx.Client, index: int, scheduled: float) -> Sample:
        body, headers = bodies[index % len(bodies)]
        sent = time.monotonic()
        try:
            status = client.post(url, content=body, headers=headers).status_code
        except httpx.TimeoutException:
            status = TIMED_OUT
        except httpx.HTTPError:
            status = NO_RESPONSE
        done = time.monotonic()
        return scheduled, done - scheduled, done - sent, status

    ready.put("clean")
    with (
        httpx.Client(timeout=timeout_s, limits=limits) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        futures = [
            pool.submit(send, client, index, scheduled)
            for index, scheduled in enumerate(_paced(rate_hz, stop))
        ]
        samples = [future.result() for future in futures]
    out.put(("clean", samples))


@dataclass
class AttackTally:
    """What one attacker saw: answers by status, connections closed without one, hangs."""

    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)

    def record(self, kind: str, reply: hostile.Reply | None) -> None:
        if reply is None or reply.error == "timeout":
            self.outcomes[f"{kind}:{HANG}"] += 1
        elif reply.status:
            self.outcomes[f"{kind}:{reply.status}"] += 1
            self.seconds.append(reply.seconds)
        else:
            self.outcomes[f"{kind}:{NO_ANSWER}"] += 1


def _payloads(kind: str) -> list[bytes]:
    """Whole requests (head and body) for one attack kind; variants are sent in turn."""

    def infer(body_headers: tuple[bytes, dict[str, str]]) -> bytes:
        body, headers = body_headers
        return hostile.request_bytes("POST", "/v2/models/digits/infer", headers, body)

    if kind == "image":
        return [infer(hostile.image_body(hostile.oversized_png()))]
    if kind == "bytes_flood":
        return [infer(hostile.bytes_flood())]
    if kind == "gzip_bomb":
        limit = hostile.MAX_BODY_BYTES
        return [infer(hostile.gzip_bomb(limit + (1 << 20))), infer(hostile.gzip_bomb(limit - 1))]
    if kind == "header_flood":
        return [hostile.huge_header(), hostile.many_headers()]
    if kind == "json_strings":
        return [infer(hostile.json_strings())]
    if kind == "slowloris":
        return []
    raise ValueError(f"unknown attack {kind!r}; known: {ATTACKS + EXTRA_ATTACKS}")


class Slowloris:
    """Holds ``count`` connections that trickle a request head one byte per ``trickle_s``.

    Each should be answered 408 and closed once the server's head timeout passes; one still open
    ``hang_after_s`` after it opened is counted a hang and dropped.
    """

    def __init__(self, host: str, port: int, count: int, trickle_s: float, hang_after_s: float):
        self.address, self.count = (host, port), count
        self.trickle_s, self.hang_after_s = trickle_s, hang_after_s
        self.tally = AttackTally()
        self._open: dict[socket.socket, tuple[float, int]] = {}  # opened at, bytes sent

    def run(self, stop: Event) -> None:
        while not stop.is_set():
            while len(self._open) < self.count and not stop.is_set():
                self._connect()
            readable, _, _ = select.select(list(self._open), [], [], self.trickle_s)
            for sock in readable:
                self._answered(sock)
            now = time.monotonic()
            for sock, (opened, sent) in list(self._open.items()):
                if now - opened > self.hang_after_s:
                    self.tally.record("slowloris", None)
                    self._drop(sock)
                    continue
                with contextlib.suppress(OSError):  # a reset shows up as readable next round
                    sock.send(hostile.SLOW_HEAD_TRICKLE[sent % 4096 : sent % 4096 + 1])
                    self._open[sock] = (opened, sent + 1)
        for sock in list(self._open):  # cut at the end of the phase: no outcome
            self._drop(sock)

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(hostile.SLOW_HEAD)
        except OSError:
            self.tally.record("slowloris", hostile.Reply())
            return
        sock.setblocking(False)
        self._open[sock] = (time.monotonic(), 0)

    def _answered(self, sock: socket.socket) -> None:
        opened, _ = self._open[sock]
        reply = hostile.read_reply(sock, time.monotonic() + 1.0)
        reply.seconds = time.monotonic() - opened
        self.tally.record("slowloris", reply)
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._open.pop(sock, None)
        sock.close()


def attacker(
    kind: str,
    host: str,
    port: int,
    settings: dict[str, float],
    ready: Queue,
    go: Event,
    stop: Event,
    out: Queue,
) -> None:
    """Builds its payloads, holds ``slowloris`` connections in a thread and sends its attack
    at ``rate_hz`` (closed loop when the server answers slower) from ``go`` until ``stop``.

    Attackers run at a lower CPU priority (``nice``): on a real network they would be other
    machines; here they share the cores with the gateway and the observers, and should take
    only what those leave rather than delay the prober's own clock."""
    os.nice(int(settings["nice"]))
    payloads = _payloads(kind)
    loris = Slowloris(
        host,
        port,
        int(settings["slowloris"]),
        settings["trickle_s"],
        settings["slowloris_hang_s"],
    )
    ready.put(kind)
    go.wait()
    thread = threading.Thread(target=loris.run, args=(stop,), daemon=True)
    thread.start()
    tally = AttackTally()
    for index, _ in enumerate(_paced(settings["rate_hz"] if payloads else 1.0, stop)):
        if not payloads:  # slowloris only
            continue
        try:
            reply = hostile.exchange(
                host, port, payloads[index % len(payloads)], settings["timeout_s"]
            )
        except OSError as exc:  # refused to connect
            reply = hostile.Reply(error=type(exc).__name__)
        tally.record(kind, reply)
    thread.join(timeout=settings["slowloris_hang_s"] + 5)
    outcomes = tally.outcomes + loris.tally.outcomes
    out.put(("attack", {"kind": kind, "outcomes": dict(outcomes), "seconds": tally.seconds}))
