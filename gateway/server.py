"""The HTTP/1.1 server: uvicorn with httptools, and the limits a public endpoint needs.

uvicorn bounds neither the request head nor the time a client may take to send it, and
``limit_concurrency`` answers 503 only after the head has arrived (so it does not stop a
slowloris). Its protocol class is a documented, pluggable parameter (``http=``), so the limits
live in a subclass of its httptools protocol rather than in another server: the measured fast
path stays as it is (benchmarks/RESULTS.md). Each limit is a setting:

- head size (request line + headers) and header count, checked *before* the bytes reach the
  parser, so an oversized header never costs more than the limit to receive: 431;
- head read time from its first byte, and body read time from the end of the head: 408;
- idle time of a connection, a new one that sends nothing included: closed;
- time a response may wait for a client that does not read it: the connection is dropped;
- bytes of chunk framing and trailers after the head: 431, like the head;
- open connections: past the limit a connection's request is answered 503 (a health check is
  still served) and the connection closed, and past twice the limit it is closed at once.

Every refusal is a v2 error body (``{"error": ...}``) with ``Connection: close``, and is counted
in ``bastion_http_rejected_total{reason}``. RFC 9110 §15.5.9 (408), RFC 6585 §5 (431).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from bastion.gateway.http import HEALTH_PATHS
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings

log = logging.getLogger(__name__)
_END_OF_HEAD = b"\r\n\r\n"
_FD_RESERVE = 128  # descriptors kept for the model files, the store and the log


@dataclass(frozen=True, slots=True)
class FrontDoorLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    write_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings, fd_limit: int | None = None) -> FrontDoorLimits:
        """``fd_limit`` (the soft RLIMIT_NOFILE) caps the connection limit below what would
        make ``accept`` fail, so a flood meets a 503 rather than resets."""
        connections = settings.http_max_connections
        if fd_limit is not None:
            connections = max(1, min(connections, (fd_limit - _FD_RESERVE) // 2))
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            write_timeout_s=settings.http_write_timeout_s,
            max_connections=connections,
        )


class _Refused(Exception):
    """Raised from a parser callback; carries the response that ends the connection."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with a v2 error body that closes the connection."""
    body = orjson.dumps({"error": message})
    head = (
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
    )
    return STATUS_LINE[status] + head + body


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    body = orjson.dumps({"error": "too many open connections; retry later"})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protocol_class(limits: FrontDoorLimits, metrics: Metrics) -> type[HttpToolsProtocol]:
    """An httptools protocol class bound to ``limits``, for uvicorn's ``http=``."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._head_tail = b""
            self._header_count = 0
            self._deadline: asyncio.TimerHandle | None = None
            self._write_deadline: asyncio.TimerHandle | None = None
            self._over_limit = False
            self._parsed_head = 0  # request line and header bytes, as the parser reports them
            self._after_head = 0  # bytes received since the head ended
            self._body_seen = 0
            self._chunks = 0

        # -- connections ---------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_now = len(self.connections)
            metrics.connections.set(open_now)
            if open_now > 2 * limits.max_connections:
                self._refuse(_Refused(503, "connections", "too many open connections"))
                return
            self._over_limit = open_now > limits.max_connections
            # uvicorn arms its idle timer only after a response: a connection that never sends
            # a byte would otherwise be held for ever
            self.timeout_keep_alive_task = self.loop.call_later(
                limits.keepalive_timeout_s, self.timeout_keep_alive_handler
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self._clear_deadline()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None
            super().connection_lost(exc)
            metrics.connections.set(len(self.connections))

        # -- the head --------------------------------------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._in_head and not self._admit_head_bytes(data):
                return
            if not self._in_head:
                self._after_head += len(data)
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if isinstance(exc.__context__, _Refused):
                    self._refuse(exc.__context__)
                else:
                    self._refuse(_Refused(400, "malformed", "invalid HTTP request"))
            except httptools.HttpParserUpgrade:
                self._refuse(_Refused(400, "malformed", "protocol upgrades are not supported"))
            except httptools.HttpParserError:
                self._refuse(_Refused(400, "malformed", "invalid HTTP request"))
            else:
                self._check_framing()

        def _check_framing(self) -> None:
            """Bytes after the head that are not body (chunk sizes, trailers) get the head's
            allowance: the parser builds a trailer value by concatenation, so an endless one
            would cost quadratic time on the event loop."""
            if self._in_head or self.transport.is_closing():
                return
            framing = self._after_head - self._body_seen
            if framing > limits.max_header_bytes + 16 * self._chunks:
                message = f"chunk framing and trailers exceed {limits.max_header_bytes} bytes"
                self._refuse(_Refused(431, "trailer_bytes", message))

        def _admit_head_bytes(self, data: bytes) -> bool:
            """Counts head bytes before parsing; refuses (431) a head that cannot end in time."""
            if self._head_bytes == 0 and data:
                self._arm(limits.header_timeout_s, self._head_timed_out)
            room = limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                window = self._head_tail + data[: max(room, 0)]
                if _END_OF_HEAD not in window:
                    self._refuse(
                        _Refused(
                            431,
                            "header_bytes",
                            f"request head exceeds {limits.max_header_bytes} bytes",
                        )
                    )
                    return False
            self._head_bytes += len(data)
            self._head_tail = (self._head_tail + data[-3:])[-3:]
            return True

        def on_url(self, url: bytes) -> None:
            self._count_parsed(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > limits.max_headers:
                raise _Refused(
                    431, "header_count", f"request has more than {limits.max_headers} headers"
                )
            self._count_parsed(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_parsed(self, size: int) -> None:
            """The head as parsed: also catches a head that arrived in the same read as the
            end of the request before it (pipelining), which the read-level count cannot."""
            self._parsed_head += size
            if self._parsed_head > limits.max_header_bytes:
                message = f"request head exceeds {limits.max_header_bytes} bytes"
                raise _Refused(431, "header_bytes", message)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._after_head = self._body_seen = self._chunks = 0
            self._arm(limits.body_timeout_s, self._body_timed_out)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._body_seen += len(body)
            super().on_body(body)

        def on_chunk_header(self) -> None:
            self._chunks += 1

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # a liveness probe on a new connection is served while a flood holds the others
            if self._over_limit:  # the connection is not kept; only a health check is served
                cycle.keep_alive = False
                if cycle.scope.get("path") not in HEALTH_PATHS:
                    metrics.rejected.labels("connections").inc()
                    app = _too_many_connections
            super()._start_asgi_task(cycle, app)

        def on_message_complete(self) -> None:
            self._clear_deadline()
            super().on_message_complete()
            self._in_head = True
            self._head_bytes = self._parsed_head = 0
            self._head_tail = b""
            self._header_count = 0

        # -- deadlines -------------------------------------------------------------------------
        def _arm(self, delay_s: float, callback: Any) -> None:
            self._clear_deadline()
            self._deadline = self.loop.call_later(delay_s, callback)

        def _clear_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_timed_out(self) -> None:
            self._deadline = None
            if self._in_head and not self.transport.is_closing():
                message = f"request head not received within {limits.header_timeout_s:g} s"
                self._refuse(_Refused(408, "header_timeout", message))

        def _body_timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # the app is not reading yet: not the client's fault
                self._arm(limits.body_timeout_s, self._body_timed_out)
                return
            message = f"request body not received within {limits.body_timeout_s:g} s"
            self._refuse(_Refused(408, "body_timeout", message))

        # -- a client that does not read its responses -----------------------------------------
        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(
                    limits.write_timeout_s, self._write_timed_out
                )

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None

        def _write_timed_out(self) -> None:
            """The response has not drained for ``write_timeout_s``: drop the connection (close
            would wait for the buffer to drain), which frees the request and its slot."""
            self._write_deadline = None
            metrics.rejected.labels("write_timeout").inc()
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.abort()

        # -- refusals --------------------------------------------------------------------------
        def _refuse(self, refusal: _Refused) -> None:
            """Answers once (unless a response is under way) and closes the connection."""
            metrics.rejected.labels(refusal.reason).inc()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's receive() now sees a disconnect
                cycle.message_event.set()
                answered = cycle.response_started
            else:
                answered = False
            if not answered and not self.transport.is_closing():
                self.transport.write(error_bytes(refusal.status, refusal.message))
            self._in_head = False
            self._clear_deadline()
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._refuse(_Refused(400, "malformed", msg))

    return BoundedHttpToolsProtocol


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (as nginx's worker_rlimit_nofile does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file-descriptor limit from %d: %s", soft, exc)
    return soft


class PortInUse(OSError):
    """A port ``bastion serve`` needs is taken (or not ours to bind)."""


def check_ports(settings: Settings) -> None:
    """Binds each port the gateway will listen on once, so a clash is one clear line before
    any model loads, not a traceback after. Raises ``PortInUse``."""
    ports = [("HTTP", settings.port)]
    if settings.allow_grpc and settings.grpc_port:
        ports.append(("gRPC", settings.grpc_port))
    for what, port in ports:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.host, port))
            except OSError as exc:
                flag = "--port" if what == "HTTP" else "--grpc-port"
                raise PortInUse(
                    f"cannot bind {what} to {settings.host}:{port}: {exc.strerror} "
                    f"(choose another with {flag})"
                ) from None


def serve(settings: Settings) -> None:
    """Runs the gateway until SIGINT/SIGTERM, then drains accepted requests (30 s at most).
    Raises ``PortInUse`` before starting when a port is taken."""
    import uvicorn

    check_ports(settings)
    from bastion.gateway.app import create_app

    app = create_app(settings, grpc=settings.allow_grpc)
    limits = FrontDoorLimits.from_settings(settings, raise_fd_limit())
    if limits.max_connections < settings.http_max_connections:
        log.warning(
            "http_max_connections lowered to %d by the file-descriptor limit",
            limits.max_connections,
        )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(limits, app.state.metrics),
        ws="none",
        lifespan="on",
        access_log=settings.access_log,
        proxy_headers=False,
        server_header=False,
        log_level=settings.log_level,
        timeout_keep_alive=int(max(1, round(settings.http_keepalive_timeout_s))),
        timeout_graceful_shutdown=30,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
