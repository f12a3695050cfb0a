"""The one bound on requests being served at once, shared by every transport."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bastion.gateway.errors import Unavailable
from bastion.gateway.monitoring.metrics import Metrics


class InFlight:
    """At most ``limit`` requests in flight over HTTP and gRPC together; past it a request is
    refused at once (503 / UNAVAILABLE) rather than queued without bound."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.count = 0
        self._metrics = metrics

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Holds one slot for the ``with`` block. Raises ``Unavailable`` when none is free."""
        if self.count >= self.limit:
            self._metrics.rejected.labels("in_flight").inc()
            raise Unavailable(f"{self.limit} requests in flight; retry later")
        self.count += 1
        self._metrics.in_flight.set(self.count)
        try:
            yield
        finally:
            self.count -= 1
            self._metrics.in_flight.set(self.count)
