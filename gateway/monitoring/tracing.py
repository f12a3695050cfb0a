"""OpenTelemetry traces of requests, exported over OTLP to ``BASTION_OTEL_ENDPOINT``.

Off unless the endpoint is set: then the SDK is not even imported and every hook in the request
path is one ``is None`` check. On:

- each request's server span continues the caller's W3C ``traceparent`` (an HTTP header, or
  gRPC metadata relayed by the front process) with the SDK's W3C propagator, and carries the
  HTTP or RPC semantic conventions' attributes (health and metrics are not traced). It is made
  here rather than by OpenTelemetry's ASGI and gRPC instrumentation: gRPC calls reach the
  gateway through a relay, not a ``grpc`` server the instrumentation could wrap, and the ASGI
  middleware costs about four spans' worth of CPU per request (230 us against 50 us for a span,
  measured here), more than the 5 % budget at a 10 % ratio allows (benchmarks/RESULTS.md 14);
- under it, each inference request gets ``bastion.decode``, ``bastion.queue``,
  ``bastion.batch`` (the model and the screening detectors in one fused pass: the forward's and
  the detectors' times are its attributes), ``bastion.policy`` (the screening verdicts, the
  quarantine and the stateful defence) and ``bastion.encode``; the model, version and batch
  size are attributes. Each ledger transaction is a ``bastion.store`` span linked to the
  requests whose rows it writes.

Work done on another thread or for many requests at once (a decode, a batch) is timed where it
runs and recorded into each request's trace afterwards with its real start and end, so no
context has to cross threads. Spans go out through the SDK's ``BatchSpanProcessor``: a bounded
queue (spans past it are dropped, never waited for) and export off the request path.
"""

from __future__ import annotations

import contextvars
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the SDK is an extra (bastion-gateway[otel]), imported only when tracing
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Link, Span, SpanContext

    from bastion.gateway.batcher import BatchTiming
    from bastion.gateway.settings import Settings

T = TypeVar("T")
NOT_TRACED = ("/v2/health/live", "/v2/health/ready", "/metrics")
MAX_QUEUED_SPANS = 8192  # the export queue's bound; spans past it are dropped
EXPORT_BATCH = 256  # spans per export: at most MAX_ATTRIBUTE_CHARS each attribute
EXPORT_TIMEOUT_S = 5  # one export, retries included; and the shutdown's wait
MAX_ATTRIBUTE_CHARS = 256
PREFIX = "bastion."
# W3C Trace Context §3.2: version 00, a non-zero trace id and parent id, the flags
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_ns: int) -> int:
    """A ``time.perf_counter_ns()`` reading as Unix-epoch nanoseconds (OTLP's clock)."""
    return perf_ns + _EPOCH_OFFSET_NS


