"""Dynamic batcher: one per model version (Triton's dynamic batching semantics).

A request waits at most ``max_queue_delay_us`` after the *oldest* queued request; a batch goes
out at once when the largest preferred size (or the max batch size) is queued. Batches are
formed only when the device has a free slot, so while the device is busy the queue grows into a
larger next batch.
The queue is bounded (full → ``Unavailable`` at once); requests past their deadline are answered
before they reach the device; a cancelled caller's rows are dropped before the batch runs.
An optional ``admit`` hook sees a formed batch's clients before it runs and may refuse some of
them (the rate limit shared by replicas: one Redis round trip per batch, not per request).
Model work runs in the device's thread pool, never on the event loop; a batch whose work is
I/O (a remote upstream's call) is a coroutine on the loop instead, bounded by its own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bastion.gateway.errors import BackendError, BastionError, DeadlineExceeded, Unavailable
from bastion.gateway.monitoring.stats import BatchTimes

Arrays = dict[str, np.ndarray]
RunBatch = Callable[[Sequence[Arrays]], tuple[Arrays, BatchTimes]]
AsyncRunBatch = Callable[[Sequence[Arrays]], Awaitable[tuple[Arrays, BatchTimes]]]
Admit = Callable[[list[str | None]], Awaitable[list[Exception | None]]]
"""A batch's clients -> per request None (admitted) or the error that refuses it."""


class BatchObserver(Protocol):
    def on_batch(self, size: int, requests: int, times: BatchTimes) -> None: ...

    def on_dequeue(self, queue_ns: int) -> None: ...

    def on_expired(self, queue_ns: int) -> None: ...


class Unobserved:
    """A batcher whose batches another observer already counts (a model's second stage)."""

    def on_batch(self, size: int, requests: int, times: BatchTimes) -> None:
        pass

    def on_dequeue(self, queue_ns: int) -> None:
        pass

    def on_expired(self, queue_ns: int) -> None:
        pass


