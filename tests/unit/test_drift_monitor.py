"""The drift monitor on the digits model's outputs: hop statistics, windows, alarms, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from bastion.gateway.monitoring import drift
from bastion.gateway.monitoring.drift_monitor import DriftMonitor
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.reference import (
    ReferenceProfile,
    build_profile,
    scalar_statistics,
)
from bastion.gateway.monitoring.window import FLAG_RATE, MMD, DeviceHop, DriftConfig
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier

CPU = torch.device("cpu")
CONFIG = DriftConfig(
    hop_images=100,
    window_hops=2,
    min_images=150,
    mmd_permutations=200,
    mmd_alpha=0.01,
    mmd_interval_s=0.0,
)


@cache
def module() -> ServedClassifier:
    return ServedClassifier(load_digits(), channels_last=True).eval()


def outputs(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        _, probs, embedding = module().forward_embedded(x)
    return x, probs, embedding


@cache
def profile() -> ReferenceProfile:
    images = to_float(load_split("calibration")[0])
    x, probs, embedding = outputs(images)
    return build_profile(x, probs, embedding, flag_rate=0.05)


def shuffled_test(seed: int = 0) -> np.ndarray:
    images = to_float(load_split("test")[0])
    return images[np.random.default_rng(seed).permutation(len(images))]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def monitor(metrics: Metrics) -> Iterator[DriftMonitor]:
    m = DriftMonitor("digits", "1", profile(), CONFIG, metrics, CPU)
    yield m
    m.close()


def feed(
    m: DriftMonitor, images: np.ndarray, batch: int = 25, flagged: float | None = None
) -> None:
    for i in range(0, len(images), batch):
        x, probs, embedding = outputs(images[i : i + batch])
        flags = None
        if flagged is not None:
            flags = torch.arange(len(x)) < round(flagged * len(x))
        m.observe(x, probs, embedding, flags)
        m.settle()


def test_committed_reference_profile_is_rebuilt_from_the_calibration_split() -> None:
    committed = ReferenceProfile.load(DEFAULT_REPOSITORY / "digits" / "1")
    assert committed is not None
    rebuilt = profile()
    torch.testing.assert_close(committed.edges, rebuilt.edges, atol=1e-5, rtol=0)
    # confidence saturates at 1.0 in float32: the top deciles' edges are a few ulps apart, so
    # which bin a tied image falls in depends on the CPU's softmax rounding (AVX2 vs AVX-512)
    torch.testing.assert_close(committed.proportions, rebuilt.proportions, atol=0.04, rtol=0)
    torch.testing.assert_close(committed.classes, rebuilt.classes)
    torch.testing.assert_close(committed.embeddings, rebuilt.embeddings, atol=1e-3, rtol=1e-3)
    assert committed.samples == 1000 and committed.flag_rate == 0.005  # the block tier


def test_profile_round_trips_through_safetensors(tmp_path) -> None:
    saved = profile()
    saved.save(tmp_path)
    loaded = ReferenceProfile.load(tmp_path)
    assert loaded is not None
    torch.testing.assert_close(loaded.proportions, saved.proportions)
    assert loaded.bandwidth == saved.bandwidth and loaded.meta == saved.meta


def test_window_holds_the_same_histogram_as_the_offline_computation(
    monitor: DriftMonitor,
) -> None:
    images = shuffled_test()[:200]
    feed(monitor, images, batch=50)
    x, probs, _ = outputs(images)
    expected = drift.proportions(drift.bin_counts(scalar_statistics(x, probs), profile().edges))
    window = monitor.snapshot()["window"]
    assert window["images"] == 200
    for row, name in enumerate(profile().statistics):
        np.testing.assert_allclose(window["proportions"][name], expected[row].numpy())
    classes = np.bincount(probs.argmax(1).numpy(), minlength=10) / 200
    np.testing.assert_allclose(window["classes"], classes)


def test_hops_close_by_count_and_by_time(metrics: Metrics) -> None:
    clock = FakeClock()
    config = replace(CONFIG, hop_max_s=30.0, min_images=1)
    m = DriftMonitor("digits", "1", profile(), config, metrics, CPU, clock=clock)
    images = shuffled_test()
    feed(m, images[:99])
    assert m.windows == 0  # 99 images, 0 s: the hop is still open
    feed(m, images[99:101])
    assert m.windows == 1  # the 100th image closed it by count
    feed(m, images[101:111])
    clock.now = 31.0
    feed(m, images[111:112])
    assert m.windows == 2 and m.snapshot()["latest"]["images"] == 101 + 11
    m.close()


def test_clean_traffic_raises_no_alarm_noise_raises_one_and_clean_clears_it(
    monitor: DriftMonitor, metrics: Metrics
) -> None:
    clean = shuffled_test()
    feed(monitor, clean[:800])
    assert monitor.events == type(monitor.events)() and monitor.windows >= 6
    noise = np.random.default_rng(0).normal(0, 0.1, clean.shape).astype(np.float32)
    feed(monitor, np.clip(clean[:300] + noise[:300], 0, 1))
    raised = [e for e in monitor.events if e.kind == "raised"]
    assert raised and all(e.at_image > 800 for e in raised)
    assert {"psi_confidence", "psi_pixel_mean"} <= {e.statistic for e in raised}
    labels = {"model": "digits", "version": "1"}
    assert metrics.registry.get_sample_value("bastion_drift_alarm", labels) == 1
    events = metrics.registry.get_sample_value(
        "bastion_drift_events_total", {**labels, "statistic": "psi_pixel_mean"}
    )
    assert events == 1
    feed(monitor, clean[300:800])
    assert not monitor.active
    assert {e.statistic for e in monitor.events if e.kind == "cleared"} >= {"psi_pixel_mean"}
    assert metrics.registry.get_sample_value("bastion_drift_alarm", labels) == 0


def test_a_flag_rate_far_above_the_calibrated_rate_raises_an_alarm(monitor: DriftMonitor) -> None:
    clean = shuffled_test()
    feed(monitor, clean[:200], flagged=0.04)
    assert FLAG_RATE not in monitor.active
    feed(monitor, clean[200:400], flagged=0.2)
    assert FLAG_RATE in monitor.active
    score = monitor.snapshot()["latest"]["scores"][FLAG_RATE]
    # the window is the last two hops: 40 flagged of 200 against 5 %
    assert score == pytest.approx((40 - 200 * 0.05) / np.sqrt(200 * 0.05 * 0.95))


def test_mmd_alarm_needs_two_disjoint_windows_below_alpha(monitor: DriftMonitor) -> None:
    clean = shuffled_test()
    bright = np.clip(clean + 0.3, 0, 1)
    feed(monitor, clean[:200])
    feed(monitor, bright[:200])  # one fully shifted window: p is minimal but no alarm yet
    assert monitor.snapshot()["latest"]["pvalue"] == pytest.approx(1 / 201)
    assert MMD not in monitor.active
    feed(monitor, bright[200:400])  # a second, disjoint shifted window
    assert MMD in monitor.active


def test_the_embedding_ring_keeps_the_latest_rows_in_arrival_order() -> None:
    hop = DeviceHop(profile(), CPU, ring=8, opened=0.0)
    images = torch.zeros(3, 1, 28, 28)
    probs = torch.full((3, 10), 0.1)
    rows = torch.arange(11 * 128, dtype=torch.float32).view(11, 128)
    for start, stop in ((0, 3), (3, 4), (4, 9), (9, 11)):  # 11 rows through 8 slots, wrapping
        n = stop - start
        hop.add(images[:1].expand(n, -1, -1, -1), probs[:1].expand(n, -1), rows[start:stop], None)
    torch.testing.assert_close(hop.close().embeddings, rows[3:])


def test_a_failing_monitor_switches_itself_off_and_never_fails_the_batch(
    monitor: DriftMonitor,
) -> None:
    x = torch.zeros(4, 1, 28, 28)
    wrong = torch.zeros(4, 12)  # twelve classes against a ten-class profile
    wrong[:, 11] = 1.0
    monitor.observe(x, wrong, None, None)
    assert monitor.failed and monitor.snapshot()["failed"]
    monitor.observe(*outputs(shuffled_test()[:4]), None)  # ignored from now on
    assert monitor.images_seen == 0


def test_closing_withdraws_the_versions_series(metrics: Metrics) -> None:
    m = DriftMonitor("digits", "7", profile(), CONFIG, metrics, CPU)
    feed(m, shuffled_test()[:200])
    labels = {"model": "digits", "version": "7"}
    assert metrics.registry.get_sample_value("bastion_drift_alarm", labels) == 0
    m.close()
    assert metrics.registry.get_sample_value("bastion_drift_alarm", labels) is None
    text = generate_latest(metrics.registry).decode()
    assert 'version="7"' not in text


def test_mmd_runs_at_most_once_per_interval(metrics: Metrics) -> None:
    clock = FakeClock()
    m = DriftMonitor(
        "digits", "1", profile(), replace(CONFIG, mmd_interval_s=10.0), metrics, CPU, clock=clock
    )
    feed(m, shuffled_test()[:500])  # windows at 200, 300, 400, 500 images, all at t=0
    tested = [w for w in m.snapshot()["history"] if w["pvalue"] is not None]
    assert [w["at_image"] for w in tested] == [200]
    clock.now = 10.0
    feed(m, shuffled_test()[500:600])
    tested = [w for w in m.snapshot()["history"] if w["pvalue"] is not None]
    assert [w["at_image"] for w in tested] == [200, 600]
    m.close()
