"""OpenTelemetry traces in process, read from the SDK's in-memory exporter: the spans of one
request, their parent/child links, their attributes, and the caller's traceparent continued."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bastion.gateway.app import create_app
from bastion.gateway.monitoring.tracing import Tracing
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float

INFER = "/v2/models/digits/infer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
REQUEST_SPANS = {"decode", "queue", "batch", "policy", "encode"}


def settings(repository: Path, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        model_repository=repository,
        torch_threads=1,
        quarantine_path=tmp_path / "quarantine.db",
        ledger_path=tmp_path / "ledger.db",
        **extra,
    )


@pytest.fixture
def traced(repository: Path, tmp_path: Path) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    config = settings(repository, tmp_path)
    with TestClient(create_app(config, tracing=Tracing(config, exporter))) as client:
        yield client, exporter


def digit() -> dict:
    image = to_float(load_split("test")[0][:1])
    tensor = {"name": "images", "datatype": "FP32", "shape": list(image.shape)}
    return {"inputs": [{**tensor, "data": image.ravel().tolist()}]}


def by_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def status(span: ReadableSpan) -> object:
    """The HTTP status on a server span, under the stable or the older semantic conventions."""
    attributes = span.attributes or {}
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


def test_a_request_continues_the_callers_trace_with_a_span_for_each_stage(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    response = client.post(INFER, json=digit(), headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200, response.text
    spans = by_trace(exporter, int(TRACE_ID, 16))
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.parent is not None and server.parent.span_id == int(PARENT_ID, 16)
    assert status(server) == 200
    assert server.name == "POST /v2/models/{model}/infer"
    assert server.attributes["bastion.model"] == "digits"
    assert server.attributes["bastion.model_version"] == "1"
    named = {s.name.removeprefix("bastion."): s for s in spans if s.name.startswith("bastion.")}
    assert set(named) == REQUEST_SPANS
    for name in REQUEST_SPANS:
        assert named[name].parent.span_id == server.context.span_id, name
    batch = named["batch"].attributes
    assert batch["bastion.batch_size"] >= 1 and batch["bastion.request_rows"] == 1
    assert 0 < batch["bastion.screening_ns"] < batch["bastion.forward_ns"]
    assert named["policy"].attributes["bastion.screening.verdicts"] == "clean"
    # in order, within the server span: decode, then the queue, the batch, policy, encode
    order = [named[n] for n in ("decode", "queue", "batch", "policy", "encode")]
    assert all(a.end_time <= b.start_time + 1_000 for a, b in itertools.pairwise(order))
    assert server.start_time <= order[0].start_time and order[-1].end_time <= server.end_time
    assert not any("score" in key or "threshold" in key for s in spans for key in s.attributes)


def test_the_ledger_write_is_a_store_span_linked_to_the_requests_it_records(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    for _ in range(3):
        assert client.post(INFER, json=digit()).status_code == 200
    client.app.state.dataplane.ledger.flush()  # type: ignore[attr-defined]
    traces = {
        s.context.trace_id for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER
    }
    stores = [s for s in exporter.get_finished_spans() if s.name == "bastion.store"]
    assert stores and all(s.parent is None for s in stores)  # a root of its own
    assert all(s.context.trace_id not in traces for s in stores)
    linked = {link.context.trace_id for s in stores for link in s.links}
    assert linked == traces and len(traces) == 3  # each request's trace, once
    assert sum(s.attributes["bastion.rows"] for s in stores) == 3


def test_health_and_metrics_are_not_traced_and_an_unsampled_caller_is_followed(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert exporter.get_finished_spans() == ()
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the caller chose not to record this trace
    assert client.post(INFER, json=digit(), headers={"traceparent": unsampled}).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_a_refused_request_is_traced_with_its_status(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    response = client.post(INFER, content=b"{not json", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 400
    (server,) = [s for s in by_trace(exporter, int(TRACE_ID, 16)) if s.kind == SpanKind.SERVER]
    assert status(server) == 400


def test_without_an_endpoint_no_part_of_the_sdk_is_loaded(repository: Path, tmp_path: Path) -> None:
    """No endpoint, no tracing: neither the SDK, the instrumentation nor an exporter is
    imported, and the app is the plain gateway (the API alone may be: other libraries use it)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bastion.gateway.app import create_app\n"
        "from bastion.gateway.asgi import TracedGateway\n"
        "from bastion.gateway.settings import Settings\n"
        f"app = create_app(Settings(model_repository=Path({str(repository)!r})))\n"
        "assert not isinstance(app, TracedGateway) and app.state.tracing is None\n"
        "sdk = ('opentelemetry.sdk', 'opentelemetry.instrumentation', 'opentelemetry.exporter')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(sdk))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_request_left_out_by_the_ratio_gets_no_span_but_a_sampled_caller_is_followed(
    repository: Path, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    config = settings(repository, tmp_path, otel_sampling_ratio=0.0)
    with TestClient(create_app(config, tracing=Tracing(config, exporter))) as client:
        assert client.post(INFER, json=digit()).status_code == 200
        malformed = {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"}  # an all-zero parent id
        assert client.post(INFER, json=digit(), headers=malformed).status_code == 200
        assert exporter.get_finished_spans() == ()
        sampled = {"traceparent": TRACEPARENT}
        assert client.post(INFER, json=digit(), headers=sampled).status_code == 200
        names = {s.name for s in exporter.get_finished_spans()}
        assert {f"bastion.{n}" for n in REQUEST_SPANS} <= names


def test_callers_cannot_force_more_traces_a_second_than_the_cap(
    repository: Path, tmp_path: Path
) -> None:
    config = settings(repository, tmp_path, otel_sampling_ratio=0.0, otel_max_traces_per_s=5)
    tracing = Tracing(config, InMemorySpanExporter())
    forced = [tracing.sampled(TRACEPARENT) for _ in range(50)]  # within one second, or two
    assert 5 <= sum(forced) <= 10
    assert not tracing.sampled(None)  # ratio 0: nothing of its own


def test_each_message_of_a_traced_stream_counts_against_the_cap(
    repository: Path, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    config = settings(repository, tmp_path, otel_max_traces_per_s=3)
    tracing = Tracing(config, exporter)
    assert tracing.sampled(TRACEPARENT)  # the stream's own span: one of the 3
    with tracing.server("stream", {"traceparent": TRACEPARENT}, {}) as stream:
        messages = [tracing.for_message() for _ in range(4)]
        for context, span in messages[:2]:  # within the cap: a span of the message's own
            assert span is not None and context is not None and context.run(tracing.active)
            context.run(tracing.record, "decode", 1, 2)
            tracing.finish(span)
        for context, span in messages[2:]:  # past it: no current span, so nothing is traced
            assert span is None and context is not None and not context.run(tracing.active)
        assert tracing.active()  # the stream's own context is untouched
    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == ["bastion.decode"] * 2 + ["bastion.message"] * 2 + ["stream"]
    ids = {s.context.span_id for s in spans if s.name == "bastion.message"}
    assert {s.parent.span_id for s in spans if s.name == "bastion.message"} == {
        stream.span_id
    }
    assert {s.parent.span_id for s in spans if s.name == "bastion.decode"} == ids


def test_a_long_client_chosen_path_is_clipped_in_its_span(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    path = "/v2/models/" + "x" * 5000 + "/ready"
    assert client.get(path, headers={"traceparent": TRACEPARENT}).status_code == 404
    (server,) = exporter.get_finished_spans()
    assert len(server.attributes["url.path"]) == 256


def test_a_long_streams_trace_keeps_a_bounded_number_of_spans(
    repository: Path, tmp_path: Path
) -> None:
    """A gRPC stream is one trace; its messages' spans must not pile up until it ends."""
    from bastion.gateway.monitoring.tracing import MAX_SPANS_PER_TRACE

    exporter = InMemorySpanExporter()
    tracing = Tracing(settings(repository, tmp_path), exporter)
    with tracing.server("stream", {"traceparent": TRACEPARENT}, {}):
        for _ in range(3 * MAX_SPANS_PER_TRACE):
            tracing.record("decode", 1, 2)
        with tracing.span("encode") as span:  # still made, so callers need not check
            assert span is not None
    spans = exporter.get_finished_spans()
    assert len(spans) == MAX_SPANS_PER_TRACE
    assert sum(s.kind == SpanKind.SERVER for s in spans) == 1
