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
replicas' clocks do not matter; a batch's requests are checked together, one script call (one
round trip) per batch, before the model runs (a replica's own GCRA at the same rate refuses a
flood at admission, before any work).
When Redis does not answer, the ``on_failure`` policy decides: ``open`` admits (and counts
the failure), ``closed`` refuses with 503.
"""

from __future__ import annotations

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
# GCRA for each key in turn (a key may repeat: one request each), at Redis's own clock: the
# waits in microseconds, 0 for each request admitted. One script for a whole batch: one command
# to pack and parse, not one per request (all keys on one Redis; a Redis Cluster would need
# them in one hash slot).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local waits = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait > 0 then
    waits[i] = wait
  else
    local next_tat = tat + interval
    redis.call('SET', key, next_tat, 'PX', math.ceil((next_tat - now) / 1000) + 1)
    waits[i] = 0
  end
end
return waits
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

    Two checks. At admission (``check``), before any work, a GCRA of this replica's own at the
    full rate: a client over its limit on one replica alone is over it everywhere, so a flood is
    refused without a round trip. Then, when its batch is formed (``admit_batch``, the batcher's
    admission hook), the shared GCRA in Redis for every request of the batch in one ``EVALSHA``
    of all their keys: one round trip and one command per batch, before the model runs."""

    def __init__(
        self,
        redis: Any,
        spec: RateSpec,
        on_failure: Literal["open", "closed"] = "open",
        failed: Callable[[str], None] = lambda op: None,
        round_trip: Callable[[str], None] = lambda op: None,
        available: Callable[[], bool] = lambda: True,
    ) -> None:
        """``available``: whether Redis answered its last ping or command; while it did not,
        no batch waits for a timeout (the failure policy decides at once) until a ping
        answers again."""
        self.redis, self.spec, self.on_failure = redis, spec, on_failure
        self.failed, self.round_trip, self.available = failed, round_trip, available
        self.local = LocalRateLimiter(spec)
        self._sha: str | None = None

    async def check(self, client: str) -> None:
        await self.local.check(client)

    async def admit_batch(self, clients: list[str | None]) -> list[Exception | None]:
        """One verdict per request of a batch (None: admitted; else the error to answer it
        with), from one round trip. Requests without a client are admitted."""
        from redis.exceptions import NoScriptError, RedisError

        named = [i for i, client in enumerate(clients) if client is not None]
        verdicts: list[Exception | None] = [None] * len(clients)
        if not named:
            return verdicts
        try:
            if not self.available():  # down: no batch waits out a timeout for it
                raise ConnectionError("Redis did not answer its last ping")
            try:
                waits = await self._gcra([clients[i] for i in named])  # type: ignore[misc]
            except NoScriptError:  # Redis restarted and forgot the script: load it again
                self._sha = None
                waits = await self._gcra([clients[i] for i in named])  # type: ignore[misc]
        except (RedisError, OSError):
            self.failed("rate_limit")
            if self.on_failure == "closed":
                refusal = Unavailable(
                    "the shared rate-limit state (Redis) is unreachable; retry later"
                )
                return [refusal if c is not None else None for c in clients]
            return verdicts
        for i, wait in zip(named, waits, strict=True):
            if int(wait) > 0:
                verdicts[i] = too_many(int(wait), self.spec)
        return verdicts

    async def _gcra(self, clients: list[str]) -> list[Any]:
        if self._sha is None:
            self._sha = await self.redis.script_load(GCRA_SCRIPT)
        keys = [KEY_PREFIX + client for client in clients]
        self.round_trip("rate_limit")
        return await self.redis.evalsha(
            self._sha, len(keys), *keys, self.spec.interval_us, self.spec.tolerance_us
        )
