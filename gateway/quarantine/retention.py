"""Retention by age: a periodic sweep that deletes old records, and the store's usage metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.quarantine.store import QuarantineStore, Usage

log = logging.getLogger(__name__)


class UsageMetrics:
    """Mirrors a store's ``Usage`` into Prometheus: the records and bytes gauges, the
    over-quota alarm, and the dropped counter (brought up to the store's running totals, so
    callers need not pass deltas). Call it from the event loop only."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._seen: dict[str, int] = {}

    def __call__(self, usage: Usage) -> None:
        m = self._metrics
        m.quarantine_records.set(usage.records)
        m.quarantine_bytes.set(usage.bytes)
        m.quarantine_over_quota.set(1 if usage.over_quota else 0)
        for reason, total in usage.dropped.items():
            new = total - self._seen.get(reason, 0)
            if new > 0:
                m.quarantine_dropped.labels(reason).inc(new)
                self._seen[reason] = total


class RetentionSweep:
    """Deletes records older than ``retention_s``, every ``interval_s``, off the event loop.

    Each pass deletes in chunks of ``batch_rows`` (one transaction each), so request threads
    that quarantine an input wait for one chunk at most, never for the whole sweep. A pass that
    fails is logged and the next one runs on schedule. ``clock`` and ``sleep`` are injected by
    tests, which then need no real time.
    """

    def __init__(
        self,
        store: QuarantineStore,
        retention_s: float,
        interval_s: float,
        publish: Callable[[Usage], None] | None = None,
        *,
        batch_rows: int = 1000,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if retention_s <= 0 or interval_s <= 0 or batch_rows < 1:
            raise ValueError("retention_s, interval_s and batch_rows must be positive")
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self._publish = publish
        self._clock = clock
        self._sleep = sleep
        self._stop = threading.Event()

    def sweep(self) -> tuple[int, Usage]:
        """One pass (blocking): the records deleted, and the usage after them."""
        cutoff = self._clock() - self.retention_s
        deleted = 0
        while not self._stop.is_set():
            chunk = self.store.expire(cutoff, self.batch_rows)
            deleted += chunk
            if chunk < self.batch_rows:
                break
        return deleted, self.store.usage()

    async def run(self) -> None:
        """Sweeps now, then every ``interval_s``, until cancelled. Cancelling waits for the
        chunk in progress, so the store can be closed right after."""
        while True:
            await self._pass()
            await self._sleep(self.interval_s)

    async def _pass(self) -> None:
        work = asyncio.ensure_future(asyncio.to_thread(self.sweep))
        try:
            deleted, usage = await asyncio.shield(work)
        except asyncio.CancelledError:
            self._stop.set()
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # retrieved: a failure while stopping is not worth a warning
            raise
        except Exception:
            log.exception("quarantine retention sweep failed; retrying in %ss", self.interval_s)
            return
        if deleted:
            log.info("quarantine retention deleted %d records", deleted)
        if self._publish is not None:
            self._publish(usage)
