"""The ASGI entry point: front-door checks, the inference fast path, then the FastAPI app.

Inference is the one hot route: skipping the framework's routing, middleware and dependency
resolution halves the gateway's own CPU per request (benchmarks/RESULTS.md). Here, in order:

1. health checks go straight to their routes, never counted or refused, so a liveness probe
   answers while the gateway sheds load;
2. every other request counts against ``max_requests_in_flight`` (past it: 503 at once);
3. ``POST .../infer`` reads its body (at most ``max_body_bytes``) on the event loop — only
   bytes — and hands the data plane a decoder that runs in the decode pool;
4. anything else goes to FastAPI with its body capped at ``max_control_body_bytes``: admin and
   control bodies are small, and FastAPI parses a JSON body on the event loop.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from bastion.gateway.dataplane import DataPlane
from bastion.gateway.errors import (
    BastionError,
    InvalidInput,
    MethodNotAllowed,
    PayloadTooLarge,
    Unavailable,
)
from bastion.gateway.http import HEALTH_PATHS, clip
from bastion.gateway.identity.caller import resolve_caller
from bastion.gateway.monitoring.tracing import NOT_TRACED, Tracing
from bastion.gateway.protocol.bounds import Limits, RawInput
from bastion.gateway.protocol.codec import decode_infer_body, encode_response
from bastion.gateway.protocol.content_encoding import compress
from bastion.gateway.protocol.types import InferRequest, InferResponse
from bastion.gateway.repository import parse_version

log = logging.getLogger(__name__)
_JSON = b"application/json"
_PREALLOCATE = 64 << 10
_BINARY = b"application/octet-stream"
Headers = list[tuple[bytes, bytes]]


class Gateway:
    """The app uvicorn runs; ``.app`` is the FastAPI app with every other route."""

    INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]*))?/infer$")

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        match = self.INFER.match(scope["path"])
        if match is not None and scope["method"] != "POST":
            refusal = MethodNotAllowed(f"{scope['method']} is not allowed here; use POST", "POST")
            await self._answer(send, *self._error(refusal))
            return
        if match is None:
            try:
                with self.state.in_flight.slot():
                    await self._control(scope, receive, send)
            except Unavailable as exc:
                await self._answer(send, *self._error(exc))
            return
        try:
            reply = await self._infer(match, scope, receive)
        except BastionError as exc:
            reply = self._error(exc)
        except Exception as exc:
            log.exception("unhandled error on %s", scope["path"])
            reply = self._error(BastionError(f"internal error: {type(exc).__name__}"))
        await self._answer(send, *reply)

    def _reject(self, reason: str) -> None:
        self.state.metrics.rejected.labels(reason).inc()

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.state.settings.max_control_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and _declared_length(value) > limit:
                self.state.metrics.rejected.labels("control_body").inc()
                too_large = PayloadTooLarge(
                    f"request body exceeds the limit of {limit} bytes for this route"
                )
                await self._answer(send, *self._error(too_large))
                return
        await self.app(scope, _capped(receive, limit), send)

    @staticmethod
    async def _answer(send: Send, status: int, headers: Headers, payload: bytes) -> None:
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _error(self, exc: BastionError) -> tuple[int, Headers, bytes]:
        self.state.metrics.errors.labels(str(exc.status)).inc()
        body = {**exc.body(), "error": clip(exc.message)}
        headers = [(b"content-type", _JSON)]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        return exc.status, headers, orjson.dumps(body)

    async def _infer(
        self, match: re.Match[str], scope: Scope, receive: Receive
    ) -> tuple[int, Headers, bytes]:
        plane: DataPlane = self.state.dataplane
        model, version = match.group(1), parse_version(match.group(2))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # 404/503, or 413 past what this model could take, before reading a body for nothing
        limits = plane.limits(plane.registry.get(model, version)).codec
        peer = scope.get("client")
        caller = resolve_caller(
            plane.settings,
            self.state.keys,
            headers,
            str(peer[0]) if peer else None,
            self._reject,
        )
        try:
            body = await _receive_body(receive, headers, limits.max_body_bytes)
        except PayloadTooLarge:
            self.state.metrics.rejected.labels("body_bytes").inc()
            raise
        with self.state.in_flight.slot():
            response = await plane.infer(model, version, _http_decoder(body, headers), caller)
        if plane.tracing is None or not plane.tracing.active():
            return _encoded(response, headers)
        with plane.tracing.span("encode"):
            return _encoded(response, headers)


class TracedGateway(Gateway):
    """The gateway with OpenTelemetry traces (``BASTION_OTEL_ENDPOINT`` set): a request the
    sampling picks (``Tracing.sampled``) gets a server span, continuing the caller's
    ``traceparent``, with the data plane's spans its children; health and metrics are not
    traced, and a request left out runs exactly as in ``Gateway``."""

    def __init__(self, app: FastAPI, tracing: Tracing) -> None:
        super().__init__(app)
        self._tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in NOT_TRACED
            or not self._tracing.sampled(_traceparent(scope))
        ):
            await super().__call__(scope, receive, send)
            return
        match = self.INFER.match(scope["path"])
        route = None
        if match is not None:
            versions = "/versions/{version}" if match.group(2) is not None else ""
            route = f"/v2/models/{{model}}{versions}/infer"
        answered: list[int] = []

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
            await send(message)

        with self._tracing.http(scope, route) as span:
            await super().__call__(scope, receive, traced_send)
            if answered:
                self._tracing.status(span, answered[0])


def _traceparent(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"traceparent":
            return bytes(value)
    return None


def _encoded(response: InferResponse, headers: dict[str, str]) -> tuple[int, Headers, bytes]:
    """The 200 answer: JSON or binary tensors, compressed as ``Accept-Encoding`` asks."""
    payload, json_size = encode_response(response)
    out = [(b"content-type", _JSON if json_size is None else _BINARY)]
    if json_size is not None:
        out.append((b"inference-header-content-length", str(json_size).encode()))
    payload, encoding = compress(payload, headers.get("accept-encoding"))
    if encoding:
        out.append((b"content-encoding", encoding.encode()))
    return 200, out, payload


def _http_decoder(
    body: bytes, headers: dict[str, str]
) -> Callable[[RawInput | None, Limits], InferRequest]:
    """The HTTP body's parser, for the data plane to run in the decode pool."""
    header_length = headers.get("inference-header-content-length")
    encoding = headers.get("content-encoding")

    def decode(raw: RawInput | None, limits: Limits) -> InferRequest:
        return decode_infer_body(body, header_length, encoding, limits, raw)

    return decode


