"""The exporter process: traces from the gateway's pipe, built into OpenTelemetry SDK spans and
exported over OTLP with the SDK's ``BatchSpanProcessor`` and OTLP exporters.

The gateway records spans as plain data (``tracing.Recorded``) and writes each finished trace
here, length-prefixed JSON on standard input, so the SDK's span objects, the protobuf encoding
and the export never hold the serving process's GIL. End of input (the gateway stopping, or
dying) flushes what is queued, bounded by the export timeout, and exits. SIGINT is ignored: a
Ctrl-C reaches the whole process group, and the gateway closes the pipe when it has finished.
It runs at a lower priority (nice 10) than the gateway: on a saturated machine the export waits,
and past its bounded queue spans are dropped, rather than requests slowed.

Run by the gateway: ``python -m bastion.gateway.monitoring.trace_export CONFIG_JSON``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

MAX_QUEUED_SPANS = 8192  # the export queue's bound; spans past it are dropped
EXPORT_BATCH = 256  # spans per export, well under a collector's 4 MiB gRPC message limit
EXPORT_TIMEOUT_S = 5  # one export, retries included; and the final flush
MAX_FRAME_BYTES = 16 << 20
NICENESS = 10  # below the gateway: on a busy machine, traces wait (or drop), requests do not
_FRAME = struct.Struct(">I")


class Builder:
    """Turns one recorded span (``Recorded.as_list``) into the SDK's ``ReadableSpan``, with the
    service's resource and Bastion's instrumentation scope."""

    def __init__(self, service_name: str, service_version: str | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from bastion.gateway import __version__

        version = service_version or __version__
        self.resource = Resource.create({"service.name": service_name, "service.version": version})
        self.scope = InstrumentationScope("bastion.gateway", version)

    def __call__(self, record: list[Any]) -> ReadableSpan:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
        from opentelemetry.trace.span import TraceFlags, TraceState

        trace, span, parent, remote, name, kind, start, end, attributes, error, links, state = (
            record
        )
        sampled = TraceFlags(TraceFlags.SAMPLED)
        trace_id = int(trace, 16)
        try:
            trace_state = TraceState.from_header([state]) if state else None
        except ValueError:
            trace_state = None
        context = SpanContext(trace_id, int(span, 16), False, sampled, trace_state)
        parent_context = (
            SpanContext(trace_id, int(parent, 16), bool(remote), sampled) if parent else None
        )
        return ReadableSpan(
            name=name,
            context=context,
            parent=parent_context,
            resource=self.resource,
            attributes=attributes,
            links=[Link(SpanContext(int(t, 16), int(s, 16), True, sampled)) for t, s in links],
            kind=SpanKind(kind),
            status=Status(StatusCode.ERROR if error else StatusCode.UNSET),
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )


def otlp_exporter(endpoint: str, protocol: str) -> SpanExporter:
    """OTLP/HTTP (``/v1/traces`` under the endpoint) or OTLP/gRPC, bounded in time."""
    endpoint = endpoint.rstrip("/")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = endpoint.startswith("http://")
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=EXPORT_TIMEOUT_S)


def frames(stream: IO[bytes]) -> Iterator[list[list[Any]]]:
    """Each trace written to ``stream`` until its end (a torn or oversized frame ends it too)."""
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        (size,) = _FRAME.unpack(head)
        body = stream.read(size)  # an oversized trace is read past, not kept
        if len(body) < size:
            return
        if size <= MAX_FRAME_BYTES:
            yield orjson.loads(body)


def main(argv: list[str]) -> int:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # export is background work: serving comes first
        os.nice(NICENESS)
    config = orjson.loads(argv[0])
    build = Builder(config["service_name"], config.get("service_version"))
    processor = BatchSpanProcessor(
        otlp_exporter(config["endpoint"], config["protocol"]),
        max_queue_size=MAX_QUEUED_SPANS,
        max_export_batch_size=EXPORT_BATCH,
        export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
    )
    for trace in frames(sys.stdin.buffer):
        for record in trace:
            try:
                processor.on_end(build(record))
            except Exception:  # one malformed span is lost, not the exporter
                continue
    # the SDK's shutdown waits up to 30 s for a collector that does not answer: bounded here
    closing = threading.Thread(target=processor.shutdown, daemon=True)
    closing.start()
    closing.join(EXPORT_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
