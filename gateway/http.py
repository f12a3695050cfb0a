"""KServe v2 HTTP routes, Triton flavour. Thin: parse, call the data plane, encode."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.dataplane import DataPlane
from gateway.errors import BastionError, Forbidden, InvalidInput, PayloadTooLarge
from gateway.monitoring.metrics import CONTENT_TYPE, Metrics
from gateway.protocol.codec import compress, decode_infer_body, encode_response
from gateway.repository import parse_version

log = logging.getLogger(__name__)
router = APIRouter()
_JSON = "application/json"
_BINARY = "application/octet-stream"


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def plane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def require_admin(request: Request) -> None:
    """Admin actions need ``Authorization: Bearer <BASTION_ADMIN_TOKEN>``; none is set: refused."""
    token = plane(request).settings.admin_token
    given = request.headers.get("authorization", "")
    if not token:
        raise Forbidden("admin actions are disabled: set BASTION_ADMIN_TOKEN to enable them")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Forbidden("this action needs 'Authorization: Bearer <admin token>'")


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    return json_response(plane(request).server_metadata())


@router.get("/v2/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if plane(request).ready() else 503)


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> Response:
    return json_response(plane(request).statistics(None, None))


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).model_metadata(model, parse_version(version)))


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    plane(request).registry.get(model, parse_version(version))
    return Response(status_code=200)


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).model_config(model, parse_version(version)))


@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def model_stats(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).statistics(model, parse_version(version)))


@router.get("/v2/models/{model}/drift")
@router.get("/v2/models/{model}/versions/{version}/drift")
async def model_drift(request: Request, model: str, version: str | None = None) -> Response:
    # a snapshot briefly takes the monitor's lock, which a batch may hold: off the event loop
    drift = await asyncio.to_thread(plane(request).drift, model, parse_version(version))
    return json_response(drift)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> Response:
    return json_response(plane(request).registry.index())


@router.post("/v2/repository/models/{model}/load")
async def load_model(request: Request, model: str) -> Response:
    require_admin(request)
    await plane(request).registry.load(model)
    return json_response({})


@router.post("/v2/repository/models/{model}/unload")
async def unload_model(request: Request, model: str) -> Response:
    require_admin(request)
    await plane(request).registry.unload(model)
    return json_response({})


@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/cudasharedmemory/status")
async def shared_memory_status() -> Response:
    return json_response([])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    stats = [m.stats for m in plane(request).registry.loaded()]
    body = request.app.state.metrics.render(stats)
    return Response(body, media_type=CONTENT_TYPE)


class InferRoute:
    """ASGI fast path for ``POST /v2/models/{m}[/versions/{v}]/infer``, ahead of FastAPI.

    Inference is the one hot route: skipping the framework's routing, middleware and dependency
    resolution halves the gateway's own CPU per request (benchmarks/RESULTS.md). Every other
    route goes to the FastAPI app unchanged.
    """

    PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]*))?/infer$")

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self.PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            status, out_headers, payload = await self._infer(match, headers, receive)
        except BastionError as exc:
            status, out_headers, payload = self._error(exc.status, exc.body())
        except Exception as exc:
            log.exception("unhandled error on %s", scope["path"])
            error = {"error": f"internal error: {type(exc).__name__}"}
            status, out_headers, payload = self._error(500, error)
        out_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})

    def _error(
        self, status: int, body: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.state.metrics.errors.labels(str(status)).inc()
        return status, [(b"content-type", _JSON.encode())], orjson.dumps(body)

    async def _infer(
        self, match: re.Match[str], headers: dict[str, str], receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        plane: DataPlane = self.state.dataplane
        model, version = match.group(1), parse_version(match.group(2))
        raw = plane.raw_input(model, version)
        body = await _receive_body(receive, headers, plane.settings.max_body_bytes)
        request = decode_infer_body(
            body,
            headers.get("inference-header-content-length"),
            headers.get("content-encoding"),
            self.state.limits,
            raw,
        )
        request.client_id = headers.get(plane.settings.client_id_header)
        response = await plane.infer(model, version, request)
        payload, json_size = encode_response(response)
        out = [(b"content-type", (_JSON if json_size is None else _BINARY).encode())]
        if json_size is not None:
            out.append((b"inference-header-content-length", str(json_size).encode()))
        payload, encoding = compress(payload, headers.get("accept-encoding"))
        if encoding:
            out.append((b"content-encoding", encoding.encode()))
        return 200, out, payload


async def _receive_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """Reads an ASGI body without ever holding more than ``limit`` bytes."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as ``{"error": "..."}`` with Triton's status mapping."""

    async def on_bastion(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BastionError)
        metrics.errors.labels(str(exc.status)).inc()
        return json_response(exc.body(), exc.status)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        metrics.errors.labels(str(exc.status_code)).inc()
        return error_response(exc.status_code, str(exc.detail))

    async def on_validation(request: Request, exc: Exception) -> Response:
        metrics.errors.labels("400").inc()
        return error_response(400, f"invalid request: {exc}")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        metrics.errors.labels("500").inc()
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(BastionError, on_bastion)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)
