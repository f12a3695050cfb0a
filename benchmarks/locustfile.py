"""Closed-loop users that post one digit per request, byte for byte as ``tritonclient.http`` does.

The bodies are built once at start-up by tritonclient itself (JSON header + raw FP32 tensor, the
binary tensor extension), so the servers see real client traffic while the load generator spends
its CPU on sending, not on encoding. Every response other than 200 counts as a failure.

Environment: ``BENCH_MODEL`` (default ``digits``), ``BENCH_INPUT`` (``images``),
``BENCH_POOL_SIZE`` (distinct request bodies, default 512) and ``BENCH_LATENCY_OUT`` (a JSON file
that receives exact latency percentiles; locust's own CSV rounds them to whole milliseconds).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import gevent
import numpy as np
from locust import FastHttpUser, constant, events, task

from bastion.benchmarks.workload import build_request, digit_images

MODEL = os.environ.get("BENCH_MODEL", "digits")
INPUT = os.environ.get("BENCH_INPUT", "images")
POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "512"))
_LATENCY_OUT = os.environ.get("BENCH_LATENCY_OUT", "")
LATENCY_OUT = Path(_LATENCY_OUT) if _LATENCY_OUT else None


def build_pool(size: int) -> list[tuple[bytes, dict[str, str]]]:
    """Distinct request bodies from real test digits, built before the first user starts."""
    images, _ = digit_images(size, seed=1)
    return [build_request(image, INPUT) for image in images]


POOL = build_pool(POOL_SIZE)
# Building the pool blocks for a second or two; gevent's cached loop clock would otherwise start
# locust's --run-time timer that much in the past and cut every run short by as much.
gevent.get_hub().loop.update_now()


class _Latencies:
    """Raw response times (ms), so p50/p99 are exact rather than locust's rounded buckets."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.failures = 0
        self.all_requests = 0  # ramp-up included: what the server's CPU time is divided by

    def reset(self) -> None:
        self.samples.clear()
        self.failures = 0

    def summary(self) -> dict[str, Any]:
        data = np.asarray(self.samples, dtype=np.float64)
        percentiles = np.percentile(data, [50, 90, 99, 99.9]) if data.size else [float("nan")] * 4
        names = ("p50_ms", "p90_ms", "p99_ms", "p999_ms")
        counts = {"requests": int(data.size), "failures": self.failures}
        return (
            counts
            | {"all_requests": self.all_requests}
            | {name: float(value) for name, value in zip(names, percentiles, strict=True)}
        )


LATENCIES = _Latencies()


@events.request.add_listener
def _record(response_time: float, exception: BaseException | None, **_: Any) -> None:
    LATENCIES.samples.append(response_time)
    LATENCIES.all_requests += 1
    if exception is not None:
        LATENCIES.failures += 1


@events.spawning_complete.add_listener
def _reset_after_ramp(**_: Any) -> None:
    """Mirrors ``--reset-stats``: the ramp-up does not count."""
    LATENCIES.reset()


@events.quitting.add_listener
def _write_latencies(**_: Any) -> None:
    if LATENCY_OUT is not None:
        LATENCY_OUT.write_text(json.dumps(LATENCIES.summary()))


class TritonClientUser(FastHttpUser):
    """One connection, one request in flight, no think time: the server sets the pace."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self._next = random.randrange(len(POOL))

    @task
    def infer(self) -> None:
        body, headers = POOL[self._next]
        self._next = (self._next + 1) % len(POOL)
        with self.client.post(
            f"/v2/models/{MODEL}/infer",
            data=body,
            headers=headers,
            name="infer",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]!r}")
