"""The dynamic batcher driven with events, not sleeps: batching, bounds, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from bastion.gateway.batcher import Arrays, CallSlots, DeviceSlots, DynamicBatcher
from bastion.gateway.errors import BackendError, DeadlineExceeded, Unavailable
from bastion.gateway.monitoring.stats import BatchTimes


class Device:
    """A fake device: records each batch; the first ``hold`` batches block until released."""

    def __init__(self, hold: int = 0, fail_on: float | None = None, bad_rows: bool = False):
        self.batches: list[list[float]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.fail_on = fail_on
        self.bad_rows = bad_rows

    def __call__(self, requests: Sequence[Arrays]) -> tuple[Arrays, BatchTimes]:
        x = np.concatenate([r["x"] for r in requests])
        self.batches.append(x.tolist())
        if len(self.batches) <= self.hold:
            self.started.set()
            assert self.release.wait(10)
        if self.fail_on is not None and self.fail_on in x:
            raise RuntimeError("device fault")
        y = x * 2 if not self.bad_rows else x[:-1] * 2
        return {"y": y}, BatchTimes(1, 2, 3)


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.queued = 0
        self.expired = 0

    def on_batch(self, size: int, requests: int, times: BatchTimes) -> None:
        self.batches.append((size, requests))

    def on_dequeue(self, queue_ns: int) -> None:
        self.queued += 1

    def on_expired(self, queue_ns: int) -> None:
        self.expired += 1


def make(device: Device, **kwargs: object) -> tuple[DynamicBatcher, Observer]:
    observer = Observer()
    options = {"max_batch_size": 8, "max_queue_delay_us": 0, "max_queue_size": 16, **kwargs}
    batcher = DynamicBatcher(device, DeviceSlots("cpu", 1), observer, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher, observer


def row(value: float, rows: int = 1) -> Arrays:
    return {"x": np.full(rows, value, dtype=np.float32)}


async def until(predicate: object) -> None:
    """Yields to the loop until ``predicate()`` holds (bounded)."""
    async with asyncio.timeout(5):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0)


async def device_started(device: Device) -> None:
    assert await asyncio.to_thread(device.started.wait, 5)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_requests_arriving_while_device_is_busy_share_the_next_batch() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, observer = make(device)
        first = asyncio.create_task(batcher.submit(row(1), 1))
        await device_started(device)
        rest = [asyncio.create_task(batcher.submit(row(v), 1)) for v in (2, 3, 4)]
        await until(lambda: batcher.pending == 3)
        device.release.set()
        results = await asyncio.gather(first, *rest)
        assert [r["y"].tolist() for r in results] == [[2], [4], [6], [8]]
        assert device.batches == [[1], [2, 3, 4]]
        assert observer.batches == [(1, 1), (3, 3)]
        await batcher.close()

    run(scenario())


def test_batch_goes_at_once_when_the_largest_preferred_size_is_queued() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, _ = make(device, preferred_batch_sizes=(4,), max_queue_delay_us=60_000_000)
        blocker = asyncio.create_task(batcher.submit(row(0, 4), 4))
        await device_started(device)
        tasks = [asyncio.create_task(batcher.submit(row(v), 1)) for v in (1, 2, 3, 4)]
        await until(lambda: batcher.pending == 4)
        device.release.set()
        async with asyncio.timeout(5):  # far below the 60 s queue delay
            await asyncio.gather(blocker, *tasks)
        assert device.batches == [[0, 0, 0, 0], [1, 2, 3, 4]]
        await batcher.close()

    run(scenario())


def test_lone_request_is_sent_once_the_oldest_request_delay_is_spent() -> None:
    async def scenario() -> None:
        device = Device()
        batcher, _ = make(device, preferred_batch_sizes=(8,), max_queue_delay_us=20_000)
        start = time.perf_counter()
        async with asyncio.timeout(5):
            result = await batcher.submit(row(5), 1)
        assert result["y"].tolist() == [10]
        assert time.perf_counter() - start >= 0.02
        await batcher.close()

    run(scenario())


def test_full_queue_rejects_at_once() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, _ = make(device, max_queue_size=2)
        first = asyncio.create_task(batcher.submit(row(1), 1))
        await device_started(device)
        queued = [asyncio.create_task(batcher.submit(row(v), 1)) for v in (2, 3)]
        await until(lambda: batcher.pending == 2)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit(row(4), 1)
        device.release.set()
        await asyncio.gather(first, *queued)
        await batcher.close()

    run(scenario())


def test_expired_request_is_answered_before_it_reaches_the_device() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, observer = make(device)
        first = asyncio.create_task(batcher.submit(row(1), 1))
        await device_started(device)
        late = asyncio.create_task(batcher.submit(row(7), 1, deadline_ns=time.perf_counter_ns()))
        fresh = asyncio.create_task(batcher.submit(row(2), 1))
        await until(lambda: batcher.pending == 2)
        device.release.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await fresh)["y"].tolist() == [4]
        await first
        assert [7.0] not in device.batches and all(7.0 not in b for b in device.batches)
        assert observer.expired == 1
        await batcher.close()

    run(scenario())


def test_cancelled_caller_is_dropped_and_the_rest_of_its_batch_answered() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, _ = make(device)
        first = asyncio.create_task(batcher.submit(row(1), 1))
        await device_started(device)
        gone = asyncio.create_task(batcher.submit(row(9), 1))
        kept = asyncio.create_task(batcher.submit(row(3), 1))
        await until(lambda: batcher.pending == 2)
        gone.cancel()
        device.release.set()
        assert (await kept)["y"].tolist() == [6]
        await first
        assert gone.cancelled()
        assert device.batches == [[1], [3]]
        await batcher.close()

    run(scenario())


def test_backend_error_fails_only_its_own_batch() -> None:
    async def scenario() -> None:
        device = Device(fail_on=13)
        batcher, _ = make(device)
        with pytest.raises(BackendError, match="device fault"):
            await batcher.submit(row(13), 1)
        assert (await batcher.submit(row(1), 1))["y"].tolist() == [2]
        await batcher.close()

    run(scenario())


def test_output_with_wrong_row_count_is_a_backend_error() -> None:
    async def scenario() -> None:
        batcher, _ = make(Device(bad_rows=True))
        with pytest.raises(BackendError, match="rows"):
            await batcher.submit(row(1, 3), 3)
        await batcher.close()

    run(scenario())


def test_multi_row_requests_get_back_their_own_rows_and_batches_respect_the_max() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, _ = make(device, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(row(0), 1))
        await device_started(device)
        tasks = [asyncio.create_task(batcher.submit(row(v, 3), 3)) for v in range(1, 7)]
        await until(lambda: batcher.pending == 6)
        device.release.set()
        results = await asyncio.gather(*tasks)
        await first
        for value, result in zip(range(1, 7), results, strict=True):
            assert result["y"].tolist() == [value * 2] * 3
        assert all(len(b) <= 8 for b in device.batches)
        assert sorted(v for b in device.batches[1:] for v in b) == sorted(
            float(v) for v in range(1, 7) for _ in range(3)
        )
        await batcher.close()

    run(scenario())


def test_close_answers_every_accepted_request_then_refuses_new_ones() -> None:
    async def scenario() -> None:
        device = Device(hold=1)
        batcher, _ = make(device)
        first = asyncio.create_task(batcher.submit(row(1), 1))
        await device_started(device)
        queued = asyncio.create_task(batcher.submit(row(2), 1))
        await until(lambda: batcher.pending == 1)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.submit(row(3), 1)
        device.release.set()
        await closing
        assert (await first)["y"].tolist() == [2]
        assert (await queued)["y"].tolist() == [4]

    run(scenario())


def test_the_admit_hook_sees_each_batch_once_and_its_refusals_never_run() -> None:
    """The shared rate limit's hook: one call per batch with its clients; a refused request is
    answered with the hook's error and its rows never reach the device."""

    async def scenario() -> None:
        device = Device(hold=1)
        calls: list[list[str | None]] = []

        async def admit(clients: list[str | None]) -> list[Exception | None]:
            calls.append(clients)
            return [Unavailable("over the limit") if c == "greedy" else None for c in clients]

        batcher, _ = make(device, admit=admit)
        first = asyncio.create_task(batcher.submit(row(1), 1, client="alice"))
        await device_started(device)
        rest = [
            asyncio.create_task(batcher.submit(row(v), 1, client=who))
            for v, who in ((2, "greedy"), (3, None), (4, "bob"))
        ]
        await until(lambda: batcher.pending == 3)
        device.release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        assert isinstance(results[1], Unavailable)
        assert [r["y"].tolist() for r in (results[0], results[2], results[3])] == [[2], [6], [8]]
        assert calls == [["alice"], ["greedy", None, "bob"]]
        assert device.batches == [[1], [3, 4]]
        refused = asyncio.create_task(batcher.submit(row(5), 1, client="greedy"))
        with pytest.raises(Unavailable):
            await refused  # a batch of refusals only: nothing runs, the slot is free again
        assert (await batcher.submit(row(6), 1, client="carol"))["y"].tolist() == [12]
        assert device.batches == [[1], [3, 4], [6]]
        await batcher.close()

    run(scenario())


