"""A real gateway exports its traces over OTLP (HTTP and gRPC) to a receiver in this test, which
decodes OpenTelemetry's own protobuf messages (no collector is packaged for this machine): the
traceparent of an HTTP header and of gRPC metadata is continued, and each request's stages are
its server span's children."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as tg
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bastion.models.data import load_split, to_float
from tests.conftest import ServerProcess, free_port, start_server

HTTP_TRACE = "0af7651916cd43dd8448eb211c80319c"
GRPC_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STAGES = {"bastion.decode", "bastion.queue", "bastion.batch", "bastion.encode"}


class Received:
    """Spans decoded from every export, with the resource's service name."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.services.add(attribute.value.string_value)
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)

    def trace(self, trace_id: str, wanted: set[str], timeout_s: float = 30.0) -> list[Span]:
        """The spans of one trace once every name in ``wanted`` has arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                spans = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if wanted <= {s.name for s in spans}:
                return spans
            time.sleep(0.1)
        raise AssertionError(f"trace {trace_id}: got {sorted(s.name for s in spans)}")


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = self.path == "/v1/traces" and self.headers["Content-Type"] == (
                "application/x-protobuf"
            )
            if ok:
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                received.add(request)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"http://127.0.0.1:{port}", received
    server.stop(0)


def traced_gateway(tmp_path: Path, endpoint: str, protocol: str) -> ServerProcess:
    return start_server(
        tmp_path,
        env={
            "BASTION_OTEL_ENDPOINT": endpoint,
            "BASTION_OTEL_PROTOCOL": protocol,
            "BASTION_OTEL_SERVICE_NAME": "bastion-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # the SDK's export interval, in ms
        },
    )


def infer_both_ways(server: ServerProcess) -> None:
    image = to_float(load_split("test")[0][:1])
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": [1, 1, 28, 28],
                "data": image.ravel().tolist(),
            }
        ]
    }
    headers = {"traceparent": f"00-{HTTP_TRACE}-{PARENT}-01"}
    response = httpx.post(
        f"http://{server.url}/v2/models/digits/infer", json=body, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        tensor = tg.InferInput("images", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(image)
        client.infer("digits", [tensor], headers={"traceparent": f"00-{GRPC_TRACE}-{PARENT}-01"})
    finally:
        client.close()


def check_trace(received: Received, trace_id: str, server_name: str) -> None:
    spans = received.trace(trace_id, STAGES | {server_name})
    (server,) = [s for s in spans if s.name == server_name]
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == PARENT
    for span in spans:
        if span.name in STAGES:
            assert span.parent_span_id == server.span_id, span.name
            assert span.start_time_unix_nano >= server.start_time_unix_nano, span.name
            assert span.end_time_unix_nano <= server.end_time_unix_nano, span.name


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_traces_reach_an_otlp_receiver_continuing_http_and_grpc_callers(
    tmp_path: Path,
    protocol: str,
    http_receiver: tuple[str, Received],
    grpc_receiver: tuple[str, Received],
) -> None:
    endpoint, received = http_receiver if protocol == "http/protobuf" else grpc_receiver
    server = traced_gateway(tmp_path, endpoint, protocol)
    try:
        infer_both_ways(server)
        check_trace(received, HTTP_TRACE, "POST /v2/models/{model}/infer")
        check_trace(received, GRPC_TRACE, "inference.GRPCInferenceService/ModelInfer")
        assert received.services == {"bastion-under-test"}
    finally:
        server.stop()


def exporters_of(pid: int) -> list[int]:
    """The gateway's trace exporter processes (its children running ``trace_export``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"trace_export" in command:
            found.append(int(entry.name))
    return found


def test_traces_still_queued_when_the_gateway_stops_are_flushed_and_the_exporter_goes_with_it(
    tmp_path: Path, http_receiver: tuple[str, Received]
) -> None:
    endpoint, received = http_receiver
    server = start_server(
        tmp_path,
        env={
            "BASTION_OTEL_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing is exported until the flush at stop
        },
    )
    try:
        (exporter,) = exporters_of(server.process.pid)
        infer_both_ways(server)
        time.sleep(1)
        assert received.spans == []
    finally:
        server.stop()
    check_trace(received, HTTP_TRACE, "POST /v2/models/{model}/infer")
    assert not Path(f"/proc/{exporter}").exists()


def test_a_gateway_whose_collector_is_away_serves_and_stops_in_bounded_time(
    tmp_path: Path,
) -> None:
    server = start_server(
        tmp_path, env={"BASTION_OTEL_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    try:
        (exporter,) = exporters_of(server.process.pid)
        infer_both_ways(server)
    finally:
        started = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 15
    assert not Path(f"/proc/{exporter}").exists()
