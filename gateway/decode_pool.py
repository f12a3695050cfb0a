"""A bounded pool of threads for everything that turns untrusted bytes into tensors.

Decompression, JSON parsing, BYTES splitting and image decoding run here, never on the event
loop, so one expensive request cannot delay health checks or other clients' responses. The pool
is bounded: a request that finds ``max_pending`` jobs ahead of it is refused with 503 at once
rather than queued without limit. Each job has a time budget from the moment a thread takes it
(``gateway.protocol.budget``) that the decoders check between elements: a request past it is
refused with 413; one that waited too long for a thread, with 503 (overload, retryable).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from bastion.gateway.errors import Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.protocol.budget import DecodeBudgetExceeded, run_within

T = TypeVar("T")


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
        self._pending = 0
        self._lock = threading.Lock()

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
        try:
            job = self._executor.submit(
                run_within, time.monotonic(), self._max_wait_ms, self._budget_ms, fn
            )
        except RuntimeError:  # shut down
            self._release(None)
            raise Unavailable("the server is shutting down") from None
        # released when the thread is done (or the job is dropped unstarted), not when the
        # caller stops waiting: a cancelled caller must not free a slot its job still holds
        job.add_done_callback(self._release)
        try:
            return await asyncio.wrap_future(job)
        except DecodeBudgetExceeded:
            self._metrics.rejected.labels("decode_budget").inc()
            raise

    def _release(self, _: Future[object] | None) -> None:
        with self._lock:
            self._pending -= 1
        self._metrics.decode_pending.set(self._pending)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
