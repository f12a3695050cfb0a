"""Admin routes over the route table: show, set weights and the safe version, roll back, forward.

Each change is written to the incident log first, and applied only once it is durable (503
and no change when the log cannot take it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import Field
from starlette.responses import Response

from bastion.gateway.admin import AdminRoute, StrictBody, errors
from bastion.gateway.errors import InvalidInput, NotFound, Unavailable
from bastion.gateway.http import json_response, plane
from bastion.gateway.incidents.audit import record as record_decision
from bastion.gateway.routing import MAX_VERSIONS, Route, RouteTable, entry_body, make_route

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


def _loaded(request: Request, model: str) -> set[int]:
    """The loaded versions of ``model``; 404 for a model with none."""
    versions = {m.version for m in plane(request).registry.loaded() if m.config.name == model}
    if not versions:
        raise NotFound(f"model {model!r} has no loaded version")
    return versions


async def _apply(request: Request, kind: str, model: str, route: Route | None) -> Response:
    """Logs the change (durable, else 503 and nothing changes), then applies it."""
    await record_decision(request, kind, model, entry_body(model, route))
    _table(request).set(model, route, audit=False)
    body = (
        {"model": model, "deleted": True} if route is None else {"model": model, **route.to_json()}
    )
    return json_response(body)


@router.get("/v2/admin/routes", responses=errors(403))
async def list_routes(request: Request) -> Response:
    routes = _table(request).routes()
    return json_response({"routes": {model: r.to_json() for model, r in routes.items()}})


@router.get("/v2/admin/routes/{model}", responses=errors(403, 404))
async def show_route(request: Request, model: ModelPath) -> Response:
    route = _table(request).routes().get(model)
    if route is None:
        raise NotFound(f"no route for model {model!r}")
    return json_response({"model": model, **route.to_json()})


@router.put("/v2/admin/routes/{model}", responses=errors(400, 403, 404))
async def set_route(request: Request, model: ModelPath, body: RouteBody) -> Response:
    """Weights per loaded version (a canary) and the pinned safe version, for requests that
    name no version; a request in flight keeps the version it started on."""
    try:
        route = make_route({int(v): w for v, w in body.weights.items()}, body.safe)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    loaded = _loaded(request, model)
    named = set(route.weights) | ({route.safe} if route.safe is not None else set())
    if not named <= loaded:
        raise InvalidInput(
            f"model {model!r} has no loaded version {sorted(named - loaded)} "
            f"(loaded: {sorted(loaded)})"
        )
    current = _table(request).routes().get(model)
    if current is not None and current.rolled_back:  # new weights do not undo a rollback
        route = replace(route, rolled_back=current.rolled_back, strict=current.strict)
    return await _apply(request, "route_change", model, route)


@router.delete("/v2/admin/routes/{model}", responses=errors(403, 404))
async def delete_route(request: Request, model: ModelPath) -> Response:
    """Requests naming no version go to the latest again."""
    if model not in _table(request).routes():
        raise NotFound(f"no route for model {model!r}")
    return await _apply(request, "route_change", model, None)


@router.post("/v2/admin/routes/{model}/rollback", responses=errors(400, 403, 404))
async def rollback(
    request: Request, model: ModelPath, body: RollbackBody | None = None
) -> Response:
    """All of the model's traffic to its safe version, strict mode on."""
    table = _table(request)
    current = table.routes().get(model)
    if current is None:
        raise NotFound(f"no route for model {model!r}")
    if current.safe is None:
        raise InvalidInput(f"model {model!r} has no safe version to roll back to")
    if current.rolled_back is not None:
        raise InvalidInput(f"model {model!r} is rolled back already: {current.rolled_back}")
    reason = body.reason if body is not None else RollbackBody().reason
    route = table.rolled_back(model, reason)
    assert route is not None
    return await _apply(request, "rollback", model, route)


@router.post("/v2/admin/routes/{model}/forward", responses=errors(400, 403, 404))
async def roll_forward(request: Request, model: ModelPath) -> Response:
    """Back to the route's weights (the fix is in), strict mode off."""
    current = _table(request).routes().get(model)
    if current is None:
        raise NotFound(f"no route for model {model!r}")
    if current.rolled_back is None:
        raise InvalidInput(f"model {model!r} is not rolled back")
    return await _apply(
        request, "route_change", model, replace(current, rolled_back=None, strict=False)
    )
