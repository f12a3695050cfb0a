"""The rate limit shared in a real Redis: one limit across replicas, and Redis going away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bastion.gateway.app import create_app
from bastion.gateway.errors import TooManyRequests, Unavailable
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.rate_limit import RateSpec, RedisRateLimiter
from bastion.gateway.settings import Settings
from bastion.gateway.state import redis as redis_state
from bastion.models.data import load_split, to_float

INFER = "/v2/models/digits/infer"
Replica = Callable[..., TestClient]


def body() -> dict[str, Any]:
    x = to_float(load_split("test")[0][:1])
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip


@pytest.fixture
def replica(repository: Path, tmp_path: Path) -> Iterator[Replica]:
    """Gateways in this process, each with its own files: replicas that share only Redis."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        n = len(opened)
        overrides.setdefault("defence", False)
        overrides.setdefault("model_repository", repository)
        settings = Settings(
            torch_threads=1,
            quarantine_path=tmp_path / f"quarantine-{n}.db",
            keys_path=tmp_path / f"keys-{n}.db",
            incident_log_path=tmp_path / f"incidents-{n}.db",
            ledger_path=tmp_path / f"ledger-{n}.db",
            incident_checkpoint_path=tmp_path / f"checkpoint-{n}.json",
            incident_key_path=tmp_path / f"incident-{n}.key",
            **overrides,
        )
        client = TestClient(create_app(settings)).__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_two_replicas_share_one_clients_limit(redis_server: Any, replica: Replica) -> None:
    """Three a minute with a burst of three: whichever replica it asks, the client gets three."""
    settings = {"redis_url": redis_server.url, "rate_limit": 3.0, "rate_limit_burst": 3}
    replicas = [replica(**settings), replica(**settings)]
    statuses = [
        replicas[i % 2].post(INFER, json=body(), headers={"X-Client-ID": "app"}) for i in range(8)
    ]
    codes = [r.status_code for r in statuses]
    assert codes.count(200) == 3 and codes.count(429) == 5, codes
    refused = statuses[-1]
    assert int(refused.headers["Retry-After"]) >= 15  # the next slot: 20 s from the first
    assert refused.json()["reason"] == "rate_limited" and "rate limit" in refused.json()["error"]
    other = replicas[1].post(INFER, json=body(), headers={"X-Client-ID": "other-app"})
    assert other.status_code == 200  # a limit is per client


def test_without_redis_the_limit_is_this_gateways_own(replica: Replica) -> None:
    gateway = replica(rate_limit=3.0, rate_limit_burst=2)
    codes = [
        gateway.post(INFER, json=body(), headers={"X-Client-ID": "app"}).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 429, 429]


def test_redis_time_decides_not_the_replicas_clocks(redis_server: Any) -> None:
    """Two limiters (two replicas' worth) against one Redis, hammering for 2 s at 10 a second
    allowed with a burst of 5: together they get 5 + 2 s x 10, within one request."""

    async def hammer() -> int:
        spec = RateSpec(per_minute=600, burst=5)
        clients = [redis_state.connect(redis_server.url, 1.0) for _ in range(2)]
        limiters = [RedisRateLimiter(c, spec) for c in clients]
        admitted, deadline, i = 0, time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:
            (verdict,) = await limiters[i % 2].admit_batch(["hammer"])
            admitted += verdict is None
            assert verdict is None or isinstance(verdict, TooManyRequests)
            i += 1
            await asyncio.sleep(0.002)
        for client in clients:
            await client.aclose()
        return admitted

    admitted = asyncio.run(hammer())
    assert 24 <= admitted <= 26, admitted


def test_when_redis_stops_open_serves_and_closed_refuses(redis_server: Any) -> None:
    async def check(policy: str) -> tuple[bool, float]:
        metrics = Metrics(CollectorRegistry())
        client = redis_state.connect(redis_server.url, 0.2)
        health = redis_state.RedisHealth(client, metrics, policy)  # type: ignore[arg-type]
        limiter = RedisRateLimiter(client, RateSpec(600, 5), policy, health.failed)  # type: ignore[arg-type]
        assert await health.ping() and health.serving()
        assert await limiter.admit_batch(["app"]) == [None]
        redis_server.stop()
        (verdict,) = await limiter.admit_batch(["app"])  # open: admitted; closed: 503
        assert verdict is None or isinstance(verdict, Unavailable)
        admitted = verdict is None
        serving = health.serving()
        failures = metrics.shared_state_errors.labels("redis", "rate_limit")._value.get()
        redis_server.start()
        assert await health.ping() and health.up  # back: a ping says so
        await client.aclose()
        return admitted and serving, failures

    assert asyncio.run(check("open")) == (True, 1.0)
    assert asyncio.run(check("closed")) == (False, 1.0)


