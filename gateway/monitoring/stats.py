"""Triton's per-model-version statistics: the one record behind ``/stats`` and ``/metrics``.

Semantics follow Triton's statistics extension: request-level durations are counted once per
request; a batch's compute times are added to every request in it; ``execution_count`` counts
batches and ``inference_count`` counts samples. Updated only on the event loop thread.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchTimes:
    """Where one batch's time went, in nanoseconds."""

    input_ns: int
    infer_ns: int
    output_ns: int
    screen_ns: int = 0  # the part of infer_ns spent on screening (host-timed)


@dataclass(slots=True)
class _BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


_PHASES = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "screening",
)


@dataclass
class ModelStats:
    name: str
    version: str
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    pending: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in _PHASES})
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    batches: dict[int, _BatchStats] = field(default_factory=dict)

    def record_batch(self, size: int, requests: int, times: BatchTimes) -> None:
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        d = self.durations
        d["compute_input"].add(times.input_ns * requests, requests)
        d["compute_infer"].add(times.infer_ns * requests, requests)
        d["compute_output"].add(times.output_ns * requests, requests)
        if times.screen_ns:
            d["screening"].add(times.screen_ns * requests, requests)
        per_size = self.batches.get(size)
        if per_size is None:
            per_size = self.batches[size] = _BatchStats()
        per_size.compute_input.add(times.input_ns)
        per_size.compute_infer.add(times.infer_ns)
        per_size.compute_output.add(times.output_ns)

    def record_queue(self, ns: int) -> None:
        self.durations["queue"].add(ns)

    def record_success(self, ns: int) -> None:
        self.durations["success"].add(ns)

    def record_failure(self, ns: int, reason: str) -> None:
        self.durations["fail"].add(ns)
        self.failures[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        """The entry Triton returns in ``model_stats``."""
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                **{p: d.as_dict() for p, d in self.durations.items()},
                "cache_hit": Duration().as_dict(),
                "cache_miss": Duration().as_dict(),
            },
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