class Upstream:
    """A fake remote upstream: a coroutine on the loop, its calls in flight counted."""

    def __init__(self, error: Exception | None = None) -> None:
        self.batches: list[list[float]] = []
        self.inflight = self.most = 0
        self.release = asyncio.Event()
        self.error = error

    async def __call__(self, requests: Sequence[Arrays]) -> tuple[Arrays, BatchTimes]:
        x = np.concatenate([r["x"] for r in requests])
        self.batches.append(x.tolist())
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            await self.release.wait()
        finally:
            self.inflight -= 1
        if self.error is not None:
            raise self.error
        return {"y": x * 2}, BatchTimes(0, 1, 0)


def test_a_coroutine_batch_runs_on_the_loop_within_its_call_slots() -> None:
    async def scenario() -> None:
        upstream = Upstream()
        batcher = DynamicBatcher(upstream, CallSlots(2), Observer(), max_batch_size=1)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(row(v), 1)) for v in (1, 2, 3, 4)]
        await until(lambda: upstream.inflight == 2)
        await asyncio.sleep(0.01)
        assert upstream.most == 2 and len(upstream.batches) == 2  # the slots hold the rest
        upstream.release.set()
        results = await asyncio.gather(*tasks)
        assert [r["y"].tolist() for r in results] == [[2], [4], [6], [8]]
        assert threading.active_count() == threads_before
        await batcher.close()

    threads_before = threading.active_count()
    run(scenario())


def test_a_protocol_error_from_the_batch_keeps_its_status() -> None:
    async def scenario() -> None:
        upstream = Upstream(error=DeadlineExceeded("the upstream did not answer in time"))
        upstream.release.set()
        batcher = DynamicBatcher(upstream, CallSlots(1), Observer(), max_batch_size=4)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(row(1), 1)
        await batcher.close()

    run(scenario())
