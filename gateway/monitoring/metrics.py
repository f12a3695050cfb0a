"""Prometheus exposition: Triton's ``nv_*`` families plus Bastion's histograms (in seconds).

The ``nv_*`` counters are rendered from ``ModelStats`` at scrape time, with Triton's exact names
(no ``_total`` suffix, which prometheus-client would add), so dashboards written for Triton work
unchanged. The histograms come from prometheus-client, in a registry owned by the app.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bastion.gateway.monitoring.stats import BatchTimes, ModelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# fine enough between 1 and 100 ms that interpolated quantiles (the dashboard's, PromQL's) are
# within a few milliseconds of the true ones where Bastion's latencies live
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
_SCORE_BUCKETS = (
    0.001,
    0.003,
    0.01,
    0.03,
    0.1,
    0.2,
    0.3,
    0.5,
    0.7,
    0.9,
    1.0,
    1.5,
    2.0,
    3.0,
    10.0,
    30.0,
    100.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests", "success_count"),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n)", "inference"),
    ("nv_inference_exec_count", "Number of model executions (batches)", "execution"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration", "success_ns"),
    ("nv_inference_queue_duration_us", "Cumulative time requests spend queued", "queue_ns"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration", "input_ns"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration", "infer_ns"),
    ("nv_inference_compute_output_duration_us", "Cumulative compute output duration", "output_ns"),
    (
        "bastion_screening_compute_duration_us",
        "Cumulative screening time within compute infer",
        "screen_ns",
    ),
)


def _values(s: ModelStats) -> dict[str, float]:
    d = s.durations
    return {
        "success_count": d["success"].count,
        "inference": s.inference_count,
        "execution": s.execution_count,
        "success_ns": d["success"].ns // 1000,
        "queue_ns": d["queue"].ns // 1000,
        "input_ns": d["compute_input"].ns // 1000,
        "infer_ns": d["compute_infer"].ns // 1000,
        "output_ns": d["compute_output"].ns // 1000,
        "screen_ns": d["screening"].ns // 1000,
    }


def render_triton(stats: Iterable[ModelStats]) -> str:
    stats = list(stats)
    lines: list[str] = []
    values = [(s, _values(s)) for s in stats]
    for name, help_text, key in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{model="{s.name}",version="{s.version}"}} {v[key]}' for s, v in values]
    name = "nv_inference_request_failure"
    lines += [f"# HELP {name} Number of failed inference requests", f"# TYPE {name} counter"]
    for s in stats:
        for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
            count = s.failures.get(reason, 0)
            lines.append(
                f'{name}{{model="{s.name}",reason="{reason}",version="{s.version}"}} {count}'
            )
    name = "nv_inference_pending_request_count"
    lines += [f"# HELP {name} Instantaneous number of pending requests", f"# TYPE {name} gauge"]
    lines += [f'{name}{{model="{s.name}",version="{s.version}"}} {s.pending}' for s in stats]
    return "\n".join(lines) + "\n"


def render_gpu() -> str:
    """``nv_gpu_*`` gauges, present only when torch sees a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return ""
    lines = [
        "# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes",
        "# TYPE nv_gpu_memory_total_bytes gauge",
        "# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes",
        "# TYPE nv_gpu_memory_used_bytes gauge",
        "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)",
        "# TYPE nv_gpu_utilization gauge",
    ]
    for i in range(torch.cuda.device_count()):
        uuid = str(torch.cuda.get_device_properties(i).uuid)
        free, total = torch.cuda.mem_get_info(i)
        lines.append(f'nv_gpu_memory_total_bytes{{gpu_uuid="{uuid}"}} {total}')
        lines.append(f'nv_gpu_memory_used_bytes{{gpu_uuid="{uuid}"}} {total - free}')
        with contextlib.suppress(Exception):  # utilization needs NVML, which some drivers lack
            busy = torch.cuda.utilization(i) / 100
            lines.append(f'nv_gpu_utilization{{gpu_uuid="{uuid}"}} {busy}')
    return "\n".join(lines) + "\n"


