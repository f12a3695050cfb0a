"""The served-prediction ledger: what was answered to whom, for the impact report.

One row per screened image: the time, the client, model and version, the request id, what
became of it (``served``, ``withheld`` by the screening, ``refused`` by the defence), a hash of
its raw bytes, a sketch of its content fingerprint, the predicted class, its confidence and the
tier verdict. Refused rows are kept beside served ones: they are the campaign's own queries,
which the report matches served inputs against.

The sketch is the ``SKETCH`` largest of the query's top-S window hashes (Blacklight keeps the
top S = 50; two near-duplicates share at least T = 25 of them): 16 int64s, 128 bytes, so a
million rows stay small. Two sketches sharing ``SKETCH_MATCH`` of their hashes mark a
near-duplicate for the report (a MinHash-style estimate of the shared fraction, Broder 1997).
On 300 test digits and their 1 %-pixel steps, 12 of 16 keeps every near-duplicate and matches
0.007 % of pairs of different digits (8 hashes with 4 shared matched 0.56 %).

Writes are off the hot path: ``submit`` puts a request's rows (or what they are built from)
on a bounded queue and returns; one thread wakes at most every ``GATHER_S``, builds the rows
and inserts what gathered in one transaction (a thread switch per request would cost the
event loop more than the rows do). On SQLite, WAL with ``synchronous=NORMAL``: a committed
batch survives the process being killed. With ``database_url`` the rows go to PostgreSQL, one
table for every replica, the same bounds over all of them. Retention by age and by row count
runs in the same thread every ``SWEEP_INTERVAL_S``. A full queue, or a batch the database
would not take, drops the rows and counts them.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bastion.gateway.defence.fingerprint import content_hash
from bastion.gateway.incidents.database import Database, SQLiteDatabase

log = logging.getLogger(__name__)
SKETCH = 16
SKETCH_MATCH = 12
SWEEP_INTERVAL_S = 10.0
GATHER_S = 0.05
# failed: accepted, screened and let through, but its remote upstream gave no answer
OUTCOMES = ("served", "withheld", "refused", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    request_id TEXT,
    outcome TEXT NOT NULL,
    input_hash INTEGER NOT NULL,
    sketch BLOB NOT NULL,
    predicted INTEGER NOT NULL,
    confidence REAL NOT NULL,
    tier TEXT NOT NULL,
    margin REAL,
    pixel_mean REAL,
    pixel_std REAL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS served_client ON served (client, time);
"""
COLUMNS = (
    "time, client, model, version, request_id, outcome, input_hash, sketch, predicted, "
    "confidence, tier, margin, pixel_mean, pixel_std, embedding"
)
# the drift statistics of each image (``gateway.monitoring.reference.STATISTICS``), added to a
# ledger file written before they were: what ``bastion drift report`` reads as a window
_DRIFT_COLUMNS = {"margin": "REAL", "pixel_mean": "REAL", "pixel_std": "REAL", "embedding": "BLOB"}
EMBEDDING_SUMMARY = 8  # dimensions the penultimate embedding is projected to for the record
_PROJECTION_SEED = 20261201


class Row(NamedTuple):
    """One ledger row, in the table's column order (a tuple: inserted as it is)."""

    time: float
    client: str
    model: str
    version: str
    request_id: str | None
    outcome: str
    input_hash: int
    sketch: bytes
    predicted: int
    confidence: float
    tier: str
    margin: float | None = None
    pixel_mean: float | None = None
    pixel_std: float | None = None
    embedding: bytes | None = None  # EMBEDDING_SUMMARY float32, little-endian


def embedding_projection(width: int) -> np.ndarray:
    """The fixed Gaussian random projection (width, ``EMBEDDING_SUMMARY``) float32 that
    summarises an embedding for the ledger; distances are kept in expectation (Johnson and
    Lindenstrauss, 1984), so a shift in the embeddings shows in the summary too."""
    rng = np.random.default_rng(_PROJECTION_SEED + width)
    scale = 1.0 / np.sqrt(EMBEDDING_SUMMARY)
    return (rng.standard_normal((width, EMBEDDING_SUMMARY)) * scale).astype(np.float32)