class DeviceSlots:
    """Bounds the batches in flight on one device; one worker thread per slot."""

    def __init__(self, device: str, slots: int) -> None:
        self.device = device
        self.semaphore = asyncio.Semaphore(slots)
        self.executor = ThreadPoolExecutor(
            max_workers=slots, thread_name_prefix=f"bastion-{device}"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class CallSlots:
    """Bounds the batches in flight to a remote upstream; the calls run on the event loop."""

    def __init__(self, slots: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)


@dataclass(slots=True)
class _Item:
    inputs: Arrays
    rows: int
    future: asyncio.Future[Arrays]
    arrival_ns: int
    deadline_ns: int | None
    client: str | None = None
    timing: list[Any] | None = None  # filled for a traced request (``BatchTiming``)


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch | AsyncRunBatch,
        slots: DeviceSlots | CallSlots,
        observer: BatchObserver,
        *,
        max_batch_size: int,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_delay_us: int = 0,
        max_queue_size: int = 1024,
        admit: Admit | None = None,
    ) -> None:
        """``run_batch``: the batch's work; a function run on ``DeviceSlots``' threads, or
        with ``CallSlots`` a coroutine function awaited on the loop."""
        self._run_batch = run_batch
        self._on_loop = isinstance(slots, CallSlots)
        self._admit = admit
        self._slots = slots
        self._observer = observer
        self.max_batch_size = max(1, max_batch_size)
        fits = [s for s in preferred_batch_sizes if s <= self.max_batch_size]
        self._ready_rows = max(fits) if fits else self.max_batch_size
        self._delay_ns = max_queue_delay_us * 1000
        self._max_queue_size = max_queue_size
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(
        self,
        inputs: Arrays,
        rows: int,
        deadline_ns: int | None = None,
        client: str | None = None,
        timing: list[Any] | None = None,
    ) -> Arrays:
        """Queues one validated request (``client``: who sent it, for ``admit``); returns its
        rows of every output. ``timing`` (a traced request's): receives its ``BatchTiming``."""
        if self._closing:
            raise Unavailable("model is unloading")
        if len(self._queue) >= self._max_queue_size:
            raise Unavailable(f"queue is full ({self._max_queue_size} requests); retry later")
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        arrival = time.perf_counter_ns()
        self._queue.append(_Item(inputs, rows, future, arrival, deadline_ns, client, timing))
        self._queued_rows += rows
        self._wake.set()
        return await future

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stops taking requests, answers what was accepted, then stops the loop."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout_s):
                while self._queue or self._inflight:
                    self._wake.set()
                    await asyncio.sleep(0.005)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for item in self._queue:
            _fail(item.future, Unavailable("model unloaded before the request ran"))
        self._queue.clear()

    async def _loop(self) -> None:
        while True:
            await self._wait_for_batch()
            await self._slots.semaphore.acquire()
            items = self._take()
            if not items:
                self._slots.semaphore.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(items))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _wait_for_batch(self) -> None:
        """Returns when a batch should go: enough rows, or the oldest request's delay is spent."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued_rows >= self._ready_rows or self._closing:
                return
            remaining = self._queue[0].arrival_ns + self._delay_ns - time.perf_counter_ns()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining / 1e9):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        """Pops up to max_batch_size rows, answering expired and dropping cancelled requests."""
        items: list[_Item] = []
        rows = 0
        now = time.perf_counter_ns()
        while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if item.future.done():
                continue
            if item.deadline_ns is not None and now > item.deadline_ns:
                self._observer.on_expired(now - item.arrival_ns)
                _fail(item.future, DeadlineExceeded("request timed out in the queue"))
                continue
            self._observer.on_dequeue(now - item.arrival_ns)
            items.append(item)
            rows += item.rows
        return items

    async def _execute(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        if self._admit is not None:
            try:
                verdicts = await self._admit([item.client for item in items])
            except BaseException:
                self._slots.semaphore.release()
                self._wake.set()
                raise
            for item, refusal in zip(items, verdicts, strict=True):
                if refusal is not None:
                    _fail(item.future, refusal)
            items = [item for item, refusal in zip(items, verdicts, strict=True) if refusal is None]
            if not items:
                self._slots.semaphore.release()
                self._wake.set()
                return
        started = time.perf_counter_ns()
        try:
            batch = [item.inputs for item in items]
            if self._on_loop:
                outputs, times = await self._run_batch(batch)  # type: ignore[misc]
            else:
                executor = self._slots.executor  # type: ignore[union-attr]
                outputs, times = await loop.run_in_executor(executor, self._run_batch, batch)
            rows = sum(item.rows for item in items)
            for name, value in outputs.items():
                if value.shape[:1] != (rows,):
                    raise BackendError(
                        f"output {name!r} has {value.shape[:1]} rows, expected {rows}"
                    )
        except asyncio.CancelledError:  # never leave an accepted request unanswered
            for item in items:
                _fail(item.future, Unavailable("the batch was cancelled; retry"))
            raise
        except Exception as exc:
            # a protocol error (an upstream's 400, 503, 504) keeps its status
            error = (
                exc if isinstance(exc, BastionError) else BackendError(f"inference failed: {exc}")
            )
            for item in items:
                _fail(item.future, error)
            return
        finally:
            self._slots.semaphore.release()
            self._wake.set()
        self._observer.on_batch(rows, len(items), times)
        ended = time.perf_counter_ns()
        start = 0
        for item in items:
            if item.timing is not None:
                item.timing.append(BatchTiming(item.arrival_ns, started, ended, rows, times))
            stop = start + item.rows
            if not item.future.done():
                item.future.set_result({name: value[start:stop] for name, value in outputs.items()})
            start = stop


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Where a traced request's time in the batcher went (``time.perf_counter_ns()``): queued
    from ``arrival_ns`` until its batch started at ``started_ns``; the batch, of ``rows`` rows in
    all, ended at ``ended_ns``, its phases in ``times``."""

    arrival_ns: int
    started_ns: int
    ended_ns: int
    rows: int
    times: BatchTimes


def _fail(future: asyncio.Future[Arrays], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
