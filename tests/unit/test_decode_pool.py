"""The decode pool: bounded, refuses at once when full, and enforces the decode budget."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from bastion.gateway.decode_pool import DecodePool
from bastion.gateway.errors import PayloadTooLarge, Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.protocol.budget import checkpoint


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a worker blocked


def rejected(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("bastion_http_rejected_total", {"reason": reason})
    return value or 0.0


def test_a_job_runs_on_a_pool_thread_and_returns_its_value(metrics: Metrics) -> None:
    pool = DecodePool(1, 4, 1000, metrics)
    loop_thread = threading.get_ident()
    value, thread = asyncio.run(pool.run(lambda: (42, threading.get_ident())))
    assert value == 42 and thread != loop_thread
    pool.close()


def test_a_full_pool_refuses_at_once_with_503(metrics: Metrics, gate: threading.Event) -> None:
    pool = DecodePool(1, 2, 60_000, metrics)

    async def scenario() -> None:
        held = [asyncio.ensure_future(pool.run(gate.wait)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="already waiting"):
            await pool.run(lambda: None)
        gate.set()
        await asyncio.gather(*held)
        assert await pool.run(lambda: "free again") == "free again"

    asyncio.run(scenario())
    assert rejected(metrics, "decode_queue") == 1
    pool.close()


def test_a_cancelled_caller_keeps_its_slot_until_its_job_finishes(
    metrics: Metrics, gate: threading.Event
) -> None:
    pool = DecodePool(1, 1, 60_000, metrics)
    started = threading.Event()

    def job() -> None:
        started.set()
        gate.wait()

    async def scenario() -> None:
        caller = asyncio.ensure_future(pool.run(job))
        await asyncio.to_thread(started.wait)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert pool.pending == 1  # the thread is still busy with it
        with pytest.raises(Unavailable):
            await pool.run(lambda: None)
        gate.set()
        for _ in range(200):
            if pool.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.pending == 0

    asyncio.run(scenario())
    pool.close()


def test_a_job_past_its_budget_is_refused_with_413(metrics: Metrics) -> None:
    pool = DecodePool(1, 4, 1, metrics)
    release = threading.Event()

    def slow_decoder() -> None:
        release.wait(0.05)  # longer than the 1 ms budget
        checkpoint()

    with pytest.raises(PayloadTooLarge, match="decode budget of 1 ms"):
        asyncio.run(pool.run(slow_decoder))
    assert rejected(metrics, "decode_budget") == 1
    pool.close()


def test_a_job_that_waited_its_whole_budget_in_the_queue_is_refused_with_503(
    metrics: Metrics, gate: threading.Event
) -> None:
    pool = DecodePool(1, 4, 20, metrics, max_wait_ms=20)
    ran, started = threading.Event(), threading.Event()

    def blocker_job() -> None:
        started.set()
        gate.wait(0.1)

    async def scenario() -> None:
        blocker = asyncio.ensure_future(pool.run(blocker_job))
        await asyncio.to_thread(started.wait)
        with pytest.raises(Unavailable, match="waiting too long"):
            await pool.run(ran.set)
        await blocker

    asyncio.run(scenario())
    assert not ran.is_set()
    pool.close()


def test_jobs_queued_together_are_drained_by_one_thread_and_each_gets_its_own_answer(
    metrics: Metrics,
) -> None:
    pool = DecodePool(2, 64, 1000, metrics)

    async def scenario() -> list[tuple[int, int]]:
        return await asyncio.gather(
            *(pool.run(lambda i=i: (i, threading.get_ident())) for i in range(20))
        )

    answers = asyncio.run(scenario())
    assert [value for value, _ in answers] == list(range(20))
    assert len({thread for _, thread in answers}) == 1  # no second thread woken for them
    assert pool.pending == 0
    pool.close()


def test_a_slow_job_does_not_hold_up_the_jobs_queued_behind_it(
    metrics: Metrics, gate: threading.Event
) -> None:
    pool = DecodePool(2, 64, 60_000, metrics)

    async def scenario() -> None:
        slow = asyncio.ensure_future(pool.run(gate.wait))
        behind = [asyncio.ensure_future(pool.run(lambda i=i: i)) for i in range(5)]
        # a second thread takes the queue once the first has been on the slow job for 2 ms
        assert await asyncio.wait_for(asyncio.gather(*behind), 5) == list(range(5))
        assert not slow.done()
        gate.set()
        await slow

    asyncio.run(scenario())
    pool.close()


def test_an_answer_is_not_held_back_by_a_slow_job_after_it(
    metrics: Metrics, gate: threading.Event
) -> None:
    pool = DecodePool(1, 64, 60_000, metrics)

    async def scenario() -> None:
        fast = asyncio.ensure_future(pool.run(lambda: "fast"))
        slow = asyncio.ensure_future(pool.run(gate.wait))
        assert await asyncio.wait_for(fast, 5) == "fast"
        assert not slow.done()
        gate.set()
        await slow

    asyncio.run(scenario())
    pool.close()


def test_a_job_after_close_is_answered_503(metrics: Metrics) -> None:
    pool = DecodePool(1, 4, 1000, metrics)
    pool.close()

    async def scenario() -> None:
        for _ in range(2):  # and again: the pool does not wedge
            with pytest.raises(Unavailable, match="shutting down"):
                await asyncio.wait_for(pool.run(lambda: None), 5)

    asyncio.run(scenario())
    assert pool.pending == 0
