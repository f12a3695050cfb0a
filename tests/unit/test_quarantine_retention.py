"""The retention sweep (age-based deletion off the event loop) and the quarantine usage metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.quarantine import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    RECORDS_QUOTA,
    NewItem,
    SQLiteQuarantineStore,
    Usage,
)
from bastion.gateway.quarantine.retention import RetentionSweep, UsageMetrics

DAY = 86400.0


class Clock:
    """A settable clock: the test moves time, nothing waits for it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """A fake ``asyncio.sleep``: records each wait and stops the loop after ``passes`` passes."""

    def __init__(self, passes: int) -> None:
        self.waits: list[float] = []
        self.passes = passes

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) >= self.passes:
            raise asyncio.CancelledError


def item(index: int = 0) -> NewItem:
    return NewItem("m", "1", "c", "r", index, np.zeros(8, np.uint8), {}, {}, "adversarial")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Iterator[SQLiteQuarantineStore]:
    with SQLiteQuarantineStore(":memory:", clock=clock) as s:
        yield s


def test_sweep_deletes_only_records_older_than_the_retention(
    store: SQLiteQuarantineStore, clock: Clock
) -> None:
    old = store.add_many([item(0), item(1)])
    clock.now += 2 * DAY
    new = store.add_many([item(2)])
    clock.now += 29 * DAY  # the old ones are 31 days old, the new one 29
    deleted, usage = RetentionSweep(store, 30 * DAY, 600, clock=clock).sweep()
    assert deleted == 2 and usage.records == 1
    assert [r.id for r in store.list()] == new
    assert all(store.get(i) is None for i in old if i is not None)


def test_sweep_deletes_in_chunks_until_nothing_is_left(
    store: SQLiteQuarantineStore, clock: Clock
) -> None:
    store.add_many([item(i) for i in range(7)])
    clock.now += 2 * DAY
    sweep = RetentionSweep(store, DAY, 600, batch_rows=2, clock=clock)
    assert sweep.sweep()[0] == 7
    assert store.count() == 0


def test_run_sweeps_at_start_then_every_interval_and_publishes_usage(
    store: SQLiteQuarantineStore, clock: Clock
) -> None:
    store.add_many([item(0)])
    clock.now += 2 * DAY
    published: list[Usage] = []
    sleeps = Sleeps(passes=3)
    sweep = RetentionSweep(store, DAY, 600, published.append, clock=clock, sleep=sleeps)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sweep.run())
    assert sleeps.waits == [600, 600, 600]
    assert [u.records for u in published] == [0, 0, 0]


class FlakyStore:
    """Fails the first ``expire`` (a locked database, say), then behaves."""

    def __init__(self, store: SQLiteQuarantineStore) -> None:
        self.store = store
        self.calls = 0

    def expire(self, older_than: float, max_rows: int = 1000) -> int:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database is locked")
        return self.store.expire(older_than, max_rows)

    def usage(self) -> Usage:
        return self.store.usage()


def test_a_failing_sweep_is_logged_and_the_next_one_runs(
    store: SQLiteQuarantineStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store.add_many([item(0)])
    clock.now += 2 * DAY
    flaky = FlakyStore(store)
    published: list[Usage] = []
    sweep = RetentionSweep(
        flaky,  # type: ignore[arg-type]
        DAY,
        600,
        published.append,
        clock=clock,
        sleep=Sleeps(passes=2),
    )
    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        asyncio.run(sweep.run())
    assert "retention sweep failed" in caplog.text and "database is locked" in caplog.text
    assert flaky.calls == 2 and store.count() == 0
    assert [u.records for u in published] == [0]


class GatedStore:
    """``expire`` blocks until the test opens the gate; always reports a full chunk."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0
        self.events: list[str] = []

    def expire(self, older_than: float, max_rows: int = 1000) -> int:
        self.calls += 1
        self.entered.set()
        self.gate.wait(timeout=30)
        self.events.append("chunk done")
        return max_rows

    def usage(self) -> Usage:
        return Usage(0, 0, False, {})


def test_cancelling_waits_for_the_chunk_in_progress_and_starts_no_other() -> None:
    gated = GatedStore()

    async def scenario() -> None:
        sweep = RetentionSweep(gated, DAY, 600)  # type: ignore[arg-type]
        task = asyncio.create_task(sweep.run())
        task.add_done_callback(lambda _: gated.events.append("task done"))
        await asyncio.to_thread(gated.entered.wait, 30)
        task.cancel()
        try:
            for _ in range(20):
                await asyncio.sleep(0)  # let the cancellation run as far as it can
            assert not task.done()  # it waits for the chunk, so the store can be closed after
        finally:
            gated.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert gated.events == ["chunk done", "task done"]
    assert gated.calls == 1  # a full chunk, yet no second one after the cancel


def test_usage_metrics_mirror_gauges_and_count_each_drop_once() -> None:
    metrics = Metrics()
    publish = UsageMetrics(metrics)
    sample = metrics.private_registry.get_sample_value  # behind the metrics token
    publish(Usage(5, 640, False, {RECORDS_QUOTA: 0, BYTES_QUOTA: 0, CLIENT_QUOTA: 2}))
    publish(Usage(7, 900, True, {RECORDS_QUOTA: 3, BYTES_QUOTA: 0, CLIENT_QUOTA: 2}))
    publish(Usage(7, 900, True, {RECORDS_QUOTA: 3, BYTES_QUOTA: 0, CLIENT_QUOTA: 2}))
    assert sample("bastion_quarantine_records") == 7
    assert sample("bastion_quarantine_bytes") == 900
    assert sample("bastion_quarantine_over_quota") == 1
    assert sample("bastion_quarantine_dropped_total", {"reason": CLIENT_QUOTA}) == 2
    assert sample("bastion_quarantine_dropped_total", {"reason": RECORDS_QUOTA}) == 3
    publish(Usage(0, 0, False, {RECORDS_QUOTA: 3, BYTES_QUOTA: 0, CLIENT_QUOTA: 2}))
    assert sample("bastion_quarantine_over_quota") == 0


def test_retention_refuses_a_non_positive_period(store: SQLiteQuarantineStore) -> None:
    with pytest.raises(ValueError, match="positive"):
        RetentionSweep(store, 0, 600)