async def _receive_body(receive: Receive, headers: dict[str, str], limit: int) -> bytearray:
    """Reads an ASGI body without ever holding more than ``limit`` bytes.

    Each chunk is copied into one buffer as it arrives (sized from Content-Length when there is
    one): joining a 64 MiB list at the end would be one long copy holding the GIL, on the loop.
    """
    declared = _declared_length(headers.get("content-length", "").encode())
    if declared > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} for this model (its "
            "config parameter max_request_bytes raises it, up to BASTION_MAX_BODY_BYTES)"
        )
    # room for what has been declared, up to 64 KiB: memory follows the bytes that arrive, not
    # a number in a header
    body = bytearray(min(max(declared, 0), _PREALLOCATE))
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        end = size + len(chunk)
        if end > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if end <= len(body):
            body[size:end] = chunk
        else:
            body[size:] = chunk  # no (or a wrong) Content-Length: grow
        size = end
        if not message.get("more_body", False):
            del body[size:]
            return body


def _declared_length(value: bytes) -> int:
    """A Content-Length header's value, or -1 (the HTTP parser already refused bad ones)."""
    return int(value) if value.isdigit() and len(value) <= 18 else -1


def _capped(receive: Receive, limit: int) -> Callable[[], Any]:
    """``receive`` that raises 413 once a control route's body passes ``limit`` bytes."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            # an HTTPException: FastAPI turns any other error raised while it reads a body
            # into a 400 "error parsing the body"
            raise HTTPException(
                413, f"request body exceeds the limit of {limit} bytes for this route"
            )
        return message

    return capped
