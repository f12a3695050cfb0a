"""Admin routes over incidents: list, show (with the timeline from the log), open, close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field
from starlette.responses import Response

from bastion.gateway.admin import AdminRoute, StrictBody, errors
from bastion.gateway.errors import InvalidInput, NotFound, Unavailable
from bastion.gateway.http import json_response
from bastion.gateway.incidents.database import DatabaseUnavailable
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.log import TamperedLog
from bastion.gateway.incidents.store import CLOSED, OPEN

T = TypeVar("T")
router = APIRouter(route_class=AdminRoute, tags=["admin"])
IncidentPath = Annotated[int, Path(ge=1, le=2**62)]
Subject = Annotated[str, Field(min_length=1, max_length=256)]
MAX_TIMELINE = 1000


class OpenBody(StrictBody):
    title: str = Field(min_length=1, max_length=200)
    subjects: list[Subject] = Field(default_factory=list, max_length=100)


class CloseBody(StrictBody):
    note: str | None = Field(None, max_length=1024)


def _incidents(request: Request) -> Grouper:
    grouper = getattr(request.app.state, "incidents", None)
    if grouper is None:
        raise Unavailable("the incident log is not open")
    return grouper


async def _in_thread(call: Callable[..., T], *args: Any) -> T:
    """``call`` off the event loop; the shared database away is a 503, not a 500."""
    try:
        return await asyncio.to_thread(call, *args)
    except DatabaseUnavailable as exc:
        raise Unavailable(f"the incident database cannot be reached now: {exc}") from None


def _show(grouper: Grouper, incident: int) -> dict[str, Any]:
    try:
        header = grouper.store.get(incident)
    except KeyError:
        raise NotFound(f"no incident {incident}") from None
    timeline = grouper.store.timeline(incident, MAX_TIMELINE)
    return {
        **header.to_json(),
        "subjects_shown": grouper.store.subjects(incident),
        "timeline": [entry.to_json() for entry in timeline],
    }


@router.get("/v2/admin/incidents", responses=errors(400, 403))
async def list_incidents(
    request: Request,
    state: Annotated[str | None, Query(pattern=f"^({OPEN}|{CLOSED})$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Incidents, newest first."""
    store = _incidents(request).store
    rows = await _in_thread(store.list, state, limit)
    return json_response({"incidents": [row.to_json() for row in rows]})


@router.get("/v2/admin/incidents/{incident}", responses=errors(400, 403, 404))
async def show_incident(request: Request, incident: IncidentPath) -> Response:
    """One incident, its subjects and its timeline (the log entries, oldest first)."""
    return json_response(await _in_thread(_show, _incidents(request), incident))


@router.post("/v2/admin/incidents", responses=errors(400, 403))
async def open_incident(request: Request, body: OpenBody) -> Response:
    """An admin opens an incident (logged); entries about its subjects join it."""
    grouper = _incidents(request)
    try:
        incident = await _in_thread(
            grouper.open, body.title, "admin", list(body.subjects), None, "admin"
        )
    except TamperedLog as exc:
        raise Unavailable(f"the incident log refuses appends: {exc}") from None
    return json_response(await _in_thread(_show, grouper, incident), 201)


@router.post("/v2/admin/incidents/{incident}/close", responses=errors(400, 403, 404))
async def close_incident(
    request: Request, incident: IncidentPath, body: CloseBody | None = None
) -> Response:
    """Closes an open incident (logged); later entries about its subjects open a new one."""
    grouper = _incidents(request)
    note = body.note if body is not None else None
    try:
        await _in_thread(grouper.close, incident, "admin", note)
    except KeyError:
        raise NotFound(f"no incident {incident}") from None
    except TamperedLog as exc:
        raise Unavailable(f"the incident log refuses appends: {exc}") from None
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return json_response(await _in_thread(_show, grouper, incident))


@router.get(
    "/v2/admin/incidents/{incident}/report",
    responses={
        **errors(400, 403, 404, 503),
        200: {
            "description": "The report: JSON, or the HTML page with ?format=html.",
            "content": {"application/json": {}, "text/html": {}},
        },
    },
)
async def incident_report(
    request: Request,
    incident: IncidentPath,
    format: Annotated[str, Query(pattern="^(json|html)$")] = "json",
) -> Response:
    """The impact report (``bastion incidents report``): JSON, or the HTML page. Read from
    the database the gateway keeps its log and ledger in: the SQLite files, or PostgreSQL."""
    from bastion.gateway.incidents.report import build, page

    settings = request.app.state.settings
    log_where = settings.database_url or settings.incident_log_path
    ledger_where = settings.database_url or settings.ledger_path
    try:
        report = await _in_thread(
            build, incident, log_where, ledger_where, settings.model_repository
        )
    except KeyError:
        raise NotFound(f"no incident {incident}") from None
    except FileNotFoundError as exc:
        raise Unavailable(str(exc)) from None
    data, html_page = await asyncio.to_thread(page, report)
    if format == "html":
        return Response(html_page, media_type="text/html; charset=utf-8")
    return Response(data, media_type="application/json")
