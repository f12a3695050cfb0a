"""The ``grpc.aio`` server beside HTTP, on the same event loop and over the same data plane.

Bounds a public endpoint needs, each a setting: the largest message (``max_body_bytes``, after
decompression), RPCs at once (past it RESOURCE_EXHAUSTED), HTTP/2 streams per connection, a
stream's requests in flight, idle connections closed, and keepalive pings from a client at most
every 10 s (more is a ping flood: the connection is closed, as gRPC's ping strikes do). The
standard health service (``grpc.health.v1.Health``) reports SERVING while the server is ready,
for the whole server ("") and for the inference service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gateway.rpc.service import SERVICE, InferenceService
from gateway.settings import Settings

log = logging.getLogger(__name__)
_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}
_HEALTH_POLL_S = 1.0


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
            ("grpc.max_receive_message_length", s.max_body_bytes),
            ("grpc.max_send_message_length", s.max_body_bytes),
            ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
            ("grpc.max_connection_idle_ms", int(s.http_keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=s.grpc_max_concurrent_rpcs,
            compression=_COMPRESSION[s.grpc_infer_response_compression],
        )
        server.add_generic_rpc_handlers((InferenceService(self.state).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
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