def image_statistics(
    inputs: np.ndarray, flat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: top-1 minus top-2 of ``flat`` (n, C) probabilities (NaN already zeroed), and
    the pixels' mean and sample sd, as the drift monitor computes them
    (``monitoring.reference.scalar_statistics``). Few numpy calls: it runs for every request."""
    n = len(inputs)
    top = (
        np.partition(flat, -2, axis=1)[:, -2:] if flat.shape[1] > 1 else np.hstack([flat, flat * 0])
    )
    pixels = inputs.reshape(n, -1)
    size = pixels.shape[1]
    total = pixels.sum(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", pixels, pixels, dtype=np.float64)
    mean = total / size
    var = np.maximum(squares - size * mean * mean, 0.0) / max(size - 1, 1)
    return np.abs(top[:, 1] - top[:, 0]), mean, np.sqrt(var)


def sketches(prints: np.ndarray) -> list[bytes]:
    """Each row's ``SKETCH`` largest window hashes (``prints``: (n, S) int64, top-S, padded with
    the smallest int64), as little-endian bytes."""
    top = np.sort(prints, axis=1)[:, -SKETCH:]
    return [row.astype("<i8").tobytes() for row in top]


def shared(a: bytes, b: bytes) -> int:
    """How many hashes two sketches have in common."""
    return len(set(np.frombuffer(a, "<i8").tolist()) & set(np.frombuffer(b, "<i8").tolist()))


def predictions(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class and its probability per row of ``probabilities`` (n, C)."""
    flat = _flat(probabilities)
    return flat.argmax(axis=1), np.clip(flat.max(axis=1), 0.0, 1.0)


def _flat(probabilities: np.ndarray) -> np.ndarray:
    return np.nan_to_num(probabilities.reshape(len(probabilities), -1), nan=0.0)


def ledger_rows(
    model: tuple[str, str],
    caller: tuple[str | None, str | None],
    inputs: np.ndarray,
    outputs: dict[str, np.ndarray],
    prints: np.ndarray | None,
    verdicts: Sequence[str],
    outcome: str,
    now: float | None = None,
    embeddings: np.ndarray | None = None,
) -> list[Row]:
    """One request's rows: ``model`` (name, version), ``caller`` (client, request id), the
    input rows (n, ...), the outputs as answered (after any repeat), the fingerprints (n, S)
    if the defence computed them, one verdict per image, and the request's outcome. The class
    and confidence come from an output named ``probabilities``, else from the softmax of the
    first output. ``embeddings`` (n, E): the penultimate layer when the batch computed it,
    recorded as its ``EMBEDDING_SUMMARY``-dimensional projection."""
    probabilities = outputs.get("probabilities")
    if probabilities is None:
        logits = next(iter(outputs.values())).reshape(len(inputs), -1).astype(np.float64)
        logits = np.nan_to_num(logits, nan=0.0, posinf=1e30, neginf=-1e30)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    flat = _flat(probabilities)
    predicted, confidence = flat.argmax(axis=1), np.clip(flat.max(axis=1), 0.0, 1.0)
    margin, pixel_mean, pixel_std = image_statistics(inputs, flat)
    marks = sketches(prints) if prints is not None else [b""] * len(inputs)
    summaries: list[bytes | None] = [None] * len(inputs)
    if embeddings is not None and len(embeddings) == len(inputs):
        flat = np.nan_to_num(embeddings.reshape(len(inputs), -1).astype(np.float32))
        projected = (flat @ embedding_projection(flat.shape[1])).astype("<f4")
        summaries = [row.tobytes() for row in projected]
    now, client = time.time() if now is None else now, caller[0] or "(anonymous)"
    return [
        Row(now, client, model[0], model[1], caller[1], outcome, content_hash(inputs[i]),
            marks[i], int(predicted[i]), float(confidence[i]), verdicts[i], float(margin[i]),
            float(pixel_mean[i]), float(pixel_std[i]), summaries[i])
        for i in range(len(inputs))
    ]  # fmt: skip


def _built(parts: tuple[Any, ...]) -> list[Row]:
    try:
        return ledger_rows(*parts)
    except Exception:  # a malformed output must not stop the ledger
        log.exception("ledger: could not build the rows of a request to %s", parts[0])
        return []


@dataclass(frozen=True, slots=True)
class _Traced:
    """A traced request's parts and its span's context."""

    parts: tuple[Any, ...]
    span: Any


