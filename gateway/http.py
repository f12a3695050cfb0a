"""KServe v2 HTTP routes, Triton flavour. Thin: parse, call the data plane, encode.

Inference itself takes the fast path in ``gateway.asgi``; these are the other routes, each
declaring every status it can answer (``responses=``) for the public OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response

from bastion.gateway import model_control
from bastion.gateway.dataplane import DataPlane
from bastion.gateway.errors import BastionError, Forbidden
from bastion.gateway.identity.caller import check_admin, token_matches
from bastion.gateway.monitoring.metrics import CONTENT_TYPE, Metrics
from bastion.gateway.protocol.schema import FRONT_DOOR, error
from bastion.gateway.repository import parse_version

log = logging.getLogger(__name__)
router = APIRouter(responses=FRONT_DOOR)
_JSON = "application/json"
MAX_MESSAGE_CHARS = 1024
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error("A malformed model version or parameter."),
    404: error("No such model or version."),
    503: error("The model is not ready."),
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    403: error("The admin token is missing or wrong (or admin actions are disabled)."),
}


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Error messages quote client input; an error body must not echo a megabyte back."""
    return message if len(message) <= limit else message[:limit] + "... (truncated)"


def error_response(status: int, message: str) -> Response:
    return json_response({"error": clip(message)}, status)


def plane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def require_admin(request: Request) -> None:
    """Admin actions need ``Authorization: Bearer <BASTION_ADMIN_TOKEN>``; none is set: refused."""
    check_admin(plane(request).settings, request.headers.get("authorization"))


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    return json_response(plane(request).server_metadata())


@router.head("/v2/health/live", include_in_schema=False)
@router.get("/v2/health/live", response_class=Response, responses={200: {"description": "Live"}})
async def live() -> Response:
    return Response(status_code=200)


@router.head("/v2/health/ready", include_in_schema=False)
@router.get(
    "/v2/health/ready",
    response_class=Response,
    responses={200: {"description": "Every model is ready"}, 503: error("A model is not ready.")},
)
async def ready(request: Request) -> Response:
    return Response(status_code=200 if plane(request).ready() else 503)


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> Response:
    return json_response(plane(request).statistics(None, None))


@router.get("/v2/models/{model}", responses=MODEL_ERRORS)
@router.get("/v2/models/{model}/versions/{version}", responses=MODEL_ERRORS)
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).model_metadata(model, parse_version(version)))


_READY = {200: {"description": "Ready"}, **MODEL_ERRORS}


@router.get("/v2/models/{model}/ready", response_class=Response, responses=_READY)
@router.get(
    "/v2/models/{model}/versions/{version}/ready", response_class=Response, responses=_READY
)
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    plane(request).registry.get(model, parse_version(version)).check_ready()
    return Response(status_code=200)


@router.get("/v2/models/{model}/config", responses=MODEL_ERRORS)
@router.get("/v2/models/{model}/versions/{version}/config", responses=MODEL_ERRORS)
async def model_config(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).model_config(model, parse_version(version)))


@router.get("/v2/models/{model}/stats", responses=MODEL_ERRORS)
@router.get("/v2/models/{model}/versions/{version}/stats", responses=MODEL_ERRORS)
async def model_stats(request: Request, model: str, version: str | None = None) -> Response:
    return json_response(plane(request).statistics(model, parse_version(version)))


@router.get("/v2/models/{model}/drift", responses=MODEL_ERRORS)
@router.get("/v2/models/{model}/versions/{version}/drift", responses=MODEL_ERRORS)
async def model_drift(request: Request, model: str, version: str | None = None) -> Response:
    # a snapshot briefly takes the monitor's lock, which a batch may hold: off the event loop
    drift = await asyncio.to_thread(plane(request).drift, model, parse_version(version))
    return json_response(drift)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> Response:
    return json_response(plane(request).registry.index())


@router.post(
    "/v2/repository/models/{model}/load",
    tags=["admin"],
    responses={**ADMIN_ERRORS, 404: error("No such model."), 503: error("It failed to load.")},
)
async def load_model(request: Request, model: str) -> Response:
    require_admin(request)
    await model_control.load_model(plane(request).registry, request.app.state.incident_log, model)
    return json_response({})


@router.post(
    "/v2/repository/models/{model}/unload",
    tags=["admin"],
    responses={**ADMIN_ERRORS, 404: error("The model is not loaded.")},
)
async def unload_model(request: Request, model: str) -> Response:
    require_admin(request)
    registry = plane(request).registry
    await model_control.unload_model(registry, request.app.state.incident_log, model)
    return json_response({})


@router.get("/v2/systemsharedmemory/status")
@router.get("/v2/cudasharedmemory/status")
async def shared_memory_status() -> Response:
    return json_response([])


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={403: error("BASTION_METRICS_TOKEN is set and the request does not carry it.")},
)
async def metrics(request: Request) -> Response:
    """Prometheus exposition. Thresholds are never here; with ``metrics_token`` set, the scrape
    must carry it and also sees per-detector score histograms."""
    token = plane(request).settings.metrics_token
    if token and not token_matches(request.headers.get("authorization", ""), token):
        raise Forbidden("/metrics needs 'Authorization: Bearer <metrics token>'")
    stats = [m.stats for m in plane(request).registry.loaded()]
    body = request.app.state.metrics.render(stats, private=bool(token))
    return Response(body, media_type=CONTENT_TYPE)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as ``{"error": "..."}`` with Triton's status mapping."""

    async def on_bastion(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BastionError)
        metrics.errors.labels(str(exc.status)).inc()
        response = json_response({**exc.body(), "error": clip(exc.message)}, exc.status)
        response.headers.update(exc.headers)
        return response

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        metrics.errors.labels(str(exc.status_code)).inc()
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow (RFC 9110 15.5.6)
        return response

    async def on_validation(request: Request, exc: Exception) -> Response:
        metrics.errors.labels("400").inc()
        assert isinstance(exc, RequestValidationError)
        return error_response(400, f"invalid request: {_describe(exc)}")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        metrics.errors.labels("500").inc()
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(BastionError, on_bastion)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


def _describe(exc: RequestValidationError) -> str:
    """Where and what, without echoing the (possibly huge) input back."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