def test_closed_gateway_is_not_ready_while_redis_is_down(
    redis_server: Any, replica: Replica
) -> None:
    gateway = replica(redis_url=redis_server.url, shared_state_failure="closed", defence=True)
    assert gateway.get("/v2/health/ready").status_code == 200
    redis_server.stop()
    deadline = time.monotonic() + 5
    while gateway.get("/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.get("/v2/health/ready").status_code == 503
    refused = gateway.post(INFER, json=body(), headers={"X-Client-ID": "app"})
    assert refused.status_code == 503 and "Redis" in refused.json()["error"]
    assert gateway.get("/v2/health/live").status_code == 200  # alive: not to be restarted
    redis_server.start()
    deadline = time.monotonic() + 5
    while gateway.get("/v2/health/ready").status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.get("/v2/health/ready").status_code == 200
    served = gateway.post(INFER, json=body(), headers={"X-Client-ID": "app"})
    assert served.status_code == 200


def walk(n: int) -> list[np.ndarray]:
    """A decision-based attack's walk: tiny sparse steps from a test digit."""
    rng = np.random.default_rng(0)
    probe = to_float(load_split("test")[0][7:8])[0]
    steps = []
    for _ in range(n):
        step = rng.random(probe.shape) < 0.005
        probe = np.where(step, np.clip(probe + rng.choice([-0.1, 0.1], probe.shape), 0, 1), probe)
        steps.append(probe.astype(np.float32))
    return steps


def infer_body(image: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, *image.shape],
                        "data": image.ravel().tolist()}]}  # fmt: skip


def test_an_attack_spread_over_replicas_is_contained_on_all_of_them(
    redis_server: Any, replica: Replica
) -> None:
    """The load balancer spreads a rotating attacker's queries over two replicas: its
    identities add up to one campaign, contained on both; a replica started afterwards replays
    the stream and refuses the campaign's clients too; a release through one lifts it on all."""
    settings = {"redis_url": redis_server.url, "defence": True, "admin_token": "tok"}
    replicas = [replica(**settings), replica(**settings)]
    answers = []
    for i, image in enumerate(walk(60)):
        sent = replicas[i % 2].post(
            INFER, json=infer_body(image), headers={"X-Client-ID": f"sybil-{i // 3}"}
        )
        answers.append(sent.json().get("reason", "served") if sent.status_code != 200 else "ok")
    refused = [i for i, a in enumerate(answers) if a in ("contained", "throttled")]
    assert refused and refused[0] <= 20, answers
    assert sum(a in ("contained", "throttled") for a in answers[refused[0] + 3 :]) >= 0.9 * len(
        answers[refused[0] + 3 :]
    ), answers
    late = f"sybil-{59 // 3}"
    deadline = time.monotonic() + 1.0
    shown = []
    while time.monotonic() < deadline:  # both replicas hold the late identity's evidence
        shown = [
            r.get(f"/v2/admin/clients/{late}", headers={"Authorization": "Bearer tok"}).json()
            for r in replicas
        ]
        if all(s.get("rung") == "refuse" for s in shown):
            break
        time.sleep(0.05)
    assert [s.get("rung") for s in shown] == ["refuse", "refuse"], shown
    fresh = replica(**settings)  # a new replica: replays the retained stream
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        again = fresh.post(INFER, json=infer_body(walk(1)[0]), headers={"X-Client-ID": late})
        if again.status_code == 403:
            break
        time.sleep(0.1)
    assert again.status_code == 403 and again.json()["reason"] == "contained", again.text
    released = replicas[0].post(
        f"/v2/admin/clients/{late}/release", headers={"Authorization": "Bearer tok"}
    )
    assert released.status_code == 200
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        rung = (
            replicas[1]
            .get(f"/v2/admin/clients/{late}", headers={"Authorization": "Bearer tok"})
            .json()["rung"]
        )
        if rung == "observe":
            break
        time.sleep(0.05)
    assert rung == "observe"
    honest = replicas[1].post(
        INFER, json=infer_body(to_float(load_split("test")[0][300:301])[0]),
        headers={"X-Client-ID": "honest-lab"},
    )  # fmt: skip
    assert honest.status_code == 200


