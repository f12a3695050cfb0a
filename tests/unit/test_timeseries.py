"""The dashboard's own history: quantiles from bucket deltas and per-second rates."""

from __future__ import annotations

import math

import pytest

from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.stats import ModelStats
from bastion.gateway.monitoring.timeseries import Sampler, histogram_quantile, read_totals

INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket_like_promql() -> None:
    bounds = [0.1, 0.2, 0.5, INF]
    cumulative = [10.0, 60.0, 100.0, 100.0]
    assert histogram_quantile(0.5, bounds, cumulative) == pytest.approx(0.1 + 0.1 * 40 / 50)
    assert histogram_quantile(0.05, bounds, cumulative) == pytest.approx(0.05)
    assert histogram_quantile(0.99, bounds, cumulative) == pytest.approx(0.2 + 0.3 * 39 / 40)


def test_histogram_quantile_is_nan_when_empty_and_capped_in_the_inf_bucket() -> None:
    assert math.isnan(histogram_quantile(0.5, [0.1, INF], [0.0, 0.0]))
    assert histogram_quantile(0.99, [0.1, INF], [1.0, 10.0]) == 0.1


def test_sampler_turns_counters_into_rates_and_interval_quantiles() -> None:
    metrics = Metrics()
    stats = ModelStats("digits", "1")
    clock = iter([100.0, 102.0, 104.0])
    sampler = Sampler(lambda: read_totals(next(clock), metrics, [stats]))
    sampler.sample()
    for _ in range(20):
        stats.record_success(2_600_000)
        metrics.request_duration.labels("digits", "1").observe(0.0026)
    metrics.batch_size.labels("digits", "1").observe(4)
    metrics.batch_size.labels("digits", "1").observe(16)
    metrics.errors.labels("503").inc(4)
    metrics.screening_verdicts.labels("digits", "1", "adversarial", "block").inc(2)
    metrics.screening_tiers.labels("digits", "1", "adversarial", "block").inc(2)
    metrics.screening_verdicts.labels("digits", "1", "clean", "allow").inc(6)
    metrics.screening_tiers.labels("digits", "1", "suspicious", "review").inc(6)
    metrics.screening_reviews.labels("digits", "1", "written").inc(5)
    metrics.screening_reviews.labels("digits", "1", "dropped_backlog").inc(1)
    metrics.defence_refused.labels("refuse").inc(3)
    metrics.errors.labels("403").inc(3)  # those refusals: a chart of their own, not errors
    sampler.sample()
    sampler.sample()  # a quiet interval
    series = sampler.series()
    assert series["t"] == [102.0, 104.0]
    assert series["rps"] == [10.0, 0.0]
    assert series["errors_per_s"] == [2.0, 0.0]
    assert series["batch_size"] == [10.0, None]  # no batch ran: no mean, not zero
    # all in the (2 ms, 3 ms] bucket: the median is interpolated half way
    assert series["p50_ms"][0] == pytest.approx(2.5) and series["p50_ms"][1] is None
    assert series["contained_per_s"] == {"throttle": [0.0, 0.0], "refuse": [1.5, 0.0]}
    # the public view: withheld or served; the tiers only for a reader with the token
    assert series["verdicts_per_s"] == {"adversarial": [1.0, 0.0], "clean": [3.0, 0.0]}
    assert sampler.series(private=True)["verdicts_per_s"] == {
        "adversarial": [1.0, 0.0],
        "review copy dropped": [0.5, 0.0],
        "suspicious": [3.0, 0.0],
    }


def test_policy_refusals_are_not_counted_as_errors() -> None:
    metrics = Metrics()
    metrics.errors.labels("404").inc(2)
    metrics.errors.labels("403").inc(5)  # 3 withheld by screening, 2 refused by the defence
    metrics.screening_refused.inc(3)
    metrics.defence_refused.labels("refuse").inc(2)
    metrics.errors.labels("429").inc(1)
    metrics.defence_refused.labels("throttle").inc(1)
    assert read_totals(0.0, metrics, []).errors == 2  # only the unknown model's 404s
