"""Once-a-second samples of the gateway's own counters, for the built-in dashboard.

The dashboard must work with no Prometheus, so the gateway keeps a short history itself: every
``interval_s`` it reads its cumulative counters and histograms and stores the per-second rates
and the latency quantiles of that interval, computed from the histogram's bucket deltas the way
PromQL's ``histogram_quantile`` does (linear inside the bucket).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Metric

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.stats import ModelStats

log = logging.getLogger(__name__)


def histogram_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float:
    """The q-quantile of a histogram given its upper bounds (last +Inf) and cumulative counts.

    Returns NaN for an empty histogram and the largest finite bound when the quantile falls in
    the +Inf bucket, as PromQL does.
    """
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            share = (rank - lower_count) / inside if inside > 0 else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


REVIEW_DROPPED = "review copy dropped"
CONTAINMENT_RUNGS = ("throttle", "refuse")


@dataclass
class Totals:
    """Cumulative values read at one instant."""

    time: float
    requests: float = 0.0
    errors: float = 0.0
    batch_rows: float = 0.0
    batches: float = 0.0
    latency: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    verdicts: dict[str, float] = field(default_factory=dict)  # public: withheld or served
    tiers: dict[str, float] = field(default_factory=dict)  # private: by tier, review drops
    contained: dict[str, float] = field(default_factory=dict)  # refusals by the defence, by rung


def read_totals(now: float, metrics: Metrics, stats: Iterable[ModelStats]) -> Totals:
    totals = Totals(now)
    totals.requests = float(sum(s.durations["success"].count for s in stats))
    totals.errors = _sum(metrics.errors.collect(), "bastion_request_errors_total")
    totals.batch_rows = _sum(metrics.batch_size.collect(), "bastion_batch_size_sum")
    totals.batches = _sum(metrics.batch_size.collect(), "bastion_batch_size_count")
    latency: dict[float, float] = defaultdict(float)
    for family in metrics.request_duration.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                latency[float(sample.labels["le"])] += sample.value
    totals.latency = dict(sorted(latency.items()))
    totals.verdicts = _by_verdict(metrics.screening_verdicts.collect())
    tiers = _by_verdict(metrics.screening_tiers.collect())
    for family in metrics.screening_reviews.collect():  # lost evidence, beside the tiers
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["outcome"].startswith("dropped"):
                tiers[REVIEW_DROPPED] = tiers.get(REVIEW_DROPPED, 0.0) + sample.value
    totals.tiers = tiers
    contained = {rung: 0.0 for rung in CONTAINMENT_RUNGS}  # both series, zero or not
    for family in metrics.defence_refused.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                contained[sample.labels["rung"]] = sample.value
    totals.contained = contained
    # refusals by policy (screening, the defence) have their own charts: not errors here
    refused = _sum(metrics.screening_refused.collect(), "bastion_screening_refused_requests_total")
    refused += _sum(metrics.defence_refused.collect(), "bastion_defence_refused_total")
    totals.errors = max(0.0, totals.errors - refused)
    return totals


def _by_verdict(families: Iterable[Metric]) -> dict[str, float]:
    counts: dict[str, float] = defaultdict(float)
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["verdict"]] += sample.value
    return dict(counts)


def _sum(families: Iterable[Metric], name: str) -> float:
    return float(sum(s.value for f in families for s in f.samples if s.name == name))


def increase(before: float, after: float) -> float:
    """A counter's increase; a counter that went down was reset (a model reloaded), as PromQL
    reads it: everything since the reset is new."""
    return after - before if after >= before else after


def interval_point(before: Totals, after: Totals) -> dict[str, Any]:
    """Rates and quantiles over the interval between two readings. Pure."""
    seconds = max(after.time - before.time, 1e-9)
    bounds = list(after.latency)
    deltas = [increase(before.latency.get(b, 0.0), after.latency[b]) for b in bounds]
    batches = increase(before.batches, after.batches)
    rows = increase(before.batch_rows, after.batch_rows)
    return {
        "t": after.time,
        "rps": increase(before.requests, after.requests) / seconds,
        "errors_per_s": increase(before.errors, after.errors) / seconds,
        "p50_ms": histogram_quantile(0.5, bounds, deltas) * 1000,
        "p99_ms": histogram_quantile(0.99, bounds, deltas) * 1000,
        "batch_size": rows / batches if batches else math.nan,
        "verdicts_per_s": _rates(before.verdicts, after.verdicts, seconds),
        "tiers_per_s": _rates(before.tiers, after.tiers, seconds),
        "contained_per_s": _rates(before.contained, after.contained, seconds),
    }


def _rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {key: increase(before.get(key, 0.0), count) / seconds for key, count in after.items()}


class Sampler:
    """Keeps the last ``points`` interval points; runs as a task on the event loop."""

    def __init__(
        self,
        read: Callable[[], Totals],
        interval_s: float = 1.0,
        points: int = 600,
    ) -> None:
        self._read = read
        self.interval_s = interval_s
        self.points: deque[dict[str, Any]] = deque(maxlen=points)
        self._last: Totals | None = None

    def sample(self) -> None:
        totals = self._read()
        if self._last is not None:
            self.points.append(interval_point(self._last, totals))
        self._last = totals

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # the dashboard's history must never stop the server
                log.exception("dashboard sampler failed")
            await asyncio.sleep(self.interval_s)

    def series(self, private: bool = False) -> dict[str, Any]:
        """Column-wise, as charts take it; NaN (no traffic) becomes null. ``verdicts_per_s`` is
        by tier (and review copies dropped) for a ``private`` reader, else by block decision."""
        points = list(self.points)
        source = "tiers_per_s" if private else "verdicts_per_s"
        verdicts = sorted({v for p in points for v in p[source]})
        columns: dict[str, Any] = {
            key: [_finite(p[key]) for p in points]
            for key in ("t", "rps", "errors_per_s", "p50_ms", "p99_ms", "batch_size")
        }
        columns["verdicts_per_s"] = {
            v: [_finite(p[source].get(v, 0.0)) for p in points] for v in verdicts
        }
        columns["contained_per_s"] = {
            rung: [_finite(p["contained_per_s"].get(rung, 0.0)) for p in points]
            for rung in CONTAINMENT_RUNGS
        }
        return columns


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
