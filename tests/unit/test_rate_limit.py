"""GCRA: a burst, then one request per interval; the wait is what ``Retry-After`` says."""

from __future__ import annotations

import asyncio

import pytest

from bastion.gateway.errors import TooManyRequests
from bastion.gateway.rate_limit import LocalRateLimiter, RateSpec, gcra


def test_gcra_admits_the_burst_at_once_then_one_request_per_interval() -> None:
    spec = RateSpec(per_minute=60, burst=3)  # one a second, three at once
    tat, admitted = None, []
    for now in (0, 0, 0, 0, 999_999, 1_000_000, 1_500_000, 2_000_000):
        wait, new = gcra(tat, now, spec)
        admitted.append(wait == 0)
        tat = new if new is not None else tat
    assert admitted == [True, True, True, False, False, True, False, True]
    assert gcra(tat, 2_000_000, spec)[0] == 1_000_000  # the next slot is a second away


def test_gcra_forgets_an_idle_clients_past_but_never_banks_more_than_the_burst() -> None:
    spec = RateSpec(per_minute=600, burst=2)
    _, tat = gcra(None, 0, spec)
    later = 3_600_000_000  # an hour idle
    results = []
    for _ in range(4):
        wait, new = gcra(tat, later, spec)
        results.append(wait == 0)
        tat = new if new is not None else tat
    assert results == [True, True, False, False]


def test_over_a_long_window_a_client_gets_its_rate_plus_the_burst() -> None:
    now = [0.0]
    limiter = LocalRateLimiter(RateSpec(per_minute=120, burst=5), clock=lambda: now[0])
    admitted = 0
    for step in range(6000):  # 100 requests a second for 60 s
        now[0] = step / 100
        try:
            asyncio.run(limiter.check("greedy"))
            admitted += 1
        except TooManyRequests:
            pass
    assert admitted == 120 + 5 - 1  # 2 a second for 60 s and the burst, less the first slot


def test_a_refusal_is_429_with_retry_after_and_the_clients_are_bounded() -> None:
    now = [100.0]
    limiter = LocalRateLimiter(RateSpec(per_minute=6, burst=1), max_clients=2, clock=lambda: now[0])
    asyncio.run(limiter.check("a"))
    with pytest.raises(TooManyRequests) as refused:
        asyncio.run(limiter.check("a"))
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "10"
    assert refused.value.details == {"reason": "rate_limited", "retry_after_s": 10}
    for client in ("b", "c"):
        asyncio.run(limiter.check(client))
    assert len(limiter._tat) == 2  # "a", the least recently admitted, is forgotten


def test_a_spec_without_a_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        RateSpec(per_minute=0)
    with pytest.raises(ValueError):
        RateSpec(per_minute=10, burst=0)


def test_while_redis_is_down_a_batch_does_not_wait_for_it() -> None:
    """After a failed ping no batch tries Redis (each would hold the model's slot for the
    timeout): open admits at once, closed refuses at once."""
    from bastion.gateway.errors import Unavailable
    from bastion.gateway.rate_limit import RedisRateLimiter

    class Unreachable:
        def pipeline(self, **_: object) -> None:
            raise AssertionError("Redis was asked while it was known to be down")

        async def script_load(self, _: str) -> None:
            raise AssertionError("Redis was asked while it was known to be down")

    failures: list[str] = []
    spec = RateSpec(60, 1)
    open_ = RedisRateLimiter(Unreachable(), spec, "open", failures.append, available=lambda: False)
    assert asyncio.run(open_.admit_batch(["a", None])) == [None, None]
    closed = RedisRateLimiter(
        Unreachable(), spec, "closed", failures.append, available=lambda: False
    )
    verdicts = asyncio.run(closed.admit_batch(["a", None]))
    assert isinstance(verdicts[0], Unavailable) and verdicts[1] is None
    assert failures == ["rate_limit", "rate_limit"]
