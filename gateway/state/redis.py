"""Redis, where replicas keep the hot state they share (rate limits), and whether it answers.

One ``redis.asyncio`` client per gateway (a connection pool), with short socket timeouts: a
Redis that stops answering costs a request ``timeout_s`` at most, then the configured failure
policy decides (``open``: serve without the shared state; ``closed``: refuse with 503, and the
gateway reports itself not ready). ``RedisHealth`` pings every second in the background, so
readiness and the ``bastion_shared_state_up`` gauge follow Redis even when no request is
touching it (a closed gateway sends none).

Needs the ``redis`` extra: ``pip install 'bastion-gateway[redis]'``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from bastion.gateway.monitoring.metrics import Metrics

log = logging.getLogger(__name__)
PING_INTERVAL_S = 1.0
BREAKER = 3  # failures in a row after which callers stop asking until a ping answers


def connect(url: str, timeout_s: float) -> Any:
    """A ``redis.asyncio.Redis`` for ``url`` (``redis://`` or ``rediss://``); it connects
    lazily, on its first command."""
    from redis.asyncio import Redis

    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        max_connections=256,
    )


def connect_sync(url: str, timeout_s: float) -> Any:
    """A thread-safe ``redis.Redis`` for ``url``, for threads (the defence's replication):
    its reads block up to a second, so its socket waits that long more than ``timeout_s``."""
    from redis import Redis

    return Redis.from_url(url, socket_timeout=1.0 + timeout_s, socket_connect_timeout=timeout_s)


class RedisHealth:
    """Whether Redis answers: the last ping's or command's outcome."""

    def __init__(self, redis: Any, metrics: Metrics, on_failure: Literal["open", "closed"]) -> None:
        self.redis, self.metrics, self.on_failure = redis, metrics, on_failure
        self.up = False
        self.failures = 0  # in a row, since the last answer
        metrics.shared_state_up.labels("redis").set_function(lambda: float(self.up))

    def failed(self, op: str) -> None:
        """A command failed: counted, and Redis is down until a ping answers."""
        self.metrics.shared_state_errors.labels("redis", op).inc()
        self.failures += 1
        if self.up:
            log.warning("Redis stopped answering (%s); failure policy %s", op, self.on_failure)
        self.up = False

    def round_trip(self, op: str) -> None:
        """One round trip (a command or a pipeline) on the request path or beside it."""
        self.metrics.shared_state_round_trips.labels("redis", op).inc()

    def serving(self) -> bool:
        """Whether the gateway serves: always with ``open``, only while Redis is up with
        ``closed``."""
        return self.up or self.on_failure == "open"

    async def ping(self) -> bool:
        from redis.exceptions import RedisError

        try:
            await self.redis.ping()
        except (RedisError, OSError):
            self.failed("ping")
            return False
        if not self.up:
            log.info("Redis answers")
        self.up, self.failures = True, 0
        return True

    def reachable(self) -> bool:
        """Worth asking: fewer than ``BREAKER`` failures in a row (one slow answer under load
        is not an outage; three are, until a ping answers)."""
        return self.failures < BREAKER

    async def run(self) -> None:
        """Pings every second until cancelled."""
        while True:
            await self.ping()
            await asyncio.sleep(PING_INTERVAL_S)
