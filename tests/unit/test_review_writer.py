"""Review copies of suspicious inputs: written off the caller's thread, bounded, drops counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from prometheus_client import CollectorRegistry

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.quarantine import REVIEW, NewItem, Quota, SQLiteQuarantineStore
from bastion.gateway.screening.review import ReviewWriter
from tests.unit.quarantine_helpers import Clock


def suspicious(index: int) -> NewItem:
    return NewItem(
        "digits",
        "1",
        "client",
        f"req-{index}",
        0,
        np.full(4, index, np.uint8),
        {"combined": 1.5},
        {"adversarial": 2.3, "suspicious": 1.3},
        "suspicious",
        REVIEW,
    )


def outcomes(metrics: Metrics) -> dict[str, float]:
    found = {}
    for family in metrics.private_registry.collect():
        if family.name == "bastion_screening_reviews":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["outcome"]] = sample.value
    return found


class SlowStore(SQLiteQuarantineStore):
    """A real store whose writes wait for a gate: the writer thread stalls like a slow disk."""

    def __init__(self) -> None:
        super().__init__(":memory:", clock=Clock())
        self.gate = threading.Event()

    def add_many(self, items: Sequence[NewItem]) -> list[str | None]:
        self.gate.wait(10)
        return super().add_many(items)


def test_review_copies_are_written_with_the_review_status() -> None:
    metrics = Metrics(CollectorRegistry())
    with SQLiteQuarantineStore(":memory:", clock=Clock()) as store:
        writer = ReviewWriter(store, metrics)
        assert writer.submit([suspicious(i) for i in range(5)]) == 0
        writer.close()
        records = store.list(status=REVIEW, include_input=True)
    assert len(records) == 5 and {r.verdict for r in records} == {"suspicious"}
    assert sorted(int(r.input[0]) for r in records) == list(range(5))
    assert outcomes(metrics) == {"written": 5.0}


def test_a_full_backlog_drops_copies_without_blocking_the_caller() -> None:
    metrics = Metrics(CollectorRegistry())
    store = SlowStore()
    writer = ReviewWriter(store, metrics, backlog=4, batch=2)
    started = time.perf_counter()
    dropped = writer.submit([suspicious(i) for i in range(20)])
    assert time.perf_counter() - started < 0.5  # the stalled store never held the caller
    assert 14 <= dropped <= 16  # 4 queued, up to 2 already taken by the stalled writer
    store.gate.set()
    writer.close()
    counted = outcomes(metrics)
    assert counted["dropped_backlog"] == dropped
    assert counted["written"] == 20 - dropped == store.count(status=REVIEW)
    store.close()


def test_review_copies_never_take_more_than_their_share_of_the_store() -> None:
    metrics = Metrics(CollectorRegistry())
    quota = Quota(max_records=10, max_records_per_client=10)
    with SQLiteQuarantineStore(":memory:", quota=quota, clock=Clock()) as store:
        writer = ReviewWriter(store, metrics, share=0.5)
        writer.submit([suspicious(i) for i in range(8)])
        writer.close()
        assert store.count(status=REVIEW) == 5
        # the other half stays free for the records of withheld inputs
        quarantined = NewItem("digits", "1", "c", "r", 0, np.zeros(4, np.uint8), {}, {}, "adv")
        assert all(store.add_many([quarantined] * 5))
    assert outcomes(metrics) == {"written": 5.0, "dropped_share": 3.0}


def test_review_copies_never_take_more_than_their_share_of_the_stored_bytes() -> None:
    """Large inputs: the byte quota binds before the record quota does."""
    metrics = Metrics(CollectorRegistry())
    quota = Quota(max_records=1000, max_records_per_client=1000, max_bytes=1 << 20)
    big = [replace(suspicious(i), input=np.zeros(100_000, np.uint8)) for i in range(8)]
    with SQLiteQuarantineStore(":memory:", quota=quota, clock=Clock()) as store:
        writer = ReviewWriter(store, metrics, share=0.5)
        writer.submit(big)
        writer.close()
        records, size = store.status_usage(REVIEW)
    assert records == 5 and size <= 0.5 * (1 << 20)  # 5 x ~100 kB within half of 1 MiB
    assert outcomes(metrics) == {"written": 5.0, "dropped_share": 3.0}


def test_the_backlog_is_bounded_in_bytes_too() -> None:
    metrics = Metrics(CollectorRegistry())
    store = SlowStore()
    writer = ReviewWriter(store, metrics, backlog=1000, batch=1, backlog_bytes=250_000)
    big = [replace(suspicious(i), input=np.zeros(100_000, np.uint8)) for i in range(10)]
    dropped = writer.submit(big)
    assert 7 <= dropped <= 8  # two or three fit, one may already be with the stalled writer
    store.gate.set()
    writer.close()
    assert store.count(status=REVIEW) == 10 - dropped
    store.close()
