"""The built-in dashboard: one page, its assets and the JSON it polls, all served by Bastion.

Nothing is fetched from elsewhere (a Content-Security-Policy of ``'self'`` enforces it), so the
page works on an air-gapped host. The charts are uPlot (MIT, vendored in
``monitoring/static``).
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response

from bastion.gateway.errors import NotFound
from bastion.gateway.http import json_response, plane
from bastion.gateway.identity.caller import token_matches
from bastion.gateway.protocol.schema import error

router = APIRouter()
STATIC = Path(__file__).parent / "monitoring" / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
_ASSETS = ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css")
_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'",
    "x-content-type-options": "nosniff",
}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _file(name: str) -> Response:
    media = _TYPES[Path(name).suffix]
    return Response(_read(name), media_type=media, headers=_HEADERS)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> Response:
    return _file("index.html")


@router.get(
    "/dashboard/assets/{name}",
    response_class=Response,
    responses={
        200: {
            "description": "A script or style sheet of the page",
            "content": {"text/javascript": {}, "text/css": {}},
        },
        404: error("No such asset."),
    },
)
async def asset(name: str) -> Response:
    if name not in _ASSETS:  # a fixed list: no path ever reaches the file system
        raise NotFound(f"no dashboard asset {name!r}")
    return _file(name)


INCIDENTS_SHOWN = 10


@router.get("/dashboard/api/summary")
async def summary(request: Request) -> Response:
    """Recent per-second rates and quantiles, and each monitored model's drift state."""
    loaded = plane(request).registry.loaded()
    monitors = [m.drift for m in loaded if m.drift is not None]
    # snapshots briefly take each monitor's lock, which a batch may hold: off the event loop
    snapshots = await asyncio.to_thread(lambda: [monitor.snapshot() for monitor in monitors])
    unmonitored = [
        {"model": m.config.name, "version": str(m.version)} for m in loaded if m.drift is None
    ]
    settings = plane(request).settings
    authorization = request.headers.get("authorization", "")
    private = any(  # the tiers are an oracle for a prober: only for the operators' tokens
        token and token_matches(authorization, token)
        for token in (settings.metrics_token, settings.admin_token)
    )
    series = request.app.state.sampler.series(private=private)
    body: dict[str, Any] = {"series": series, "models": snapshots + unmonitored}
    grouper = getattr(request.app.state, "incidents", None)
    if private and grouper is not None:  # whether it was detected is no prober's business
        rows = await asyncio.to_thread(grouper.store.list, None, INCIDENTS_SHOWN)
        body["incidents"] = [row.to_json() for row in rows]
    return json_response(body)
