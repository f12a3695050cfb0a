"""Per-client rate limits: the Generic Cell Rate Algorithm, in this process or shared in Redis.

GCRA (ITU-T I.371, the "virtual scheduling" form of a leaky bucket) keeps one number per
client: the theoretical arrival time ``tat`` of its next request. With emission interval
``T = 60 / per_minute`` seconds and burst ``b``, a request at time ``now`` is admitted when
``now >= tat - (b - 1) T``, and then ``tat = max(tat, now) + T``; otherwise it waits
``tat - (b - 1) T - now`` seconds (the 429's ``Retry-After``). Over any long window a client
gets ``per_minute`` requests a minute plus at most ``b`` at once, never more.

With several replicas the limit must hold for the client, not per replica (three replicas
with a local limit let three times the traffic through). ``RedisRateLimiter`` keeps ``tat`` in
Redis and updates it in one Lua script, atomically and on Redis's own clock (``TIME``), so the
replicas' clocks do not matter; the checks that arrive together share one pipelined round trip,
at admission, before any work.
When Redis does not answer, the ``on_failure`` policy decides: ``open`` admits (and counts
the failure), ``closed`` refuses with 503.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bastion.gateway.errors import TooManyRequests, Unavailable

KEY_PREFIX = "bastion:rate:"
MAX_LOCAL_CLIENTS = 100_000

# KEYS[1]: the client's tat (microseconds on Redis's clock); ARGV: T and (b - 1) T in
# microseconds. Returns 0 when admitted, else the microseconds to wait.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
"""


@dataclass(frozen=True)
class RateSpec:
    """``per_minute`` requests a minute per client, up to ``burst`` at once."""

    per_minute: float
    burst: int = 1

    def __post_init__(self) -> None:
        if not (self.per_minute > 0 and self.burst >= 1):
            raise ValueError(f"need per_minute > 0 and burst >= 1, got {self}")

    @property
    def interval_us(self) -> int:
        return max(1, round(60e6 / self.per_minute))

    @property
    def tolerance_us(self) -> int:
        return (self.burst - 1) * self.interval_us


def gcra(tat_us: int | None, now_us: int, spec: RateSpec) -> tuple[int, int | None]:
    """One GCRA decision: (microseconds to wait, 0 when admitted; the new ``tat``, None when
    refused). Pure: the same rule the Redis script runs."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    wait = tat - spec.tolerance_us - now_us
    if wait > 0:
        return wait, None
    return 0, tat + spec.interval_us


class RateLimiter(Protocol):
    async def check(self, client: str) -> None:
        """Returns when ``client`` may send this request; raises ``TooManyRequests`` (429
        with ``Retry-After``) when it is over its limit, ``Unavailable`` (503) when the shared
        state is down and the policy is ``closed``."""
        ...


def too_many(wait_us: int, spec: RateSpec) -> TooManyRequests:
    retry = max(1, math.ceil(wait_us / 1e6))
    return TooManyRequests(
        f"rate limit of {spec.per_minute:g} requests a minute exceeded; retry in {retry} s",
        retry,
        {"reason": "rate_limited", "retry_after_s": retry},
    )


class LocalRateLimiter:
    """GCRA in this process (one gateway): a bounded LRU of clients' ``tat``."""

    def __init__(
        self,
        spec: RateSpec,
        max_clients: int = MAX_LOCAL_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec, self.max_clients, self.clock = spec, max_clients, clock
        self._tat: OrderedDict[str, int] = OrderedDict()

    async def check(self, client: str) -> None:
        now = int(self.clock() * 1e6)
        wait, tat = gcra(self._tat.get(client), now, self.spec)
        if tat is None:
            raise too_many(wait, self.spec)
        self._tat[client] = tat
        self._tat.move_to_end(client)
        while len(self._tat) > self.max_clients:  # the least recently admitted go
            self._tat.popitem(last=False)


class RedisRateLimiter:
    """GCRA in Redis, shared by every replica (``redis.asyncio`` client ``redis``).

    The checks of one event-loop turn go to Redis together, one pipeline of ``EVALSHA``: under
    load one round trip serves as many requests as arrived meanwhile (as a batch does)."""

    def __init__(
        self,
        redis: Any,
        spec: RateSpec,
        on_failure: Literal["open", "closed"] = "open",
        failed: Callable[[str], None] = lambda op: None,
        round_trip: Callable[[str], None] = lambda op: None,
    ) -> None:
        self.redis, self.spec, self.on_failure = redis, spec, on_failure
        self.failed, self.round_trip = failed, round_trip
        self._sha: str | None = None
        self._pending: list[tuple[str, asyncio.Future[int]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def check(self, client: str) -> None:
        from redis.exceptions import RedisError

        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((client, future))
        if len(self._pending) == 1:  # the first of this turn: send them all at its end
            loop.call_soon(self._flush)
        try:
            wait = await future
        except (RedisError, OSError) as exc:
            self.failed("rate_limit")
            if self.on_failure == "closed":
                raise Unavailable(
                    "the shared rate-limit state (Redis) is unreachable; retry later"
                ) from exc
            return
        if wait > 0:
            raise too_many(wait, self.spec)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(pending))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, pending: list[tuple[str, asyncio.Future[int]]]) -> None:
        from redis.exceptions import NoScriptError

        try:
            try:
                results = await self._pipeline(pending)
            except NoScriptError:  # Redis restarted and forgot the script: load it again
                self._sha = None
                results = await self._pipeline(pending)
        except Exception as exc:
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(pending, results, strict=True):
            if not future.done():
                future.set_result(int(result))

    async def _pipeline(self, pending: list[tuple[str, asyncio.Future[int]]]) -> list[Any]:
        if self._sha is None:
            self._sha = await self.redis.script_load(GCRA_SCRIPT)
        pipe = self.redis.pipeline(transaction=False)
        args = (self.spec.interval_us, self.spec.tolerance_us)
        for client, _ in pending:
            pipe.evalsha(self._sha, 1, KEY_PREFIX + client, *args)
        self.round_trip("rate_limit")
        return await pipe.execute(raise_on_error=True)