class Tracing:
    """The tracer provider and the request path's hooks. ``exporter``: where spans go (default:
    OTLP over ``settings.otel_protocol`` to ``settings.otel_endpoint``); tests pass the SDK's
    in-memory exporter, which is exported to at once."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from bastion.gateway import __version__

        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create(
                {"service.name": settings.otel_service_name, "service.version": __version__}
            ),
            # the ratio is applied before a request's first span (``sampled``): a request left
            # out then costs nothing further, not a non-recording span at every stage
            sampler=ParentBased(ALWAYS_ON),
            # a client chooses the path: its text is clipped, as every attribute is
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS),
        )
        self.ratio = settings.otel_sampling_ratio
        self.max_per_s = settings.otel_max_traces_per_s
        self._second, self._traced = 0, 0  # the current whole second and its traced requests
        self._current_span = trace.get_current_span
        self._propagator = TraceContextTextMapPropagator()
        if exporter is None:
            self.provider.add_span_processor(
                BatchSpanProcessor(
                    otlp_exporter(settings),
                    max_queue_size=MAX_QUEUED_SPANS,
                    # a batch well under a collector's 4 MiB gRPC message limit
                    max_export_batch_size=EXPORT_BATCH,
                    export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
                )
            )
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("bastion.gateway", __version__)

    def sampled(self, traceparent: str | bytes | None) -> bool:
        """Whether to trace a request: as its caller's W3C ``traceparent`` says when it has a
        valid one (the sampled flag), else with probability ``otel_sampling_ratio``; and never
        more than ``otel_max_traces_per_s`` a second (the flag is the caller's to set)."""
        wanted = None
        if traceparent is not None:
            if isinstance(traceparent, bytes):
                traceparent = traceparent.decode("latin-1")
            if _TRACEPARENT.fullmatch(traceparent.strip()):
                wanted = bool(int(traceparent.strip()[-2:], 16) & 1)
        if wanted is None:
            wanted = self.ratio >= 1.0 or random.random() < self.ratio
        return wanted and self._charge()

    def _charge(self) -> bool:
        """Counts one traced request against this second's ``otel_max_traces_per_s``."""
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._traced = second, 0
        self._traced += 1
        return self._traced <= self.max_per_s

    def for_message(self) -> contextvars.Context | None:
        """The context to answer one message of a traced stream in: the stream's own (None:
        inherit it) while the per-second cap allows, else a copy with no current span, so a
        stream of many messages cannot trace past the cap."""
        if not self.active() or self._charge():
            return None
        from opentelemetry import context, trace

        detached = contextvars.copy_context()
        detached.run(context.attach, trace.set_span_in_context(trace.INVALID_SPAN))
        return detached

    def annotate(self, **attributes: Any) -> None:
        """Sets attributes on the current span (the request's server span, from the data
        plane)."""
        self._current_span().set_attributes(attributes)

    def active(self) -> bool:
        """Whether the current request is being traced (its span records)."""
        return self._current_span().is_recording()

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """Tracing when ``otel_endpoint`` is set, else None (and nothing imported)."""
        return cls(settings) if settings.otel_endpoint else None

    @contextmanager
    def server(
        self, name: str, carrier: dict[str, str], attributes: dict[str, Any]
    ) -> Iterator[Span]:
        """A request's server span, continuing the W3C ``traceparent`` in ``carrier`` (its
        headers or metadata, lower-case keys), current while the request is answered."""
        from opentelemetry.trace import SpanKind

        with self.tracer.start_as_current_span(
            name,
            context=self._propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield span

    def http(self, scope: dict[str, Any], route: str | None) -> Any:
        """The server span of one HTTP request (an ASGI ``scope``; ``route``: its route
        template, when known), with the HTTP semantic conventions' attributes; a context
        manager. ``status`` then records the answer's status code."""
        carrier: dict[str, str] = {}
        for key, value in scope["headers"]:
            if key in (b"traceparent", b"tracestate"):
                carrier.setdefault(key.decode(), value.decode("latin-1"))
        method = scope["method"]
        attributes: dict[str, Any] = {
            "http.request.method": method,
            # clipped here: the SDK would clip it too, logging a warning each time
            "url.path": scope["path"][:MAX_ATTRIBUTE_CHARS],
            "url.scheme": scope.get("scheme", "http"),
        }
        if route is not None:
            attributes["http.route"] = route
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
        return self.server(f"{method} {route}" if route else method, carrier, attributes)

    @staticmethod
    def status(span: Span, code: int) -> None:
        """An HTTP answer's status on its server span (5xx: the span's status is an error)."""
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", code)
        if code >= 500:
            span.set_status(Status(StatusCode.ERROR))

    def rpc(self, method: str, metadata: Sequence[tuple[str, str]], peer: str) -> Any:
        """The server span of one relayed gRPC call (``method``: ``/package.Service/Method``),
        with the RPC semantic conventions' attributes; a context manager."""
        carrier: dict[str, str] = {}
        for key, value in metadata:
            carrier.setdefault(key, value)  # the first of a repeated key, as HTTP's would be
        service, _, name = method.strip("/").partition("/")
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "network.peer.address": peer,
        }
        return self.server(method.strip("/"), carrier, attributes)

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child of the current span around work done here (``bastion.`` + ``name``)."""
        with self.tracer.start_as_current_span(PREFIX + name, attributes=attributes) as span:
            yield span

    def record(
        self,
        name: str,
        start_perf_ns: int,
        end_perf_ns: int,
        parent: Span | None = None,
        **attributes: Any,
    ) -> Span:
        """A finished child span (of ``parent``, else of the current span) for work timed
        elsewhere: ``time.perf_counter_ns()`` readings at its start and end."""
        from opentelemetry import trace

        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(
            PREFIX + name,
            context=context,
            start_time=epoch_ns(start_perf_ns),
            attributes=attributes,
        )
        span.end(end_time=epoch_ns(end_perf_ns))
        return span

    def batch(self, timing: BatchTiming, rows: int) -> None:
        """A traced request's wait in the queue and its batch (``rows``: the request's own);
        the batch's phases are its attributes, not spans of their own (each span costs)."""
        self.record("queue", timing.arrival_ns, timing.started_ns)
        times = timing.times
        self.record(
            "batch",
            timing.started_ns,
            timing.ended_ns,
            **{
                "bastion.batch_size": timing.rows,
                "bastion.request_rows": rows,
                "bastion.forward_ns": times.infer_ns,
                "bastion.screening_ns": times.screen_ns,
            },
        )

    def current(self) -> SpanContext | None:
        """The current span's context when it is sampled (what a later link needs), else None."""
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        return context if context.is_valid and context.trace_flags.sampled else None

    def store(self, table: str, rows: int, linked: Sequence[SpanContext]) -> Any:
        """A ``bastion.store`` span for one write of many requests' rows, linked to theirs;
        a context manager. Its own trace: a transaction is no single request's child."""
        from opentelemetry.trace import Link

        links: list[Link] = [Link(context) for context in linked[:128]]
        return self.tracer.start_as_current_span(
            PREFIX + "store",
            context=_root(),
            links=links,
            attributes={"db.collection.name": table, "bastion.rows": rows},
        )

    def shutdown(self, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        """Exports what is queued, then stops; returns within ``timeout_s`` even when the
        collector does not answer (the SDK itself would wait up to 30 s), leaving the rest."""
        closing = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        closing.start()
        closing.join(timeout_s)


def timed(job: Callable[[], T], into: list[int]) -> Callable[[], T]:
    """``job``, appending its start and end (``perf_counter_ns``) to ``into`` on whichever
    thread runs it."""

    def run() -> T:
        into.append(time.perf_counter_ns())
        try:
            return job()
        finally:
            into.append(time.perf_counter_ns())

    return run


def _root() -> Any:
    from opentelemetry.context import Context

    return Context()


def otlp_exporter(settings: Settings) -> SpanExporter:
    """OTLP/HTTP (``/v1/traces`` under the endpoint) or OTLP/gRPC, bounded in time."""
    assert settings.otel_endpoint is not None
    endpoint = settings.otel_endpoint.rstrip("/")
    if settings.otel_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = endpoint.startswith("http://")
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=EXPORT_TIMEOUT_S)
