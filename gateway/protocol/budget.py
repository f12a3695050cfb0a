"""The decode-time budget of the request being decoded on this thread.

The decode pool sets a deadline around each job; decoders call ``checkpoint`` between elements so
that a request which is cheap to send but slow to decode is cut off (413) instead of holding a
decode thread. Outside a job there is no deadline and ``checkpoint`` does nothing, so decoders
also work when called directly (tests, offline tools).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from bastion.gateway.errors import PayloadTooLarge, Unavailable

T = TypeVar("T")
_local = threading.local()


class DecodeBudgetExceeded(PayloadTooLarge):
    """A request that costs more than its decode budget (413, like a body over a size limit)."""


def checkpoint() -> None:
    """Raises ``DecodeBudgetExceeded`` when this thread's decode job is past its budget."""
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise DecodeBudgetExceeded(
            f"request took more than its decode budget of {_local.budget_ms} ms to decode"
        )


@contextmanager
def budget(deadline: float, budget_ms: int) -> Iterator[None]:
    """Sets this thread's deadline (``time.monotonic()`` seconds) for the enclosed decode."""
    _local.deadline, _local.budget_ms = deadline, budget_ms
    try:
        yield
    finally:
        _local.deadline = None


def run_within(queued_at: float, max_wait_ms: int, budget_ms: int, fn: Callable[[], T]) -> T:
    """``fn()`` with ``budget_ms`` from the moment it starts. A job that already waited more
    than ``max_wait_ms`` for a thread (since ``queued_at``, ``time.monotonic()``) is refused
    with 503 instead: the server is overloaded, the request is not at fault, it may retry."""
    started = time.monotonic()
    if started - queued_at > max_wait_ms / 1000:
        raise Unavailable("requests are waiting too long to be decoded; retry later")
    with budget(started + budget_ms / 1000, budget_ms):
        return fn()
