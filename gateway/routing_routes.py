"""Admin routes over the route table: show, set weights and the safe version, roll back, forward.

Each change is written to the incident log before the response is sent.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import Field
from starlette.responses import Response

from gateway.admin import AdminRoute, StrictBody, errors
from gateway.errors import InvalidInput, NotFound, Unavailable
from gateway.http import json_response
from gateway.routing import MAX_VERSIONS, RouteTable, make_route

router = APIRouter(route_class=AdminRoute, tags=["admin"])
ModelPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
VersionKey = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,8}$")]


class RouteBody(StrictBody):
    weights: dict[VersionKey, float] = Field(min_length=1, max_length=MAX_VERSIONS)
    safe: int | None = Field(None, ge=1, le=999_999_999)


class RollbackBody(StrictBody):
    reason: str = Field("rolled back by an admin", min_length=1, max_length=200)


def _table(request: Request) -> RouteTable:
    table = getattr(request.app.state, "routes", None)
    if table is None:
        raise Unavailable("the route table is not ready")
    return table


async def _durable(request: Request) -> None:
    """Waits until the change's log entry is written (the table logs through the writer)."""
    await asyncio.to_thread(request.app.state.log_writer.flush)


@router.get("/v2/admin/routes", responses=errors(403))
async def list_routes(request: Request) -> Response:
    routes = _table(request).routes()
    return json_response({"routes": {model: r.to_json() for model, r in routes.items()}})


@router.put("/v2/admin/routes/{model}", responses=errors(400, 403))
async def set_route(request: Request, model: ModelPath, body: RouteBody) -> Response:
    """Weights per version (a canary) and the pinned safe version, for requests that name no
    version; a request in flight keeps the version it started on."""
    try:
        route = make_route({int(v): w for v, w in body.weights.items()}, body.safe)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    _table(request).set(model, route, "admin")
    await _durable(request)
    return json_response({"model": model, **route.to_json()})


@router.post("/v2/admin/routes/{model}/rollback", responses=errors(400, 403, 404))
async def rollback(
    request: Request, model: ModelPath, body: RollbackBody | None = None
) -> Response:
    """All of the model's traffic to its safe version, strict mode on."""
    table = _table(request)
    if model not in table.routes():
        raise NotFound(f"no route for model {model!r}")
    reason = body.reason if body is not None else RollbackBody().reason
    if table.rollback(model, reason, "admin") is None:
        raise InvalidInput(f"model {model!r} has no safe version or is rolled back already")
    await _durable(request)
    return json_response({"model": model, **table.routes()[model].to_json()})


@router.post("/v2/admin/routes/{model}/forward", responses=errors(400, 403, 404))
async def roll_forward(request: Request, model: ModelPath) -> Response:
    """Back to the route's weights (the fix is in), strict mode off."""
    try:
        route = _table(request).roll_forward(model, "admin")
    except KeyError:
        raise NotFound(f"no route for model {model!r}") from None
    await _durable(request)
    return json_response({"model": model, **route.to_json()})
