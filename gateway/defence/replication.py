"""The stateful defence shared by replicas: every replica's evidence, through one Redis stream.

Each replica weighs its own requests (fingerprint lookup, k-NN, the sequential test) in memory,
as one gateway does, and appends what it decided to the stream ``bastion:defence``: per request,
one entry holding every image's evidence (the query's fingerprint and content hash, what it was
answered, its verdict, whether it was a probe and whom it linked to, the k-NN verdict and
embedding), a refusal (which queries were refused, so a near-duplicate of one is refused
everywhere) or a release. Every replica reads the stream (``XREAD BLOCK``: entries arrive as
they are appended, nothing is polled) and applies the other replicas' entries to its own index,
histories and ladder (``DefenceService.replay``), so a rotating attacker's identities, spread
over replicas by the load balancer, add up to one campaign, and a client contained through one
replica is refused by all of them within milliseconds.

Off the hot path: a request's entry goes to a bounded queue; one thread sends whatever is queued
in one pipelined round trip (at most one per batch, fewer under load), another reads. The
stream is capped (``MAXLEN ~``) and its entries carry their replica's id; a replica that starts
(or restarts) replays the stream's retained entries first, so the evidence and the containment
ladder survive a restart of any one replica. When Redis does not answer, a replica keeps
defending on its own evidence (the queue holds ``backlog`` entries, then drops and counts) and
catches up when Redis is back.

Entries are plain fields (JSON for the scalars, little-endian arrays for fingerprints, answers
and embeddings): nothing is unpickled, and a malformed entry is counted and skipped.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from bastion.gateway.defence.observation import Evidence
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.monitoring.metrics import Metrics

log = logging.getLogger(__name__)

STREAM = "bastion:defence"
SALT_KEY = "bastion:defence:salt"
MAX_IMAGES = 4096  # per entry: more than any batch
MAX_STRING = 512


def shared_salt(redis: Any) -> int:
    """The fingerprint salt every replica uses (fingerprints must agree to match across
    replicas): the first replica sets a random one, the others read it (sync ``redis``
    client). Raises ``redis.RedisError`` when Redis does not answer."""
    redis.set(SALT_KEY, str(secrets.randbits(62)), nx=True)
    return int(redis.get(SALT_KEY))


def encode_evidence(origin: str, batch: list[Evidence]) -> dict[str, bytes]:
    """One stream entry for a request's evidence."""
    scalars = [
        [
            e.client,
            e.content,
            e.flagged,
            e.adversarial,
            e.probe,
            e.linked,
            e.near,
            e.flag_rate,
            e.block_rate,
            e.near_rate,
            e.answer_key,
            e.model,
            e.resend,
        ]
        for e in batch
    ]
    fields = {
        "origin": origin.encode(),
        "kind": b"evidence",
        "scalars": json.dumps(scalars).encode(),
        "prints": np.stack([e.fingerprint for e in batch]).astype("<i8").tobytes(),
    }
    answers = [e.answer for e in batch]
    if all(a is not None for a in answers):
        fields["answers"] = np.stack(answers).astype("<f4").tobytes()  # type: ignore[arg-type]
    embeddings = [e.embedding for e in batch]
    if all(v is not None for v in embeddings):
        fields["embeddings"] = np.stack(embeddings).astype("<f4").tobytes()  # type: ignore[arg-type]
    return fields


def decode_evidence(fields: dict[bytes, bytes], top: int) -> list[Evidence]:
    """The evidence in an entry; raises ``ValueError`` for one that is malformed."""
    scalars = json.loads(fields[b"scalars"])
    n = len(scalars)
    if not isinstance(scalars, list) or not 0 < n <= MAX_IMAGES:
        raise ValueError("evidence entry: bad image count")
    prints = np.frombuffer(fields[b"prints"], "<i8")
    if prints.size != n * top:
        raise ValueError("evidence entry: fingerprints do not match the image count")
    prints = prints.reshape(n, top).astype(np.int64)
    answers = _rows(fields.get(b"answers"), n)
    embeddings = _rows(fields.get(b"embeddings"), n)
    batch = []
    for i, row in enumerate(scalars):
        if not isinstance(row, list) or len(row) not in (12, 13):
            raise ValueError("evidence entry: bad scalars")
        client, content, flagged, adversarial, probe, linked, near, fr, br, nr, key, model = row[
            :12
        ]
        resend = len(row) == 13 and row[12] is True
        if not isinstance(client, str) or len(client) > MAX_STRING:
            raise ValueError("evidence entry: bad client")
        if linked is not None and (not isinstance(linked, str) or len(linked) > MAX_STRING):
            raise ValueError("evidence entry: bad link")
        batch.append(
            Evidence(
                client,
                prints[i],
                _int64(content),
                bool(flagged),
                bool(adversarial),
                bool(probe),
                linked,
                None if near is None else bool(near),
                _rate(fr),
                _rate(br),
                _rate(nr),
                _int64(key),
                None if answers is None else answers[i],
                model if isinstance(model, str) and len(model) <= MAX_STRING else None,
                None if embeddings is None else embeddings[i],
                resend,
            )
        )
    return batch


def _rows(raw: bytes | None, n: int) -> np.ndarray | None:
    if raw is None:
        return None
    values = np.frombuffer(raw, "<f4")
    if values.size % n or values.size // n > 4096:
        raise ValueError("evidence entry: rows do not match the image count")
    return values.reshape(n, -1).astype(np.float32)


