"""Review copies of suspicious inputs, written off the response path.

A suspicious image is served; its copy is evidence for whoever investigates a campaign, not a
precondition of the answer. So the response never waits for it: copies go into a bounded
backlog that one writer thread drains in batches (one store transaction per batch). Under
overload a copy is dropped and counted, never the response delayed; withheld inputs do not come
here (the quarantine path writes them before their 403). The backlog is bounded in copies and
in bytes, and review records may fill at most ``share`` of the store's record and byte quotas,
so a flood of suspicious traffic cannot crowd out the records of withheld inputs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Final

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.quarantine.store import REVIEW, NewItem, QuarantineStore, Usage

log = logging.getLogger(__name__)

WRITTEN: Final = "written"
DROPPED_BACKLOG: Final = "dropped_backlog"
DROPPED_SHARE: Final = "dropped_share"
DROPPED_QUOTA: Final = "dropped_quota"
DROPPED_ERROR: Final = "dropped_error"
OUTCOMES: Final = (WRITTEN, DROPPED_BACKLOG, DROPPED_SHARE, DROPPED_QUOTA, DROPPED_ERROR)
_STOP: Final = object()


class ReviewWriter:
    """A bounded backlog of review records and the thread that writes them.

    ``submit`` never blocks: it returns how many items it dropped because the backlog was
    full. ``close`` writes what is queued (up to ``timeout_s``) and stops the thread.
    """

    def __init__(
        self,
        store: QuarantineStore,
        metrics: Metrics,
        backlog: int = 1024,
        batch: int = 64,
        share: float = 0.5,
        on_usage: Callable[[Usage], None] | None = None,
        backlog_bytes: int = 64 << 20,
    ) -> None:
        if backlog < 1 or batch < 1 or backlog_bytes < 1 or not 0.0 < share <= 1.0:
            raise ValueError("need backlog >= 1, batch >= 1, backlog_bytes >= 1, 0 < share <= 1")
        self.store = store
        self.metrics = metrics
        self.batch = batch
        self.share = share
        self._on_usage = on_usage
        self.backlog_bytes = backlog_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=backlog)
        self._thread = threading.Thread(target=self._run, name="bastion-review", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def submit(self, items: list[NewItem]) -> int:
        dropped = 0
        for item in items:
            size = item.input.nbytes
            with self._bytes_lock:
                fits = self._queued_bytes + size <= self.backlog_bytes
                if fits:
                    self._queued_bytes += size
            try:
                if not fits:
                    raise queue.Full
                self._queue.put_nowait(item)
            except queue.Full:
                if fits:
                    with self._bytes_lock:
                        self._queued_bytes -= size
                dropped += 1
                self._count(item, DROPPED_BACKLOG)
        self.metrics.screening_review_backlog.set(self._queue.qsize())
        return dropped

    def close(self, timeout_s: float = 5.0) -> None:
        """Drains the backlog into the store, then stops; safe to call twice."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("review backlog still full at shutdown; %d copies lost", self.backlog)
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items = [first]
            stop = False
            while len(items) < self.batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                items.append(more)
            with self._bytes_lock:
                self._queued_bytes -= sum(item.input.nbytes for item in items)  # type: ignore[attr-defined]
            self._write(items)  # type: ignore[arg-type]
            self.metrics.screening_review_backlog.set(self._queue.qsize())
            if stop:
                return

    def _write(self, items: list[NewItem]) -> None:
        try:
            room = self._room(items)
            kept, over = items[:room], items[room:]
            for item in over:
                self._count(item, DROPPED_SHARE)
            ids = self.store.add_many(kept) if kept else []
            for item, id_ in zip(kept, ids, strict=True):
                self._count(item, WRITTEN if id_ is not None else DROPPED_QUOTA)
            if self._on_usage is not None:
                self._on_usage(self.store.usage())
        except Exception:  # the writer must outlive a bad batch: count it, log it, go on
            log.exception("writing %d review records failed", len(items))
            for item in items:
                self._count(item, DROPPED_ERROR)

    def _room(self, items: list[NewItem]) -> int:
        """How many of ``items`` the review share still allows, in records and in stored bytes
        (the store's own quotas apply as well); one index read per batch."""
        quota = getattr(self.store, "quota", None)
        if quota is None:
            return len(items)
        records, size = self.store.status_usage(REVIEW)
        max_records, max_bytes = self.share * quota.max_records, self.share * quota.max_bytes
        room = 0
        for item in items:
            records, size = records + 1, size + item.input.nbytes
            if records > max_records or size > max_bytes:
                break
            room += 1
        return room

    def _count(self, item: NewItem, outcome: str) -> None:
        self.metrics.screening_reviews.labels(item.model, item.version, outcome).inc()
