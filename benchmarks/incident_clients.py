"""Clients of the incident benchmark (``benchmarks.incident``): the wire and honest traffic.

The wire is a kept-alive ``http.client`` connection speaking the v2 binary tensor extension, not
``tritonclient``: the attacker needs the ``Retry-After`` header of a 429 and the ``reason`` of a
403 (``contained`` or ``adversarial``), which ``InferenceServerException`` drops; honest clients
use the same wire so that both sides are measured alike.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

MODEL = "digits"
SHAPE = (1, 1, 28, 28)
OK, REPEAT, ERROR = "ok", "repeat", "error"
THROTTLED, CONTAINED, WITHHELD = "throttled", "contained", "withheld"
REFUSED_AGAIN = "refused again"  # 403 reason "repeat": a near-duplicate of a refused query
PROBED = "refused as a probe"  # 403 reason "probe": on a line through two earlier queries
# a 200 for a picture (the same 8-bit pixels) this attacker already had answered, with the same
# answer: nothing new learned (a retry), so not "answered after detection"; not a detection
# either (a deterministic model answers a retry the same, defence or not)
AGAIN = "answered again"
TRACE = {
    OK: ".",
    REPEAT: "r",
    AGAIN: "a",
    REFUSED_AGAIN: "R",
    PROBED: "P",
    THROTTLED: "T",
    CONTAINED: "C",
    WITHHELD: "W",
    ERROR: "E",
}
DEFENCE_ACTIONS = frozenset({REPEAT, REFUSED_AGAIN, PROBED, THROTTLED, CONTAINED})


@dataclass(frozen=True)
class Reply:
    outcome: str  # OK, THROTTLED, CONTAINED, REFUSED_AGAIN, PROBED, WITHHELD or ERROR (REPEAT:
    # ledger's call)
    probabilities: np.ndarray | None = None
    retry_after_s: float = 0.0
    latency_s: float = 0.0
    request_id: str | None = None  # the request's "id", when it had one
    version: str | None = None  # the model version that answered a 200


class GatewayClient:
    """One kept-alive connection; ``infer`` sends one FP32 image with an ``X-Client-ID``."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port, self.timeout_s = int(port), timeout_s
        self._conn: http.client.HTTPConnection | None = None
        header = {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(SHAPE),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": int(np.prod(SHAPE)) * 4},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
        self._fields = header
        self._header = json.dumps(header).encode()

    def infer(self, image: np.ndarray, client_id: str, request_id: str | None = None) -> Reply:
        """Sends one image as ``client_id`` (with the request ``id``, if given)."""
        head = self._header
        if request_id is not None:
            head = json.dumps({"id": request_id, **self._fields}).encode()
        body = head + np.ascontiguousarray(image, np.float32).reshape(SHAPE).tobytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
            "X-Client-ID": client_id,
        }
        started = time.perf_counter()
        for attempt in range(2):  # once more only for a kept-alive connection the server closed
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self.host, self.port, self.timeout_s)
                self._conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
                response = self._conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    return Reply(ERROR, latency_s=time.perf_counter() - started)
            except (http.client.HTTPException, OSError):
                self.close()
                return Reply(ERROR, latency_s=time.perf_counter() - started)
        latency = time.perf_counter() - started
        return replace(
            _parse(response.status, response.headers, payload, latency), request_id=request_id
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _parse(status: int, headers: Any, payload: bytes, latency: float) -> Reply:
    if status == 429:
        return Reply(
            THROTTLED, retry_after_s=float(headers.get("Retry-After", 1)), latency_s=latency
        )
    if status != 200:
        try:
            body = json.loads(payload)
        except ValueError:
            body = {}
        reason = body.get("reason")
        contained = reason == "contained" or "contained" in str(body.get("error"))
        outcome = ERROR
        if status == 403:
            defence = {"repeat": REFUSED_AGAIN, "probe": PROBED}
            outcome = CONTAINED if contained else defence.get(reason, WITHHELD)
        return Reply(outcome, latency_s=latency)
    length = int(headers.get("Inference-Header-Content-Length", len(payload)))
    meta, offset = json.loads(payload[:length]), length
    for output in meta["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == "probabilities":
            if size is None:
                values = np.asarray(output["data"], np.float32)
            else:
                values = np.frombuffer(payload[offset : offset + size], np.float32)
            version = str(meta.get("model_version"))
            return Reply(OK, values.reshape(-1, 10)[0].copy(), latency_s=latency, version=version)
        offset += size or 0
    return Reply(ERROR, latency_s=latency)


# -- honest traffic ---------------------------------------------------------------------------


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new photo of a digit: rotation ±12°, scale 0.9-1.1, shift ±2 px (bilinear), 8-bit."""
    from scipy.ndimage import affine_transform

    angle, scale = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.9, 1.1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation / scale  # output pixel -> input pixel
    centre = np.array([13.5, 13.5])
    offset = centre - matrix @ (centre + rng.uniform(-2, 2, size=2))
    moved = affine_transform(image.reshape(28, 28), matrix, offset, order=1, mode="constant")
    return (np.rint(np.clip(moved, 0, 1) * 255) / 255).astype(np.float32).reshape(1, 28, 28)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """The same picture saved as JPEG (Pillow) and read back as 8-bit pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.rint(image.reshape(28, 28) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    return (decoded.astype(np.float32) / 255).reshape(1, 28, 28)


@dataclass
class HonestSource:
    """One honest client's pictures: a fresh photo of one of its digits, and at ``mix`` each an
    exact retry (one of its last 20 images) and a JPEG re-encode of one of its earlier images."""

    digits: np.ndarray
    seed: int
    mix: float = 0.05
    recent: deque[np.ndarray] = field(default_factory=lambda: deque(maxlen=20))
    earlier: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def next(self) -> tuple[str, np.ndarray]:
        draw = self.rng.random()
        if draw < self.mix and self.recent:
            return "retry", self.recent[self.rng.integers(len(self.recent))]
        if draw < 2 * self.mix and self.earlier:
            picked = self.earlier[self.rng.integers(len(self.earlier))]
            kind, image = "jpeg", jpeg_roundtrip(picked, int(self.rng.integers(70, 96)))
        else:
            digit = self.digits[self.rng.integers(len(self.digits))]
            kind, image = "fresh", augment(digit, self.rng)
            self.earlier.append(image)
            if len(self.earlier) > 500:
                self.earlier.pop(self.rng.integers(500))
        self.recent.append(image)
        return kind, image


# time (epoch s), phase, client, kind of picture, outcome, latency (s), the picture (1, 28, 28)
HonestRecord = tuple[float, str, str, str, str, float, np.ndarray]


class HonestFleet:
    """Honest identities, one thread each, paced at ``rate_hz``; every reply is recorded with
    its time, the phase in force, the kind of picture sent and the picture itself (so the
    report can tell the screening's refusals from the defence's). ``newcomers`` threads more
    each take a fresh identity (``newcomer-<thread>-<n>``, with a fresh picture history)
    every ``rotate`` requests: the young identities the alert's tightened policy and the
    campaign links weigh on."""

    def __init__(
        self,
        url: str,
        digits: np.ndarray,
        clients: int,
        rate_hz: float,
        seed: int,
        newcomers: int = 0,
        rotate: int = 10,
    ):
        self.url, self.rate_hz, self.phase, self.rotate = url, rate_hz, "before", rotate
        self.records: list[HonestRecord] = []
        self._stop = threading.Event()
        share = clients + newcomers
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(f"honest-{i}", digits[i::share], seed + i, i >= clients),
                daemon=True,
            )
            for i in range(share)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[HonestRecord]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.records

    def _run(self, name: str, digits: np.ndarray, seed: int, newcomer: bool) -> None:
        client, period = GatewayClient(self.url), 1.0 / self.rate_hz
        source, sent = HonestSource(digits, seed), 0
        due = time.monotonic()
        while not self._stop.is_set():
            who = name
            if newcomer:
                identity = sent // self.rotate
                who = f"newcomer-{name.removeprefix('honest-')}-{identity}"
                if sent % self.rotate == 0 and sent:
                    source = HonestSource(digits, seed + 1_000_003 * identity)
            kind, image = source.next()
            phase = self.phase
            reply = client.infer(image, who)
            sent += 1
            self.records.append(
                (time.time(), phase, who, kind, reply.outcome, reply.latency_s, image)
            )
            due = max(due + period, time.monotonic() - period)
            self._stop.wait(max(0.0, due - time.monotonic()))
        client.close()


def volume_worker(job: tuple[str, str, np.ndarray, int, float, int]) -> dict[str, Any]:
    """One honest identity as fast as it goes (a process of the volume check): counts by outcome
    and by kind of picture, until ``count`` requests are sent or ``deadline`` (epoch s) passes."""
    url, name, digits, count, deadline, seed = job
    client, source = GatewayClient(url), HonestSource(digits, seed)
    outcomes: dict[str, int] = {}
    refused_kinds: dict[str, int] = {}
    first_contained: int | None = None
    sent, started = 0, time.perf_counter()
    while sent < count and time.time() < deadline:
        kind, image = source.next()
        outcome = client.infer(image, name).outcome
        sent += 1
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome != OK:
            refused_kinds[kind] = refused_kinds.get(kind, 0) + 1
        if outcome in (THROTTLED, CONTAINED) and first_contained is None:
            first_contained = sent
    client.close()
    return {
        "client": name,
        "sent": sent,
        "seconds": time.perf_counter() - started,
        "outcomes": outcomes,
        "refused_by_kind": refused_kinds,
        "first_throttled_or_contained": first_contained,
    }