class Metrics:
    """The app's Prometheus registry and Bastion's own histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.private_registry = CollectorRegistry()
        labels = ["model", "version"]
        self.request_duration = Histogram(
            "bastion_request_duration_seconds",
            "Infer request latency, arrival to response",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "bastion_queue_duration_seconds",
            "Time a request waits for its batch",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bastion_batch_size",
            "Rows per executed batch",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "bastion_request_errors",
            "Requests answered with an error, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        screening = ["model", "version", "detector"]
        # per-detector score distributions are an oracle for an adaptive attacker at low traffic
        # (one query moves one bucket): only in the private registry, shown behind a token
        self.screening_score = Histogram(
            "bastion_screening_score",
            "Detector scores of screened images (higher: more suspicious)",
            screening,
            buckets=_SCORE_BUCKETS,
            registry=self.private_registry,
        )
        # public: what a client can see anyway (withheld or served); a served image counts as
        # clean whatever its tier, since a public count of the review tier would tell a prober,
        # one query at a time, when it sits between the tiers
        self.screening_verdicts = Counter(
            "bastion_screening_verdicts",
            "Screened images by block decision (clean: served) and the action taken",
            ["model", "version", "verdict", "action"],
            registry=self.registry,
        )
        # private (behind BASTION_METRICS_TOKEN): the tiers, the review path, the tiers' rates
        # the stateful defence: refusals are what a client sees anyway (public); probes private
        self.screening_refused = Counter(  # also in request_errors; not an error on the dashboard
            "bastion_screening_refused_requests",
            "Requests refused (403) as screening withheld an image",
            registry=self.registry,
        )
        self.defence_refused = Counter(
            "bastion_defence_refused",
            "Requests refused by the stateful defence, by rung (throttle: 429, refuse: 403; "
            "repeat: 403 for a probe of a query that was refused; probe: 403 for a query on "
            "a line search across the decision boundary)",
            ["rung"],
            registry=self.registry,
        )
        self.defence_transitions = Counter(
            "bastion_defence_transitions",
            "Clients moved to a rung of the containment ladder (observe: released or cleared)",
            ["rung"],
            registry=self.private_registry,
        )
        self.defence_probes = Counter(
            "bastion_defence_probes",
            "Images that nearly duplicate a remembered query of another request",
            registry=self.private_registry,
        )
        self.defence_clients = Gauge(
            "bastion_defence_clients",
            "Tracked clients on each rung above observe (throttle, strict, refuse)",
            ["rung"],
            registry=self.private_registry,
        )
        self.defence_campaigns = Gauge(
            "bastion_defence_campaigns",
            "Campaigns (clients linked by their probes): linked, and contained (refuse rung)",
            ["state"],
            registry=self.private_registry,
        )
        self.defence_alert = Gauge(
            "bastion_defence_alert",
            "1 while policy is tightened for young identities (a campaign is throttled or "
            "worse), else 0",
            registry=self.private_registry,
        )
        self.shared_state_up = Gauge(
            "bastion_shared_state_up",
            "1 while the shared-state backend answers (Redis: its last ping or command)",
            ["backend"],
            registry=self.private_registry,
        )
        self.shared_state_round_trips = Counter(
            "bastion_shared_state_round_trips",
            "Round trips to the shared-state backend (a pipeline is one), by operation",
            ["backend", "op"],
            registry=self.private_registry,
        )
        self.shared_state_errors = Counter(
            "bastion_shared_state_errors",
            "Shared-state commands that failed (timeout, connection), by backend and operation",
            ["backend", "op"],
            registry=self.private_registry,
        )
        self.incident_log_entries = Counter(
            "bastion_incident_log_entries",
            "Entries appended to the tamper-evident incident log, by kind",
            ["kind"],
            registry=self.private_registry,
        )
        self.incident_log_dropped = Counter(
            "bastion_incident_log_dropped",
            "Decisions not written to the incident log: its backlog was full (the database "
            "away or slow), the log refused them, or they were still queued at shutdown",
            registry=self.private_registry,
        )
        self.ledger_dropped = Counter(
            "bastion_ledger_dropped",
            "Ledger rows dropped (its backlog full, or a failed write)",
            registry=self.private_registry,
        )
        self.screening_tiers = Counter(
            "bastion_screening_tiers",
            "Screened images by tier verdict (clean, suspicious, adversarial) and action",
            ["model", "version", "verdict", "action"],
            registry=self.private_registry,
        )
        self.screening_target_fpr = Gauge(
            "bastion_screening_target_fpr",
            "Clean rate each tier flags by design (the flagged-rate baseline), by verdict tier",
            [*labels, "tier"],
            registry=self.private_registry,
        )
        self.screening_reviews = Counter(
            "bastion_screening_reviews",
            "Review copies of served suspicious inputs: written, or dropped and why",
            [*labels, "outcome"],
            registry=self.private_registry,
        )
        self.screening_review_backlog = Gauge(
            "bastion_screening_review_backlog",
            "Review copies waiting for the writer thread",
            registry=self.private_registry,
        )
        self._drift_metrics(labels)
        self._front_door_metrics()
        self.models_ready = Gauge(
            "bastion_models_ready", "Model versions loaded and ready", registry=self.registry
        )
        self.upstream_ready = Gauge(
            "bastion_upstream_ready",
            "1 while a remote Triton model's upstream answers and is ready",
            labels,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "bastion_upstream_errors",
            "Failed calls to a remote Triton upstream, by kind (its status, timeout, unreachable)",
            [*labels, "kind"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "bastion_upstream_duration_seconds",
            "One batch's call to a remote Triton upstream",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _drift_metrics(self, labels: list[str]) -> None:
        statistic = [*labels, "statistic"]

        def gauge(name: str, text: str, names: list[str]) -> Gauge:
            return Gauge(name, text, names, registry=self.registry)

        self.drift_score = gauge(
            "bastion_drift_score", "Drift score of the latest window per statistic", statistic
        )
        self.drift_pvalue = gauge(
            "bastion_drift_pvalue", "Permutation p-value of the latest window's MMD", statistic
        )
        self.drift_threshold = gauge(
            "bastion_drift_threshold", "Alarm threshold per drift statistic", statistic
        )
        self.drift_alarm = gauge(
            "bastion_drift_alarm", "1 while any drift statistic is in alarm", labels
        )
        self.drift_window_images = gauge(
            "bastion_drift_window_images", "Images in the latest evaluated window", labels
        )
        self.drift_window_time = gauge(
            "bastion_drift_window_timestamp_seconds",
            "Unix time the latest window was scored (alerts ignore stale windows)",
            labels,
        )
        self.window_mean = gauge(
            "bastion_window_mean", "Mean of a statistic over the latest window", statistic
        )
        self.reference_mean = gauge(
            "bastion_reference_mean", "Mean of a statistic over the reference profile", statistic
        )
        self.class_share = gauge(
            "bastion_class_share",
            "Share of predictions per class, in the latest window and in the reference",
            [*labels, "class", "source"],
        )
        self.drift_events = Counter(
            "bastion_drift_events",
            "Drift alarms raised per statistic",
            statistic,
            registry=self.registry,
        )
        self.predictions = Counter(
            "bastion_predictions",
            "Predicted class of every image the model served (counted per closed hop)",
            [*labels, "class"],
            registry=self.registry,
        )

    def _front_door_metrics(self) -> None:
        self.rejected = Counter(
            "bastion_http_rejected",
            "Requests and connections refused at the front door, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "bastion_http_connections", "Open HTTP connections", registry=self.registry
        )
        self.in_flight = Gauge(
            "bastion_requests_in_flight", "Requests being handled", registry=self.registry
        )
        self.decode_pending = Gauge(
            "bastion_decode_pending",
            "Requests waiting for or in a decode thread",
            registry=self.registry,
        )
        # the store's usage moves with every review copy and every dropped record: private
        self.quarantine_dropped = Counter(
            "bastion_quarantine_dropped",
            "Withheld inputs whose quarantine record was dropped (still withheld), by reason",
            ["reason"],
            registry=self.private_registry,
        )
        self.quarantine_records = Gauge(
            "bastion_quarantine_records",
            "Records in the quarantine store",
            registry=self.private_registry,
        )
        self.quarantine_bytes = Gauge(
            "bastion_quarantine_bytes",
            "Stored input bytes in the quarantine store",
            registry=self.private_registry,
        )
        self.quarantine_over_quota = Gauge(
            "bastion_quarantine_over_quota",
            "1 while the store refuses new records for a global quota (records or bytes)",
            registry=self.private_registry,
        )

    def render(self, stats: Iterable[ModelStats], private: bool = False) -> bytes:
        """The exposition text; ``private`` adds the series only an authenticated scrape sees."""
        body = (render_triton(stats) + render_gpu()).encode() + generate_latest(self.registry)
        return body + generate_latest(self.private_registry) if private else body


class ModelObserver:
    """Feeds one model version's batches into its statistics and histograms."""

    def __init__(self, stats: ModelStats, metrics: Metrics) -> None:
        self.stats = stats
        self._latency = metrics.request_duration.labels(stats.name, stats.version)
        self._queue = metrics.queue_duration.labels(stats.name, stats.version)
        self._batch = metrics.batch_size.labels(stats.name, stats.version)

    def on_batch(self, size: int, requests: int, times: BatchTimes) -> None:
        self.stats.record_batch(size, requests, times)
        self._batch.observe(size)

    def on_dequeue(self, queue_ns: int) -> None:
        self.stats.record_queue(queue_ns)
        self._queue.observe(queue_ns / 1e9)

    def on_expired(self, queue_ns: int) -> None:
        self._queue.observe(queue_ns / 1e9)

    def on_success(self, duration_ns: int) -> None:
        self.stats.record_success(duration_ns)
        self._latency.observe(duration_ns / 1e9)

    def on_failure(self, duration_ns: int, reason: str) -> None:
        self.stats.record_failure(duration_ns, reason)
        self._latency.observe(duration_ns / 1e9)
