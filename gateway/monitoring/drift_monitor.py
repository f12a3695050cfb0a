"""In-path drift monitoring: sufficient statistics on the device, windows and alarms on the host.

Every batch adds to one *hop* of device tensors (``window.DeviceHop``: histogram counts over the
reference's bins, sums, class counts, flagged count and a ring of the latest embeddings) with
tensor ops only, so the serving path never waits for the device per request. A hop closes
after ``hop_images`` images or ``hop_max_s`` seconds, which is the only host sync (a few hundred
numbers). The *window* is the last ``window_hops`` hops, a sliding window evaluated at every hop;
a shift that starts anywhere fills a whole window within ``(window_hops + 1) * hop_images``
images.

Each window gets PSI per scalar statistic, Jensen-Shannon for the predicted classes, a z-score of
the screening's flag rate against its calibrated rate, and MMD² on the embeddings with a
permutation p-value, which runs on a worker thread off the hot path, at most every
``mmd_interval_s`` (a thousand permutations cost about 90 ms of CPU on one thread). An alarm
is raised by one window over its threshold, except MMD, whose p-value must be at most
``mmd_alpha`` in the window and in the latest tested window disjoint from it: with hundreds of
windows per hour, a single permutation test at 0.001 would raise false alarms by itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bastion.gateway.monitoring import drift
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.reference import STATISTICS, ReferenceProfile
from bastion.gateway.monitoring.window import (
    MMD,
    DeviceHop,
    DriftConfig,
    Hop,
    WindowScores,
    score_window,
    thresholds,
)

log = logging.getLogger(__name__)

HISTORY_SHOWN = 200


@dataclass(frozen=True)
class DriftEvent:
    time: float
    model: str
    version: str
    statistic: str
    kind: str  # "raised" when an alarm starts, "cleared" when it ends
    value: float
    threshold: float
    at_image: int  # images the model had seen when the window closed
    window_images: int


class DriftMonitor:
    """One model version's drift monitor: fed by its batches, read by metrics and the API."""

    def __init__(
        self,
        model: str,
        version: str,
        profile: ReferenceProfile,
        config: DriftConfig,
        metrics: Metrics,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[DriftEvent], object] | None = None,
    ) -> None:
        """``on_event`` takes each alarm raised or cleared (the incident log's writer: it must
        not block, since it is called on the batch's thread)."""
        self.model, self.version = model, version
        self.on_event = on_event
        self.profile = profile
        self.config = config
        self.thresholds = thresholds(config)
        self.metrics = metrics
        self._device = device
        self._ring = max(1, config.embedding_sample // config.window_hops)
        self._lock = threading.Lock()
        self._clock = clock
        self._hop = DeviceHop(profile, device, self._ring, clock())
        self._hops: deque[Hop] = deque(maxlen=config.window_hops)
        self.images_seen = 0
        self.windows = 0
        self.history: deque[WindowScores] = deque(maxlen=600)
        self.events: deque[DriftEvent] = deque(maxlen=200)
        self.active: set[str] = set()
        self._mmd_results: deque[tuple[int, float]] = deque(maxlen=64)  # (at_image, p-value)
        self._mmd_busy = False
        self._mmd_started = -math.inf
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"drift-{model}")
        self._generator = torch.Generator().manual_seed(0)
        self.failed = False
        self._publish_reference()

    def observe(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        embedding: torch.Tensor | None,
        flagged: torch.Tensor | None,
    ) -> None:
        """Adds a batch to the open hop and closes the hop when it is full or old. Called by the
        device job for every batch; a monitor must never fail a batch, so on an error it logs
        once and switches itself off."""
        if self.failed:
            return
        try:
            with self._lock:
                self._hop.add(images, probs, embedding, flagged)
                self.images_seen += len(images)
                hop = self._hop
                full = hop.images >= self.config.hop_images
                if not full and self._clock() - hop.opened < self.config.hop_max_s:
                    return
                self._hops.append(hop.close())
                self._hop = DeviceHop(self.profile, self._device, self._ring, self._clock())
                self._evaluate()
        except Exception:
            self.failed = True
            log.exception("drift monitor of %s v%s failed; it is off", self.model, self.version)

    def _evaluate(self) -> None:
        hops = list(self._hops)
        self._count_predictions(hops[-1])
        images = sum(h.images for h in hops)
        if images < self.config.min_images:
            return
        scores, means = score_window(self.profile, hops, self.config)
        window = WindowScores(self.images_seen, time.time(), images, scores, means)
        self.windows += 1
        self.history.append(window)
        for name, value in scores.items():
            self._update(name, value > self.thresholds[name], value, window)
        self._publish(window, hops)
        embeddings = torch.cat([h.embeddings for h in hops])[-self.config.embedding_sample :]
        due = self._clock() - self._mmd_started >= self.config.mmd_interval_s
        if due and not self._mmd_busy and len(embeddings) >= 20:
            self._mmd_busy = True
            self._mmd_started = self._clock()
            self._pool.submit(self._mmd, embeddings, window)
        window.alarm = bool(self.active)
        window.active = sorted(self.active)

    def _mmd(self, embeddings: torch.Tensor, window: WindowScores) -> None:
        """Off the hot path: MMD² and its permutation p-value against the reference sample."""
        try:
            value, pvalue = drift.mmd_permutation_test(
                embeddings,
                self.profile.embeddings,
                self.profile.bandwidth,
                self.config.mmd_permutations,
                self._generator,
            )
            with self._lock:
                window.scores[MMD] = value
                window.pvalue = pvalue
                first_image = window.at_image - window.images
                disjoint = [p for at, p in self._mmd_results if at <= first_image]
                earlier = disjoint[-1] if disjoint else 1.0
                self._mmd_results.append((window.at_image, pvalue))
                alarm = max(pvalue, earlier) <= self.config.mmd_alpha
                self._update(MMD, alarm, pvalue, window)
                window.alarm = bool(self.active)
                window.active = sorted(self.active)
                self.metrics.drift_score.labels(self.model, self.version, MMD).set(value)
                self.metrics.drift_pvalue.labels(self.model, self.version, MMD).set(pvalue)
                self.metrics.drift_alarm.labels(self.model, self.version).set(int(window.alarm))
        except Exception:  # a monitor must never take the server down
            log.exception("drift: MMD for %s failed", self.model)
        finally:
            self._mmd_busy = False

    def _update(self, statistic: str, alarm: bool, value: float, window: WindowScores) -> None:
        was = statistic in self.active
        if alarm == was:
            return
        kind = "raised" if alarm else "cleared"
        (self.active.add if alarm else self.active.discard)(statistic)
        event = DriftEvent(
            time=window.time,
            model=self.model,
            version=self.version,
            statistic=statistic,
            kind=kind,
            value=value,
            threshold=self.thresholds[statistic],
            at_image=window.at_image,
            window_images=window.images,
        )
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        if alarm:
            self.metrics.drift_events.labels(self.model, self.version, statistic).inc()
        log.warning(
            "drift alarm %s: model %s version %s %s=%.4g (threshold %g) at image %d, window of %d",
            kind,
            self.model,
            self.version,
            statistic,
            value,
            self.thresholds[statistic],
            window.at_image,
            window.images,
        )

    def _count_predictions(self, hop: Hop) -> None:
        counter = self.metrics.predictions
        for label, count in enumerate(hop.classes.tolist()):
            if count:
                counter.labels(self.model, self.version, str(label)).inc(count)

    def _publish_reference(self) -> None:
        m, labels = self.metrics, (self.model, self.version)
        for name, value in thresholds(self.config).items():
            m.drift_threshold.labels(*labels, name).set(value)
        for name, value in zip(STATISTICS, self.profile.means.tolist(), strict=True):
            m.reference_mean.labels(*labels, name).set(value)
        for label, share in enumerate(self.profile.classes.tolist()):
            m.class_share.labels(*labels, str(label), "reference").set(share)
        m.drift_alarm.labels(*labels).set(0)

    def _publish(self, window: WindowScores, hops: list[Hop]) -> None:
        m, labels = self.metrics, (self.model, self.version)
        for name, value in window.scores.items():
            m.drift_score.labels(*labels, name).set(value)
        for name, value in window.means.items():
            m.window_mean.labels(*labels, name).set(value)
        shares = drift.proportions(torch.stack([h.classes for h in hops]).sum(0))
        for label, share in enumerate(shares.tolist()):
            m.class_share.labels(*labels, str(label), "window").set(share)
        m.drift_window_images.labels(*labels).set(window.images)
        m.drift_window_time.labels(*labels).set(window.time)
        m.drift_alarm.labels(*labels).set(int(bool(self.active)))

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /v2/models/{m}/drift`` and the dashboard show.

        The lock is held only to copy; the copies are turned into JSON-ready dicts after it is
        released, so a reader never holds up the serving path's ``observe``.
        """
        with self._lock:
            hops = list(self._hops)
            windows = [
                replace(w, scores=dict(w.scores), means=dict(w.means), active=list(w.active))
                for w in list(self.history)[-HISTORY_SHOWN:]
            ]
            events = list(self.events)
            state = {
                "model": self.model,
                "version": self.version,
                "images_seen": self.images_seen,
                "windows": self.windows,
                "alarm": bool(self.active),
                "active": sorted(self.active),
                "failed": self.failed,
            }
        window: dict[str, Any] | None = None
        if hops:
            counts = torch.stack([h.counts for h in hops]).sum(0)
            classes = torch.stack([h.classes for h in hops]).sum(0)
            window = {
                "images": sum(h.images for h in hops),
                "proportions": _by_statistic(drift.proportions(counts)),
                "classes": drift.proportions(classes).tolist(),
            }
        history = [asdict(w) for w in windows]
        return {
            **state,
            "config": asdict(self.config),
            "thresholds": self.thresholds,
            "latest": history[-1] if history else None,
            "window": window,
            "reference": {
                "samples": self.profile.samples,
                "statistics": list(STATISTICS),
                "edges": _by_statistic(self.profile.edges),
                "proportions": _by_statistic(self.profile.proportions),
                "means": _by_statistic(self.profile.means),
                "classes": self.profile.classes.tolist(),
                "flag_rate": self.profile.flag_rate,
            },
            "history": history,
            "events": [asdict(e) for e in events],
        }

    def settle(self) -> None:
        """Waits for the MMD test in flight, if any (for tests and benchmarks)."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        """Stops the MMD worker and withdraws this version's series, so an unloaded version
        leaves no alarm or stale window behind in Prometheus."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        m, labels = self.metrics, (self.model, self.version)
        statistics = (*self.thresholds, *STATISTICS)
        classes = [str(c) for c in range(len(self.profile.classes))]
        series = [
            *[(g, (*labels, name)) for g in (m.drift_score, m.drift_pvalue) for name in statistics],
            *[(m.drift_threshold, (*labels, name)) for name in self.thresholds],
            *[
                (g, (*labels, name))
                for g in (m.window_mean, m.reference_mean)
                for name in STATISTICS
            ],
            *[(m.drift_events, (*labels, name)) for name in self.thresholds],
            *[
                (m.class_share, (*labels, c, src))
                for c in classes
                for src in ("window", "reference")
            ],
            *[(m.predictions, (*labels, c)) for c in classes],
            (m.drift_alarm, labels),
            (m.drift_window_images, labels),
            (m.drift_window_time, labels),
        ]
        for metric, values in series:
            with contextlib.suppress(KeyError):
                metric.remove(*values)


def _by_statistic(rows: torch.Tensor) -> dict[str, Any]:
    return dict(zip(STATISTICS, rows.tolist(), strict=True))
