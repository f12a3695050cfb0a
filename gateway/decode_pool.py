"""A bounded pool of threads for everything that turns untrusted bytes into tensors.

Decompression, JSON parsing, BYTES splitting and image decoding run here, never on the event
loop, so one expensive request cannot delay health checks or other clients' responses. The pool
is bounded: a request that finds ``max_pending`` jobs ahead of it is refused with 503 at once
rather than queued without limit. Each job has a time budget from the moment a thread takes it
(``gateway.protocol.budget``) that the decoders check between elements: a request past it is
refused with 413; one that waited too long for a thread, with 503 (overload, retryable).

Jobs wait in one queue that the threads drain: a thread that finds work takes job after job
until the queue is empty, and the answers go back to the event loop in one wake-up for as many
as have finished by then. Under load this saves a thread wake-up, an executor hand-off and a
chain of futures per request, which is most of what a small request's hop to a thread costs.
A second thread starts only when the first has been on one job for over 2 ms, so one slow
request does not hold up the queue behind it, and small ones do not wake two threads that
contend for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bastion.gateway.errors import Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.protocol.budget import DecodeBudgetExceeded, run_within

T = TypeVar("T")
Job = tuple[float, Callable[[], Any], "asyncio.Future[Any]"]
"""A job as queued: when (``time.monotonic()``), the function and its caller's future."""
Outcome = tuple["asyncio.Future[Any]", bool, Any]
"""A job's end: its caller's future, whether it returned, and its value or exception."""
_STUCK_S = 0.002  # a thread on one job this long gets another beside it for the queue


class DecodePool:
    """Runs decode jobs on ``workers`` threads with at most ``max_pending`` jobs at a time."""

    def __init__(
        self,
        workers: int,
        max_pending: int,
        budget_ms: int,
        metrics: Metrics,
        max_wait_ms: int | None = None,
    ) -> None:
        """``max_wait_ms``: the longest wait for a thread (default: the budget, at least 1 s)."""
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="bastion-decode")
        self._max_pending = max_pending
        self._budget_ms = budget_ms
        self._max_wait_ms = max_wait_ms if max_wait_ms is not None else max(budget_ms, 1000)
        self._metrics = metrics
        self._workers = workers
        self._pending = 0
        self._lock = threading.Lock()  # guards everything below, shared with the threads
        self._jobs: deque[Job] = deque()
        self._started: dict[int, float] = {}  # draining thread -> when its job began (0: none)
        self._done: list[Outcome] = []
        self._collecting = False  # a hand-back of ``_done`` to the loop is scheduled
        self._checking = False  # a ``_dispatch`` is scheduled on the loop

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a pool thread; ``Unavailable`` (503) at once when the pool is full."""
        with self._lock:
            if self._pending >= self._max_pending:
                self._metrics.rejected.labels("decode_queue").inc()
                raise Unavailable(
                    f"{self._max_pending} requests are already waiting to be decoded; retry later"
                )
            self._pending += 1
        self._metrics.decode_pending.set(self._pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._jobs.append((time.monotonic(), fn, future))
            check, self._checking = not self._checking, True
        if check:
            loop.call_soon(self._dispatch, loop)
        # the slot is released when the thread is done with the job (or it is dropped
        # unstarted), not when the caller stops waiting: a cancelled caller must not free a
        # slot its job still holds
        try:
            return await future
        except DecodeBudgetExceeded:
            self._metrics.rejected.labels("decode_budget").inc()
            raise

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: starts a draining thread when none is, or when every one has been on
        its job for over ``_STUCK_S``; while jobs wait behind busy threads, looks again then."""
        with self._lock:
            self._checking = False
            if not self._jobs:
                return
            now = time.monotonic()
            stuck = all(0 < began < now - _STUCK_S for began in self._started.values())
            start = len(self._started) < self._workers and stuck
            if start:
                ident = max(self._started, default=0) + 1
                self._started[ident] = 0.0
            # the thread may stick on its job with more behind it: look again in a moment
            self._checking = len(self._started) < self._workers
            check = self._checking
        if start:
            try:
                self._executor.submit(self._drain, loop, ident)
            except RuntimeError:  # shut down: nothing will take the queue
                self._close_queue(ident)
                return
        if check:
            loop.call_later(_STUCK_S, self._dispatch, loop)

    def _close_queue(self, ident: int) -> None:
        closed = Unavailable("the server is shutting down")
        with self._lock:
            del self._started[ident]
            jobs, self._jobs = list(self._jobs), deque()
            self._checking = False
        self._deliver([(future, False, closed) for _, _, future in jobs])
        self._release(len(jobs))

    def _drain(self, loop: asyncio.AbstractEventLoop, ident: int) -> None:
        """On a pool thread: runs queued jobs until none is left."""
        while True:
            with self._lock:
                if not self._jobs:
                    del self._started[ident]
                    return
                queued_at, fn, future = self._jobs.popleft()
                self._started[ident] = time.monotonic()
            try:
                value = run_within(queued_at, self._max_wait_ms, self._budget_ms, fn)
                outcome: Outcome = (future, True, value)
            except Exception as exc:  # the caller's to handle, as if it had run the job
                outcome = (future, False, exc)
            self._release(1)
            with self._lock:
                self._started[ident] = 0.0
                self._done.append(outcome)
                collect, self._collecting = not self._collecting, True
            if collect:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        """On the loop: answers every caller whose job has finished."""
        with self._lock:
            done, self._done = self._done, []
            self._collecting = False
        self._deliver(done)

    @staticmethod
    def _deliver(done: list[Outcome]) -> None:
        for future, returned, value in done:
            if future.done():  # its caller was cancelled
                continue
            if returned:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _release(self, count: int) -> None:
        with self._lock:
            self._pending -= count
        self._metrics.decode_pending.set(self._pending)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
