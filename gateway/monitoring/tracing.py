"""OpenTelemetry traces of requests, exported over OTLP to ``BASTION_OTEL_ENDPOINT``.

Off unless the endpoint is set: then the SDK is not even imported and every hook in the request
path is one ``is None`` check. On:

- an HTTP request's server span comes from OpenTelemetry's ASGI instrumentation, which
  continues the caller's W3C ``traceparent`` (health and metrics scrapes are not traced);
- a gRPC call reaches the gateway through the front process's relay, not through a ``grpc``
  server the gRPC instrumentation could wrap, so its server span is made here, from the relayed
  metadata with the same W3C propagator and the RPC semantic conventions' attributes;
- under the server span, each inference request gets ``bastion.decode``, ``bastion.queue``,
  ``bastion.batch`` (its child ``bastion.forward`` is the model and the screening detectors in
  one fused pass), ``bastion.screening`` (verdicts, quarantine), ``bastion.defence`` and
  ``bastion.encode``, with the model, version, batch size, verdicts and actions as attributes;
  each ledger transaction is a ``bastion.store`` span linked to the requests whose rows it
  writes.

Work done on another thread or for many requests at once (a decode, a batch) is timed where it
runs and recorded into each request's trace afterwards with its real start and end, so no
context has to cross threads. Spans go out through the SDK's ``BatchSpanProcessor``: a bounded
queue (spans past it are dropped, never waited for) and export off the request path.
"""

from __future__ import annotations

import random
import re
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
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        from bastion.gateway import __version__

        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create(
                {"service.name": settings.otel_service_name, "service.version": __version__}
            ),
            # the ratio is applied before a request's first span (``sampled``): a request left
            # out then costs nothing further, not a non-recording span at every stage
            sampler=ParentBased(ALWAYS_ON),
        )
        self.ratio = settings.otel_sampling_ratio
        self.max_per_s = settings.otel_max_traces_per_s
        self._second, self._traced = 0, 0  # the current whole second and its traced requests
        self._current_span = trace.get_current_span
        if exporter is None:
            self.provider.add_span_processor(
                BatchSpanProcessor(otlp_exporter(settings), max_queue_size=MAX_QUEUED_SPANS)
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
        if not wanted:
            return False
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._traced = second, 0
        self._traced += 1
        return self._traced <= self.max_per_s

    def active(self) -> bool:
        """Whether the current request is being traced (its span records)."""
        return self._current_span().is_recording()

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """Tracing when ``otel_endpoint`` is set, else None (and nothing imported)."""
        return cls(settings) if settings.otel_endpoint else None

    def asgi(self, app: Any) -> Any:
        """``app`` behind OpenTelemetry's ASGI middleware: a server span per HTTP request."""
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(
            app,
            excluded_urls=",".join(NOT_TRACED),
            tracer_provider=self.provider,
            exclude_spans=["receive", "send"],  # one span per request, not one per ASGI event
        )

    @contextmanager
    def rpc(self, method: str, metadata: Sequence[tuple[str, str]], peer: str) -> Iterator[Span]:
        """The server span of one relayed gRPC call (``method``: ``/package.Service/Method``),
        continuing the ``traceparent`` in its metadata, current for the call's handler."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

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
        with self.tracer.start_as_current_span(
            method.strip("/"),
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield span

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

    def batch(self, timing: BatchTiming, rows: int, attributes: dict[str, Any]) -> None:
        """A traced request's wait in the queue and its batch, with the fused forward (the
        model and the screening detectors) inside it; ``rows``: the request's own."""
        self.record("queue", timing.arrival_ns, timing.started_ns, **attributes)
        batch = self.record(
            "batch",
            timing.started_ns,
            timing.ended_ns,
            **attributes,
            **{"bastion.batch_size": timing.rows, "bastion.request_rows": rows},
        )
        begins = timing.started_ns + timing.times.input_ns
        self.record(
            "forward",
            begins,
            begins + timing.times.infer_ns,
            batch,
            **attributes,
            **{"bastion.screening_ns": timing.times.screen_ns},
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

    def shutdown(self) -> None:
        """Exports what is queued (a few seconds at most), then stops."""
        self.provider.shutdown()


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
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=10)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=10)