def _int64(value: Any) -> int:
    number = int(value)
    if not -(2**63) <= number < 2**63:
        raise ValueError("evidence entry: an integer outside int64")
    return number


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry's id (``ms-seq``) as a pair that orders as Redis does."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    rate = float(value)
    if not 0 < rate < 1:  # NaN too
        raise ValueError("evidence entry: a rate outside (0, 1)")
    return rate


class Replication:
    """Sends this replica's defence entries to the stream and applies the others' (threads).

    ``redis``: a sync ``redis.Redis`` (``decode_responses`` off). ``start`` replays what the
    stream holds, then follows it; ``close`` stops both threads."""

    def __init__(
        self,
        redis: Any,
        defence: DefenceService,
        metrics: Metrics,
        maxlen: int = 100_000,
        backlog: int = 4096,
        failed: Callable[[str], None] = lambda op: None,
        round_trip: Callable[[str], None] = lambda op: None,
    ) -> None:
        self.redis, self.defence, self.metrics = redis, defence, metrics
        self.maxlen, self.failed, self.round_trip = maxlen, failed, round_trip
        self.origin = secrets.token_hex(8)  # this process: its own entries are not replayed
        self._queue: queue.Queue[dict[str, bytes]] = queue.Queue(backlog)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.applied = 0  # the other replicas' entries applied here
        self.caught_up = threading.Event()  # the stream as it was at start has been replayed
        self._target: tuple[int, int] | None = None

    def start(self) -> None:
        """Notes how far the stream reaches now (caught up once the follower has read that
        far; at once when it is empty, or when Redis does not answer: there is nothing this
        replica could replay), then starts both threads. Blocks up to a Redis timeout."""
        try:
            newest = self.redis.xrevrange(STREAM, count=1)
        except Exception as exc:
            log.warning("defence stream not reachable at start (%r): nothing to replay", exc)
            newest = []
        self._target = _entry_id(newest[0][0]) if newest else None
        if self._target is None:
            self.caught_up.set()
        self.defence.on_evidence = self._evidence
        self.defence.on_refusal = self._refusal
        self.defence.on_release = self._release
        for target, name in ((self._send, "send"), (self._follow, "follow")):
            thread = threading.Thread(target=target, name=f"defence-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.defence.on_evidence = self.defence.on_refusal = self.defence.on_release = None
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _put(self, fields: dict[str, bytes]) -> None:
        try:
            self._queue.put_nowait(fields)
        except queue.Full:
            self.metrics.shared_state_errors.labels("redis", "defence_dropped").inc()

    def _evidence(self, batch: list[Evidence]) -> None:
        self._put(encode_evidence(self.origin, batch))

    def _refusal(self, answer_key: int, contents: list[int]) -> None:
        body = json.dumps({"answer_key": answer_key, "contents": contents[:MAX_IMAGES]})
        self._put({"origin": self.origin.encode(), "kind": b"refusal", "body": body.encode()})

    def _release(self, client: str) -> None:
        body = json.dumps({"client": client})
        self._put({"origin": self.origin.encode(), "kind": b"release", "body": body.encode()})

    def _send(self) -> None:
        """Sends what is queued, all of it in one pipelined round trip."""
        pending: list[dict[str, bytes]] = []
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    continue
            while len(pending) < 256:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                pipe = self.redis.pipeline(transaction=False)
                for fields in pending:
                    pipe.xadd(STREAM, fields, maxlen=self.maxlen, approximate=True)
                self.round_trip("defence_send")
                pipe.execute()
                pending.clear()
            except Exception:  # Redis away: keep them (bounded by the queue) and try again
                self.failed("defence_send")
                if len(pending) > self._queue.maxsize:
                    self.metrics.shared_state_errors.labels("redis", "defence_dropped").inc(
                        len(pending) - self._queue.maxsize
                    )
                    del pending[: len(pending) - self._queue.maxsize]
                self._stop.wait(1.0)

    def _follow(self) -> None:
        """Replays the retained stream, then applies each new entry as it arrives."""
        last = "0-0"
        while not self._stop.is_set():
            try:
                answer = self.redis.xread({STREAM: last}, count=500, block=1000)
            except Exception:
                self.failed("defence_follow")
                self._stop.wait(1.0)
                continue
            if not answer:
                self.caught_up.set()
                continue
            for entry_id, fields in answer[0][1]:
                last = entry_id
                self._apply(fields)
                if self._target is not None and _entry_id(entry_id) >= self._target:
                    self.caught_up.set()

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        if fields.get(b"origin", b"").decode(errors="replace") == self.origin:
            return
        try:
            kind = fields.get(b"kind")
            if kind == b"evidence":
                top = self.defence.fingerprint_spec.top
                self.defence.replay(decode_evidence(fields, top))
            elif kind == b"refusal":
                body = json.loads(fields[b"body"])
                contents = [_int64(c) for c in body["contents"][:MAX_IMAGES]]
                self.defence.replay_refusal(_int64(body["answer_key"]), contents)
            elif kind == b"release":
                client = str(json.loads(fields[b"body"])["client"])[:MAX_STRING]
                with self.defence.lock:
                    if self.defence.ladder.account(client) is not None:
                        self.defence.release(client, replicate=False)
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except Exception as exc:  # whatever an entry holds, the follower goes on
            self.metrics.shared_state_errors.labels("redis", "defence_malformed").inc()
            log.warning("skipped a malformed defence entry: %r", exc)
            return
        self.applied += 1
