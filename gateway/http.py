"""KServe v2 HTTP routes, Triton flavour. Thin: parse, call the data plane, encode."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.dataplane import DataPlane
from gateway.errors import BastionError, Forbidden, PayloadTooLarge
from gateway.monitoring.metrics import CONTENT_TYPE, Metrics
from gateway.protocol.codec import compress, decode_infer_body, encode_response
from gateway.repository import parse_version

log = logging.getLogger(__name__)
router = APIRouter()
_JSON = "application/json"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def error_response(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _plane(request: Request) -> DataPlane:
    return request.app.state.dataplane


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body without ever holding more than ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    return _json(_plane(request).server_metadata())


@router.get("/v2/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if _plane(request).ready() else 503)


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> Response:
    return _json(_plane(request).statistics(None, None))


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    return _json(_plane(request).model_metadata(model, parse_version(version)))


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    _plane(request).registry.get(model, parse_version(version))
    return Response(status_code=200)


@router.get("/v2/models/{model}/config")
@router.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: Request, model: str, version: str | None = None) -> Response:
    return _json(_plane(request).model_config(model, parse_version(version)))


@router.get("/v2/models/{model}/stats")
@router.get("/v2/models/{model}/versions/{version}/stats")
async def model_stats(request: Request, model: str, version: str | None = None) -> Response:
    return _json(_plane(request).statistics(model, parse_version(version)))


@router.post("/v2/models/{model}/infer")
@router.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    plane = _plane(request)
    settings = plane.settings
    number = parse_version(version)
    raw = plane.raw_input(model, number)
    body = await read_body(request, settings.max_body_bytes)
    headers = request.headers
    infer_request = decode_infer_body(
        body,
        headers.get("inference-header-content-length"),
        headers.get("content-encoding"),
        request.app.state.limits,
        raw,
    )
    response = await plane.infer(model, number, infer_request)
    payload, json_size = encode_response(response)
    out_headers = {}
    if json_size is not None:
        out_headers["Inference-Header-Content-Length"] = str(json_size)
    payload, encoding = compress(payload, headers.get("accept-encoding"))
    if encoding:
        out_headers["Content-Encoding"] = encoding
    media = "application/octet-stream" if json_size is not None else _JSON
    return Response(payload, media_type=media, headers=out_headers)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> Response:
    return _json(_plane(request).registry.index())


@router.post("/v2/repository/models/{model}/load")
async def load_model(request: Request, model: str) -> Response:
    _require_admin(request)
    await _plane(request).registry.load(model)
    return _json({})


@router.post("/v2/repository/models/{model}/unload")
async def unload_model(request: Request, model: str) -> Response:
    _require_admin(request)
    await _plane(request).registry.unload(model)
    return _json({})


@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/cudasharedmemory/status")
async def shared_memory_status() -> Response:
    return _json([])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    stats = [m.stats for m in _plane(request).registry.loaded()]
    body = request.app.state.metrics.render(stats)
    return Response(body, media_type=CONTENT_TYPE)


def _require_admin(request: Request) -> None:
    token = _plane(request).settings.admin_token
    given = request.headers.get("authorization", "")
    if not token:
        raise Forbidden("repository control is disabled: set BASTION_ADMIN_TOKEN to enable it")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Forbidden("this action needs 'Authorization: Bearer <admin token>'")


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as ``{"error": "..."}`` with Triton's status mapping."""

    async def on_bastion(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BastionError)
        metrics.errors.labels(str(exc.status)).inc()
        return error_response(exc.status, exc.message)

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