class Ledger:
    """The ledger, written by one thread: ``where`` is the SQLite file, or an open
    ``Database`` (PostgreSQL, which the replicas share)."""

    def __init__(
        self,
        where: str | Path | Database,
        retention_s: float,
        max_rows: int,
        backlog: int = 10_000,
        on_drop: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        local = isinstance(where, str | Path)
        self._db = SQLiteDatabase(where, "NORMAL", _SCHEMA) if local else where
        if local:
            _add_drift_columns(self._db)
        self.retention_s, self.max_rows = retention_s, max_rows
        self.clock, self._on_drop = clock, on_drop
        # a request's rows, or what they are built from (``ledger_rows``' arguments): the
        # hashing and packing then happen on the writer's thread, not the request's
        self._queue: queue.Queue[Sequence[Row] | tuple[Any, ...] | None] = queue.Queue(
            maxsize=backlog
        )
        self.written = 0
        self.tracing: Any = None  # gateway.monitoring.tracing's, when tracing is on
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[Row]) -> bool:
        """Queues one request's rows; False (rows dropped and counted) when the queue is full."""
        return self._put(rows, len(rows))

    def submit_request(self, *parts: Any) -> bool:
        """Queues what ``ledger_rows`` builds one request's rows from (its arguments, the time
        included), so the request's thread pays only for the queue. With tracing on, the
        request's span is kept for the link from the ``bastion.store`` span that writes it."""
        traced = self.tracing.current() if self.tracing is not None else None
        return self._put(parts if traced is None else _Traced(parts, traced), len(parts[2]))

    def _put(self, item: Any, rows: int) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop(rows)
            return False
        return True

    def flush(self) -> None:
        """Returns once every row queued so far is committed."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        while True:
            first = self._queue.get()
            if first is not None:  # gather for a moment: one wake-up and one transaction for
                time.sleep(GATHER_S)  # many requests, not a thread switch per request
            items = [first]
            while len(items) < 4096:  # whatever else is waiting: one transaction for all
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows: list[Row] = []
            linked: list[Any] = []  # the traced requests' span contexts
            for batch in items:
                if isinstance(batch, _Traced):
                    linked.append(batch.span)
                    batch = batch.parts
                if isinstance(batch, tuple):  # a request's parts: build its rows here
                    rows += _built(batch)
                elif batch is not None:
                    rows += batch
            try:
                if rows and linked:
                    with self.tracing.store("served", len(rows), linked):
                        self._insert(rows)
                elif rows:
                    self._insert(rows)
                if rows and time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            except (sqlite3.Error, OSError):  # a full disk, PostgreSQL away
                log.exception("ledger: %d rows not written", len(rows))
                if self._on_drop is not None:
                    self._on_drop(len(rows))
            finally:
                for _ in items:
                    self._queue.task_done()
            if any(batch is None for batch in items):
                return

    def _insert(self, rows: list[Row]) -> None:
        # one transaction: autocommit mode would commit every row (four times the cost)
        with self._db.transaction():
            self._db.insert_many("served", COLUMNS, rows)
        self.written += len(rows)

    def sweep(self) -> int:
        """Deletes rows older than ``retention_s`` and the oldest beyond ``max_rows``. Rows are
        appended in time order, so the first row young enough is found by a walk in id order
        that stops there (no index on time to pay for on every insert). On PostgreSQL, ids
        the replicas' rolled-back inserts skipped count as rows: fewer may be kept, never more."""
        with self._db.transaction():
            young = self._db.query(
                "SELECT id FROM served WHERE time >= ? ORDER BY id LIMIT 1",
                (self.clock() - self.retention_s,),
            )
            ((top,),) = self._db.query("SELECT MAX(id) FROM served")
            top = top or 0
            keep_from = max(top + 1 if not young else young[0][0], top - self.max_rows + 1)
            return self._db.run("DELETE FROM served WHERE id < ?", (keep_from,))

    def count(self) -> int:
        ((rows,),) = self._db.query("SELECT COUNT(*) FROM served")
        return int(rows)


def _add_drift_columns(db: SQLiteDatabase) -> None:
    """Adds the drift statistics' columns to a ledger file from before them (NULL there)."""
    present = {row[1] for row in db.query("PRAGMA table_info(served)")}
    with db.transaction():
        for name, kind in _DRIFT_COLUMNS.items():
            if name not in present:
                db.run(f"ALTER TABLE served ADD COLUMN {name} {kind}")
