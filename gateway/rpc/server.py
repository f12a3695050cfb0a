"""KServe v2 gRPC beside HTTP: a front process holds the ``grpc.aio`` server, the gateway answers
every call with the same handlers over the same data plane (``gateway.rpc.relay`` says why).

Bounds a public endpoint needs, each a setting, are kept by the front (``gateway.rpc.front``):
the largest message (``max_body_bytes``, after decompression; then each model's own limit, as
over HTTP), open connections (``http_max_connections``), metadata (``http_max_header_bytes``),
HTTP/2 streams per connection, idle connections closed, keepalive pings from a client at most
every 10 s (more is a ping flood: the connection is closed, as gRPC's ping strikes do), and, per
call (``gateway.rpc.calls``): calls open at once, the time a request may take to arrive and a
reply to be taken, a stream's requests in flight. The standard health service
(``grpc.health.v1.Health``) reports SERVING while the server is ready, for the whole server ("")
and for the inference service; its ``Check`` answers while the call limit is reached.

Should the front process die, the gateway starts another on the same port (the calls it had
open end UNAVAILABLE); HTTP is not interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from bastion.gateway.errors import BastionError, InvalidInput, PayloadTooLarge
from bastion.gateway.rpc import relay
from bastion.gateway.rpc.context import Aborted, RelayedContext, messages
from bastion.gateway.rpc.service import SERVICE, InferenceService, Method
from bastion.gateway.settings import Settings

log = logging.getLogger(__name__)
_HEALTH_POLL_S = 1.0
_HEALTH_BYTES = 1024  # a HealthCheckRequest is a service name
_READY_TIMEOUT_S = 60.0
_RESTART_DELAY_S = 1.0
_FRAME_SLACK = 1 << 20  # a frame's metadata and framing beside its message
_NOT_TRACED = "/grpc.health."  # probes, as HTTP's health routes are not traced
MAX_WATCHES = 64  # health Watch streams open at once: outside the inference calls' slots


@dataclass
class _Process:
    process: asyncio.subprocess.Process
    link: relay.FrameProtocol
    ready: asyncio.Future[dict[str, Any]]


class GrpcServer:
    """Started and stopped by the app's lifespan; ``port`` is the bound port."""

    def __init__(self, settings: Settings, state: Any) -> None:
        self.settings = settings
        self.state = state
        self.port = 0
        self.health = health_aio.HealthServicer()
        self.service = InferenceService(state)
        self.methods: dict[str, Method] = {**self.service.methods(), **self._health_methods()}
        self.calls: dict[int, RelayedContext] = {}
        self._front: _Process | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Starts the front on ``host:grpc_port`` and serves. Raises ``OSError`` when it
        cannot bind, ``RuntimeError`` when it does not start."""
        await self._spawn(self.settings.grpc_port)
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_health())
        log.info("gRPC (KServe v2) on %s:%d", self.settings.host, self.port)
        return self.port

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stops taking RPCs and answers the accepted ones (``grace_s`` at most)."""
        self._stopping = True
        for task in (self._watch, self._restart):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.health.enter_graceful_shutdown()
        front = self._front
        if front is not None:
            front.link.send(relay.SHUTDOWN, relay.CONTROL_CALL, orjson.dumps({"grace_s": grace_s}))
            try:
                await asyncio.wait_for(front.process.wait(), grace_s + 5.0)
            except TimeoutError:
                front.process.kill()
                await front.process.wait()
            front.link.close()
        for context in list(self.calls.values()):
            if context.task is not None:
                context.task.cancel()

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

    # -- the front process -----------------------------------------------------------------------
    def front_config(self, port: int) -> dict[str, Any]:
        """What the front is started with (``gateway.rpc.front.Front``)."""
        s = self.settings
        limit = self.message_limit()
        return {
            "address": f"{s.host}:{port}",
            "options": [
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", s.max_body_bytes),
                ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
                ("grpc.max_allowed_incoming_connections", s.http_max_connections),
                ("grpc.max_metadata_size", s.http_max_header_bytes),
                ("grpc.max_connection_idle_ms", int(s.http_keepalive_timeout_s * 1000)),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.so_reuseport", 0),
            ],
            "compression": s.grpc_infer_response_compression,
            "methods": {name: [m.streaming, m.pool] for name, m in self.methods.items()},
            "limits": {
                "max_calls": s.grpc_max_concurrent_rpcs,
                "max_watches": MAX_WATCHES,
                "body_timeout_s": s.http_body_timeout_s,
                "write_timeout_s": s.http_write_timeout_s,
                "idle_timeout_s": s.grpc_stream_idle_timeout_s,
            },
            "grace_s": 30.0,
            "max_frame_bytes": max(limit, s.max_body_bytes) + _FRAME_SLACK,
        }

    async def _spawn(self, port: int) -> None:
        config = self.front_config(port)
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bastion.gateway.rpc.front",
                "--fd",
                str(theirs.fileno()),
                "--config",
                orjson.dumps(config).decode(),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        front: _Process | None = None

        def lost(exc: Exception | None) -> None:
            if not ready.done():
                ready.set_exception(RuntimeError("the gRPC front exited before it was ready"))
            if front is not None:
                self._lost(front)

        link = relay.FrameProtocol(lambda *_: None, lost, config["max_frame_bytes"])
        link.on_frame = lambda kind, call, payload: self._on_frame(kind, call, payload, link, ready)
        await loop.create_connection(lambda: link, sock=ours)
        front = _Process(process, link, ready)
        try:
            answer = await asyncio.wait_for(ready, _READY_TIMEOUT_S)
        except BaseException:
            link.close()
            if process.returncode is None:
                process.kill()
            await process.wait()
            raise
        if "error" in answer:
            await process.wait()
            raise OSError(answer["error"])
        self.port = int(answer["port"])
        self._front = front

    def _lost(self, front: _Process) -> None:
        """The front's socket closed: its calls are over; a front that died is replaced."""
        for context in list(self.calls.values()):
            if context.task is not None:
                context.task.cancel()
        if self._front is front and not self._stopping:
            log.error("the gRPC front process exited; starting another on port %d", self.port)
            self._front = None
            self._restart = asyncio.create_task(self._respawn(front))

    async def _respawn(self, front: _Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            front.process.kill()
        await front.process.wait()
        while not self._stopping:
            await asyncio.sleep(_RESTART_DELAY_S)
            try:
                await self._spawn(self.port)
                return
            except Exception:  # keep trying: HTTP serves meanwhile
                log.exception("could not restart the gRPC front process")

    # -- relayed calls ---------------------------------------------------------------------------
    def _on_frame(
        self,
        kind: int,
        call: int,
        payload: bytes,
        link: relay.FrameProtocol,
        ready: asyncio.Future[dict[str, Any]],
    ) -> None:
        """One frame from the front whose relay is ``link``."""
        if call == relay.CONTROL_CALL:
            if kind == relay.READY and not ready.done():
                ready.set_result(orjson.loads(payload))
            elif kind == relay.EVENT:
                self._count(orjson.loads(payload))
            return
        if kind in (relay.UNARY, relay.OPEN):
            try:
                if kind == relay.UNARY:
                    opening, raw = relay.decode_unary(payload)
                else:
                    opening, raw = relay.Opening.decode(payload), None
            except (ValueError, TypeError, IndexError, struct.error):
                log.exception("relay: a malformed call frame")
                link.send(relay.END, call, relay.Ending(13, "internal error").encode())
                return
            context = RelayedContext(call, opening, link)
            self.calls[call] = context
            context.task = asyncio.create_task(self._answer(context, raw))
            # a task cancelled before its first step never runs its body: the call is
            # forgotten when the task ends, however it ends
            context.task.add_done_callback(lambda _, context=context: self._forget(context))
            return
        context = self.calls.get(call)
        if context is None:
            return
        if kind == relay.MESSAGE:
            context.delivered(payload)
        elif kind == relay.HALF_CLOSE:
            context.delivered(grpc.aio.EOF)
        elif kind == relay.WROTE:
            context.written(payload == b"\x01")
        elif kind == relay.CANCEL and context.task is not None:
            context.task.cancel()

    def _forget(self, context: RelayedContext) -> None:
        if self.calls.get(context.ident) is context:  # not a newer call given the same id
            del self.calls[context.ident]

    async def _answer(self, context: RelayedContext, raw: bytes | None) -> None:
        tracing = getattr(self.state, "tracing", None)
        opening = context.opening
        if (
            tracing is None
            or opening.method.startswith(_NOT_TRACED)
            or not tracing.sampled(_first(opening.metadata, "traceparent"))
        ):
            ending = await self._run(context, raw)
        else:  # the server span, continuing a traceparent in the metadata
            with tracing.rpc(opening.method, opening.metadata, opening.peer) as span:
                ending = await self._run(context, raw)
                if ending is not None:
                    span.set_attribute("rpc.grpc.status_code", ending.code)
        if ending is not None:
            context.link.send(relay.END, context.ident, ending.encode())

    async def _run(self, context: RelayedContext, raw: bytes | None) -> relay.Ending | None:
        """The call's ending, or None when the client went away (nothing to answer)."""
        method = self.methods.get(context.opening.method)
        ending: relay.Ending | None = None
        try:
            if method is None:  # the front serves only the methods it was given
                ending = relay.Ending(grpc.StatusCode.UNIMPLEMENTED.value[0], "unknown method")
            elif raw is None:
                await method.run(messages(context), context)
                ending = relay.Ending()
            else:
                reply = await method.run(raw, context)
                data = reply if isinstance(reply, bytes) else reply.SerializeToString()
                ending = relay.Ending(reply=data)
        except Aborted:
            ending = context.ending
        except BastionError as exc:
            try:
                await self.service.abort(context, exc)  # type: ignore[arg-type]
            except Aborted:
                ending = context.ending
        except asyncio.CancelledError:
            return None  # the client went away (or the front did): nothing to answer
        except Exception:
            log.exception("unhandled error in %s", context.opening.method)
            ending = relay.Ending(grpc.StatusCode.INTERNAL.value[0], "internal error")
        finally:
            self._forget(context)
        return ending

    def _count(self, event: dict[str, Any]) -> None:
        metrics = self.state.metrics
        if "rejected" in event:
            metrics.rejected.labels(str(event["rejected"])).inc()
        if "status" in event:
            metrics.errors.labels(str(event["status"])).inc()

    # -- health ----------------------------------------------------------------------------------
    def _health_methods(self) -> dict[str, Method]:
        """``grpc.health.v1.Health`` (grpcio-health-checking's servicer): a request of at most
        ``_HEALTH_BYTES``; ``Check`` is never counted against the call limit, a ``Watch`` (it
        stays open, reading nothing after its request) against ``MAX_WATCHES`` of its own, so
        watches cannot take the slots inference needs."""

        def parse(raw: bytes) -> health_pb2.HealthCheckRequest:
            if len(raw) > _HEALTH_BYTES:
                raise PayloadTooLarge(f"a health request is at most {_HEALTH_BYTES} bytes")
            try:
                return health_pb2.HealthCheckRequest.FromString(raw)
            except DecodeError as exc:
                raise InvalidInput(f"request is not a HealthCheckRequest: {exc}") from None

        async def check(raw: bytes, context: Any) -> Message:
            return await self.health.Check(parse(raw), context)

        async def watch(requests: AsyncIterator[bytes], context: Any) -> None:
            first = await anext(aiter(requests), None)
            if first is None:
                raise InvalidInput("the call ended without a request message")
            await self.health.Watch(parse(first), context)

        name = "/grpc.health.v1.Health/"
        return {
            name + "Check": Method(False, check, pool=None),
            name + "Watch": Method(True, watch, pool="watches"),
        }

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


def _first(metadata: Sequence[tuple[str, str]], key: str) -> str | None:
    """The first value of a metadata key (the one the server span continues)."""
    return next((value for name, value in metadata if name == key), None)
