"""OpenTelemetry traces of requests, exported over OTLP to ``BASTION_OTEL_ENDPOINT``.

Off unless the endpoint is set: then every hook in the request path is one ``is None`` check.
On:

- each request's server span continues the caller's W3C ``traceparent`` (an HTTP header, or
  gRPC metadata relayed by the front process) and carries the HTTP or RPC semantic conventions'
  attributes (health and metrics are not traced);
- under it, each inference request gets ``bastion.decode``, ``bastion.queue``,
  ``bastion.batch`` (the model and the screening detectors in one fused pass: the forward's and
  the detectors' times are its attributes), ``bastion.policy`` (the screening verdicts, the
  quarantine and the stateful defence), ``bastion.upstream`` (a remote Triton model's call)
  and ``bastion.encode``; the model, version and batch size are attributes. Each ledger
  transaction is a ``bastion.store`` span linked to the requests whose rows it writes.

**Where the SDK runs.** The request path records each span as plain data (``Recorded``: ids,
name, times, attributes), about 15 us for a request's six; the OpenTelemetry SDK builds them
into its spans and exports them over OTLP in a child process (``trace_export``), fed through a
pipe. Measured here, the SDK's own spans cost 290 us a request to make and as much again to
encode, on the gateway's GIL (benchmarks/RESULTS.md 14): more than the 5 % budget at a 10 %
ratio allows. OpenTelemetry's ASGI and gRPC instrumentation do not fit either: the ASGI
middleware alone cost 230 us a request, and gRPC calls reach the gateway through a relay, not
a ``grpc`` server the instrumentation could wrap.

Work done on another thread or for many requests at once (a decode, a batch) is timed where it
runs and recorded into each request's trace afterwards with its real start and end, so no
context has to cross threads. A finished trace is queued (bounded: past it, traces are dropped,
never waited for), and one thread writes what has gathered to the exporter in one go.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import random
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

if TYPE_CHECKING:  # the SDK is an extra (bastion-gateway[otel]), imported only to export
    from opentelemetry.sdk.trace.export import SpanExporter

    from bastion.gateway.batcher import BatchTiming
    from bastion.gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_TRACED = ("/v2/health/live", "/v2/health/ready", "/metrics")
MAX_QUEUED_TRACES = 4096  # the export queue's bound; traces past it are dropped
MAX_ATTRIBUTE_CHARS = 256
MAX_LINKS = 128
MAX_NAME_CHARS = 128
MAX_SPANS_PER_TRACE = 512  # a gRPC stream is one trace: its messages' spans past this are lost
MAX_TRACESTATE_CHARS = 512  # W3C Trace Context §3.3.1.5: at most 32 members
EXPORT_TIMEOUT_S = 5  # one export, retries included; and the shutdown's wait
GATHER_S = 0.05  # the writer's wait for more traces before one write
PREFIX = "bastion."
SERVER, INTERNAL = 1, 0  # OpenTelemetry's SpanKind values
# W3C Trace Context §3.2: version 00, a non-zero trace id and parent id, the flags
_TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})")
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()
_FRAME = struct.Struct(">I")  # each trace's length, before its JSON


def epoch_ns(perf_ns: int) -> int:
    """A ``time.perf_counter_ns()`` reading as Unix-epoch nanoseconds (OTLP's clock)."""
    return perf_ns + _EPOCH_OFFSET_NS


def _id(bits: int) -> int:
    return random.getrandbits(bits) or 1  # an all-zero id is invalid


def _clip(value: Any) -> Any:
    return value[:MAX_ATTRIBUTE_CHARS] if isinstance(value, str) else value


@dataclass(slots=True, eq=False)
class Recorded:
    """One span as the request path records it. ``spans``: every span of its request, shared
    by them all (the server span's trace, exported when the server span ends)."""

    trace_id: int  # 128 bits
    span_id: int  # 64 bits
    parent_id: int  # 0: a root
    remote_parent: bool  # the parent is the caller's (a traceparent)
    name: str
    kind: int
    start_ns: int  # Unix epoch
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: bool = False
    links: list[tuple[int, int]] = field(default_factory=list)  # (trace id, span id)
    tracestate: str = ""
    spans: list[Recorded] = field(default_factory=list)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = _clip(value)

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        for key, value in attributes.items():
            self.attributes[key] = _clip(value)

    def child(self, name: str, start_ns: int, attributes: dict[str, Any]) -> Recorded:
        """A span under this one, part of its trace; past ``MAX_SPANS_PER_TRACE`` (a long
        stream's many messages) it is made but not kept, so a trace's memory is bounded."""
        span = Recorded(
            self.trace_id,
            _id(64),
            self.span_id,
            False,
            name,
            INTERNAL,
            start_ns,
            attributes={k: _clip(v) for k, v in attributes.items()},
            spans=self.spans,
        )
        if len(self.spans) < MAX_SPANS_PER_TRACE:
            self.spans.append(span)
        return span

    def as_list(self) -> list[Any]:
        """The exporter's form (``trace_export.readable`` reads it): ids as hex strings."""
        return [
            f"{self.trace_id:032x}",
            f"{self.span_id:016x}",
            f"{self.parent_id:016x}" if self.parent_id else "",
            self.remote_parent,
            self.name,
            self.kind,
            self.start_ns,
            self.end_ns,
            self.attributes,
            self.error,
            [[f"{t:032x}", f"{s:016x}"] for t, s in self.links],
            self.tracestate,
        ]


_CURRENT: contextvars.ContextVar[Recorded | None] = contextvars.ContextVar(
    "bastion_span", default=None
)


class Tracing:
    """Sampling, the request path's hooks, and the queue to the exporter. ``exporter``: an
    SDK ``SpanExporter`` that gets each finished trace at once, in this process (the tests'
    in-memory exporter); by default spans go over OTLP (``settings.otel_protocol``, to
    ``settings.otel_endpoint``) from the exporter process."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        self.ratio = settings.otel_sampling_ratio
        self.max_per_s = settings.otel_max_traces_per_s
        self._second, self._traced = 0, 0  # the current whole second and its traced requests
        self.dropped = 0  # traces the full queue (or a dead exporter) turned away
        if exporter is None:
            self._sink: _Sink = _ExporterProcess(settings)
        else:
            self._sink = _InProcess(settings, exporter)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """Tracing when ``otel_endpoint`` is set, else None. Raises ``RuntimeError`` when the
        exporter process could not run: the ``otel`` extra is not installed."""
        if not settings.otel_endpoint:
            return None
        import importlib.util

        wanted = "grpc" if settings.otel_protocol == "grpc" else "http"
        for module in ("opentelemetry.sdk", f"opentelemetry.exporter.otlp.proto.{wanted}"):
            if importlib.util.find_spec(module) is None:
                raise RuntimeError(
                    "BASTION_OTEL_ENDPOINT is set but OpenTelemetry's SDK and OTLP exporter "
                    "are not installed: pip install 'bastion-gateway[otel]'"
                )
        return cls(settings)

    def sampled(self, traceparent: str | bytes | None) -> bool:
        """Whether to trace a request: as its caller's W3C ``traceparent`` says when it has a
        valid one (the sampled flag), else with probability ``otel_sampling_ratio``; and never
        more than ``otel_max_traces_per_s`` a second (the flag is the caller's to set)."""
        wanted = None
        if traceparent is not None:
            if isinstance(traceparent, bytes):
                traceparent = traceparent.decode("latin-1")
            match = _TRACEPARENT.fullmatch(traceparent.strip())
            if match is not None:
                wanted = bool(int(match.group(3), 16) & 1)
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

    def for_message(self) -> tuple[contextvars.Context | None, Recorded | None]:
        """The context to answer one message of a stream in, and the message's span. A traced
        stream's message, while the per-second cap allows, gets a ``bastion.message`` span of
        its own under the stream's, with a trace list of its own that ``finish`` exports when
        the message is answered (a long stream is not one ever-growing trace); past the cap,
        a context with no current span. (None, None) when the stream is not traced."""
        stream = _CURRENT.get()
        if stream is None:
            return None, None
        context = contextvars.copy_context()
        if not self._charge():
            context.run(_CURRENT.set, None)
            return context, None
        span = Recorded(
            stream.trace_id,
            _id(64),
            stream.span_id,
            False,
            PREFIX + "message",
            INTERNAL,
            epoch_ns(time.perf_counter_ns()),
        )
        span.spans.append(span)
        context.run(_CURRENT.set, span)
        return context, span

    def finish(self, span: Recorded) -> None:
        """Ends a stream message's span (``for_message``) and exports its trace."""
        span.end_ns = epoch_ns(time.perf_counter_ns())
        self._emit(span.spans)

    @staticmethod
    def active() -> bool:
        """Whether the current request is being traced."""
        return _CURRENT.get() is not None

    @staticmethod
    def annotate(**attributes: Any) -> None:
        """Sets attributes on the current span (the request's server span, from the data
        plane)."""
        span = _CURRENT.get()
        if span is not None:
            span.set_attributes(attributes)

    @contextmanager
    def server(
        self, name: str, carrier: dict[str, str], attributes: dict[str, Any]
    ) -> Iterator[Recorded]:
        """A request's server span, continuing the W3C ``traceparent`` in ``carrier`` (its
        headers or metadata, lower-case keys), current while the request is answered; its
        trace goes to the exporter when it ends."""
        match = _TRACEPARENT.fullmatch((carrier.get("traceparent") or "").strip())
        if match is not None:
            trace_id, parent_id = int(match.group(1), 16), int(match.group(2), 16)
            state = carrier.get("tracestate") or ""
            if len(state) > MAX_TRACESTATE_CHARS:  # whole members only (§3.3.1.5)
                state = state[: state.rfind(",", 0, MAX_TRACESTATE_CHARS) + 1].rstrip(",")
        else:
            trace_id, parent_id, state = _id(128), 0, ""
        span = Recorded(
            trace_id,
            _id(64),
            parent_id,
            parent_id != 0,
            name[:MAX_NAME_CHARS],  # a caller chooses the method: bounded
            SERVER,
            epoch_ns(time.perf_counter_ns()),
            attributes={k: _clip(v) for k, v in attributes.items()},
            tracestate=state,
        )
        span.spans.append(span)
        token = _CURRENT.set(span)
        try:
            yield span
        finally:
            _CURRENT.reset(token)
            span.end_ns = epoch_ns(time.perf_counter_ns())
            self._emit(span.spans)

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
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        if route is not None:
            attributes["http.route"] = route
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
        return self.server(f"{method} {route}" if route else method, carrier, attributes)

    @staticmethod
    def status(span: Recorded, code: int) -> None:
        """An HTTP answer's status on its server span (5xx: the span's status is an error)."""
        span.attributes["http.response.status_code"] = code
        if code >= 500:
            span.error = True

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
    def span(self, name: str, **attributes: Any) -> Iterator[Recorded | None]:
        """A child of the current span around work done here (``bastion.`` + ``name``);
        yields None when no request is traced."""
        parent = _CURRENT.get()
        if parent is None:
            yield None
            return
        span = parent.child(PREFIX + name, epoch_ns(time.perf_counter_ns()), attributes)
        token = _CURRENT.set(span)
        try:
            yield span
        finally:
            _CURRENT.reset(token)
            span.end_ns = epoch_ns(time.perf_counter_ns())

    @staticmethod
    def record(
        name: str,
        start_perf_ns: int,
        end_perf_ns: int,
        parent: Recorded | None = None,
        **attributes: Any,
    ) -> Recorded | None:
        """A finished child span (of ``parent``, else of the current span) for work timed
        elsewhere: ``time.perf_counter_ns()`` readings at its start and end."""
        parent = parent or _CURRENT.get()
        if parent is None:
            return None
        span = parent.child(PREFIX + name, epoch_ns(start_perf_ns), attributes)
        span.end_ns = epoch_ns(end_perf_ns)
        return span

    def batch(self, timing: BatchTiming, rows: int) -> None:
        """A traced request's wait in the queue and its batch (``rows``: the request's own);
        the batch's phases are its attributes, not spans of their own."""
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

    @staticmethod
    def current() -> tuple[int, int] | None:
        """The current span's (trace id, span id), what a later link needs; None untraced."""
        span = _CURRENT.get()
        return None if span is None else (span.trace_id, span.span_id)

    @contextmanager
    def store(self, table: str, rows: int, linked: Sequence[tuple[int, int]]) -> Iterator[None]:
        """A ``bastion.store`` span for one write of many requests' rows, linked to theirs.
        Its own trace: a transaction is no single request's child."""
        span = Recorded(
            _id(128),
            _id(64),
            0,
            False,
            PREFIX + "store",
            INTERNAL,
            epoch_ns(time.perf_counter_ns()),
            attributes={"db.collection.name": table, "bastion.rows": rows},
            links=list(linked[:MAX_LINKS]),
        )
        try:
            yield
        finally:
            span.end_ns = epoch_ns(time.perf_counter_ns())
            self._emit([span])

    def _emit(self, spans: list[Recorded]) -> None:
        if not self._sink.put(spans):
            self.dropped += 1

    def shutdown(self, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        """Exports what is queued, then stops; returns within about ``timeout_s`` even when
        the collector does not answer (the SDK itself would wait up to 30 s), leaving the
        rest."""
        self._sink.close(timeout_s)


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


def encode(traces: Sequence[list[Recorded]]) -> bytes:
    """Traces as the exporter process reads them: each a length-prefixed JSON list."""
    out = []
    for spans in traces:
        body = orjson.dumps([span.as_list() for span in spans])
        out += (_FRAME.pack(len(body)), body)
    return b"".join(out)


class _Sink:
    def put(self, spans: list[Recorded]) -> bool: ...

    def close(self, timeout_s: float) -> None: ...


class _InProcess(_Sink):
    """Each trace built into SDK spans and exported at once, here (for tests)."""

    def __init__(self, settings: Settings, exporter: SpanExporter) -> None:
        from bastion.gateway.monitoring.trace_export import Builder

        self._build = Builder(settings.otel_service_name)
        self._exporter = exporter

    def put(self, spans: list[Recorded]) -> bool:
        self._exporter.export([self._build(span.as_list()) for span in spans])
        return True

    def close(self, timeout_s: float) -> None:
        self._exporter.shutdown()


class _ExporterProcess(_Sink):
    """The exporter process (``trace_export``) and the thread that writes traces to its pipe."""

    def __init__(self, settings: Settings) -> None:
        assert settings.otel_endpoint is not None
        from bastion.gateway import __version__

        config = {
            "endpoint": settings.otel_endpoint,
            "protocol": settings.otel_protocol,
            "service_name": settings.otel_service_name,
            "service_version": __version__,
        }
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bastion.gateway.monitoring.trace_export", orjson.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        self._queue: queue.Queue[list[Recorded] | None] = queue.Queue(MAX_QUEUED_TRACES)
        self._broken = False
        self._writer = threading.Thread(target=self._run, name="otel-writer", daemon=True)
        self._writer.start()

    def put(self, spans: list[Recorded]) -> bool:
        if self._broken:
            return False
        try:
            self._queue.put_nowait(spans)
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        while True:
            first = self._queue.get()
            if first is not None:
                time.sleep(GATHER_S)  # one write for many traces, not a wake-up per request
            traces = [first]
            while len(traces) < MAX_QUEUED_TRACES:
                try:
                    traces.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in traces
            try:
                data = encode([t for t in traces if t is not None])
            except Exception:  # never the writer's death: these traces are lost, not the rest
                log.exception("traces not encoded; dropped")
                data = b""
            try:
                stdin.write(data)
                stdin.flush()
            except (OSError, ValueError):  # the exporter died: tracing stops, serving does not
                if not self._broken:
                    log.error("the trace exporter process exited; traces are dropped")
                self._broken = True
            if done:
                return

    def close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with suppress(queue.Full):
            self._queue.put(None, timeout=max(0.1, timeout_s / 2))
        self._writer.join(max(0.1, deadline - time.monotonic()))
        if self._writer.is_alive():  # stuck writing to a stalled exporter: closing would wait
            self._process.kill()
        if self._process.stdin is not None:
            with suppress(OSError):
                self._process.stdin.close()  # end of input: the exporter flushes and exits
        try:
            self._process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # a collector that does not answer: the rest is lost
            self._process.kill()
            self._process.wait(5)
