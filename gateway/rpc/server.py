"""The ``grpc.aio`` server beside HTTP, on the same event loop and over the same data plane.

Bounds a public endpoint needs, each a setting: the largest message (``max_body_bytes``, after
decompression; then each model's own limit, as over HTTP), open connections
(``http_max_connections``), metadata (``http_max_header_bytes``), HTTP/2 streams per
connection, idle connections closed, keepalive pings from a client at most every 10 s (more is a
ping flood: the connection is closed, as gRPC's ping strikes do), and, per call
(``gateway.rpc.calls``): calls open at once, the time a request may take to arrive and a reply
to be taken, a stream's requests in flight. The standard health service
(``grpc.health.v1.Health``) reports SERVING while the server is ready, for the whole server ("")
and for the inference service; its ``Check`` answers while the call limit is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from bastion.gateway.errors import InvalidInput, PayloadTooLarge
from bastion.gateway.rpc.calls import CallGate
from bastion.gateway.rpc.service import SERVICE, InferenceService
from bastion.gateway.settings import Settings

log = logging.getLogger(__name__)
_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}
_HEALTH_POLL_S = 1.0
_HEALTH_BYTES = 1024  # a HealthCheckRequest is a service name


class GrpcServer:
    """Started and stopped by the app's lifespan; ``port`` is the bound port."""

    def __init__(self, settings: Settings, state: Any) -> None:
        self.settings = settings
        self.state = state
        self.port = 0
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds ``grpc_host:grpc_port`` and serves. Raises ``OSError`` when it cannot bind."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", self.message_limit()),
            ("grpc.max_send_message_length", s.max_body_bytes),
            ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
            ("grpc.max_allowed_incoming_connections", s.http_max_connections),
            ("grpc.max_metadata_size", s.http_max_header_bytes),
            ("grpc.max_connection_idle_ms", int(s.http_keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            options=options, compression=_COMPRESSION[s.grpc_infer_response_compression]
        )
        service = InferenceService(self.state)
        server.add_generic_rpc_handlers((service.handler(), self._health_handler(service.gate)))
        address = f"{s.host}:{s.grpc_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
        await server.start()
        self._server = server
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_health())
        log.info("gRPC (KServe v2) on %s:%d", s.host, self.port)
        return self.port

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stops taking RPCs and answers the accepted ones (``grace_s`` at most)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)

    def message_limit(self) -> int:
        """The largest message gRPC takes: the largest body any loaded model takes (its own
        limit, as HTTP reads from Content-Length before receiving), at least 1 MiB, at most
        ``max_body_bytes``. So calls receiving at once hold at most that much each. A model
        loaded later with a larger ``max_request_bytes`` gets it over gRPC at the next start."""
        plane = self.state.dataplane
        largest = max(
            (plane.limits(m).codec.max_body_bytes for m in plane.registry.loaded()), default=0
        )
        return min(self.settings.max_body_bytes, max(largest, 1 << 20))

    def _health_handler(self, gate: CallGate) -> grpc.GenericRpcHandler:
        """``grpc.health.v1.Health`` (grpcio-health-checking's servicer) behind the call gate:
        a request of at most ``_HEALTH_BYTES`` within the body timeout; ``Check`` is never
        counted against the call limit, a ``Watch`` is (it stays open)."""
        serialize = health_pb2.HealthCheckResponse.SerializeToString

        def parse(raw: bytes) -> health_pb2.HealthCheckRequest:
            if len(raw) > _HEALTH_BYTES:
                raise PayloadTooLarge(f"a health request is at most {_HEALTH_BYTES} bytes")
            try:
                return health_pb2.HealthCheckRequest.FromString(raw)
            except DecodeError as exc:
                raise InvalidInput(f"request is not a HealthCheckRequest: {exc}") from None

        async def check(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await self.health.Check(parse(raw), context)

        async def watch(_messages: Any, context: grpc.aio.ServicerContext) -> None:
            await self.health.Watch(parse(await gate.message(context)), context)

        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.stream_unary_rpc_method_handler(
                    gate.unary(check, counted=False), response_serializer=serialize
                ),
                "Watch": grpc.stream_stream_rpc_method_handler(
                    gate.stream(watch), response_serializer=serialize
                ),
            },
        )

    async def _update_health(self) -> None:
        ready = self.state.dataplane.ready()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(_HEALTH_POLL_S)
            try:
                await self._update_health()
            except Exception:  # the health status must outlive one bad poll
                log.exception("could not update the gRPC health status")