def test_a_rollback_on_one_replica_routes_every_replica_within_a_second(
    redis_server: Any, replica: Replica, tmp_path: Path
) -> None:
    from tests.e2e.test_rollback import two_versions

    repository = two_versions(tmp_path / "two")
    settings = {"redis_url": redis_server.url, "admin_token": "tok", "model_repository": repository}
    replicas = [replica(**settings), replica(**settings)]
    admin = {"Authorization": "Bearer tok"}
    route = {"weights": {"1": 0.0, "2": 1.0}, "safe": 1}
    assert replicas[0].put("/v2/admin/routes/digits", json=route, headers=admin).status_code == 200

    def version(gateway: TestClient) -> str:
        answer = gateway.post(INFER, json=body(), headers={"X-Client-ID": "app"})
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]

    def settled(gateway: TestClient, expected: str) -> float:
        """Seconds until the gateway's table routes to ``expected``; one request checks it."""
        start = time.monotonic()
        while time.monotonic() - start < 5:
            shown = gateway.get("/v2/admin/routes", headers=admin).json()["routes"]
            route = shown.get("digits")
            if route is not None:
                to = (
                    route["safe"]
                    if route["rolled_back"]
                    else max(route["weights"], key=route["weights"].get)
                )
                if str(to) == expected:
                    break
            time.sleep(0.02)
        took = time.monotonic() - start
        assert version(gateway) == expected
        return took

    assert settled(replicas[1], "2") < 1.0  # the canary route reached the other replica
    rolled = replicas[1].post(
        "/v2/admin/routes/digits/rollback", json={"reason": "bad canary"}, headers=admin
    )
    assert rolled.status_code == 200, rolled.text
    assert settled(replicas[0], "1") < 1.0  # the rollback, issued on the other one
    shown = replicas[0].get("/v2/admin/routes", headers=admin).json()["routes"]["digits"]
    assert shown["rolled_back"] == "bad canary" and shown["strict"] is True
    late = replica(**settings)  # a replica that starts now takes the table from Redis
    assert settled(late, "1") < 1.0


def test_a_batchs_requests_share_one_round_trip(redis_server: Any) -> None:
    """A batch of fifty requests of one client: one pipelined round trip, the burst let in."""

    async def burst() -> tuple[int, int]:
        client = redis_state.connect(redis_server.url, 1.0)
        trips: list[str] = []
        limiter = RedisRateLimiter(client, RateSpec(60, 10), round_trip=trips.append)
        outcomes = await limiter.admit_batch(["crowd"] * 49 + [None])
        await client.script_flush()  # as after a Redis restart: the limiter loads it again
        assert await limiter.admit_batch(["after-restart"]) == [None]
        await client.aclose()
        admitted = sum(outcome is None for outcome in outcomes)
        assert all(o is None or isinstance(o, TooManyRequests) for o in outcomes), outcomes
        return admitted, trips.count("rate_limit")

    admitted, trips = asyncio.run(burst())
    # ten of the client's, and the request without one; the batch, NOSCRIPT, then again
    assert admitted == 11 and trips == 3, (admitted, trips)


def test_a_throttled_campaign_gets_one_request_per_interval_across_replicas(
    redis_server: Any, replica: Replica
) -> None:
    """Throttled through replica A, the walker asks B and C too: together they let one more
    request through in the interval (Redis keeps the campaign's interval), not one each."""
    settings = {"redis_url": redis_server.url, "defence": True, "throttle_interval_s": 60.0}
    a, b, c = (replica(**settings) for _ in range(3))
    steps = iter(walk(80))
    for image in steps:  # one identity, on A only, until A throttles it
        sent = a.post(INFER, json=infer_body(image), headers={"X-Client-ID": "walker"})
        if sent.status_code == 429:
            assert sent.json()["reason"] == "throttled", sent.text
            break
    else:
        raise AssertionError("the walker was never throttled")
    time.sleep(0.3)  # the evidence reaches B and C
    answers = [
        gateway.post(INFER, json=infer_body(next(steps)), headers={"X-Client-ID": "walker"})
        for gateway in (b, c, b, c)
    ]
    codes = [r.status_code for r in answers]
    assert codes.count(429) >= 3, [r.text for r in answers]
    assert all(r.json()["reason"] == "throttled" for r in answers if r.status_code == 429)
