"""Admin routes over the containment ladder: who is contained, with what evidence; lift it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from bastion.gateway.admin import AdminRoute, errors
from bastion.gateway.defence.evidence import RUNGS
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.errors import NotFound
from bastion.gateway.http import json_response, plane
from bastion.gateway.incidents.audit import record as record_decision

router = APIRouter(route_class=AdminRoute, tags=["admin"])
ClientPath = Annotated[str, Path(min_length=1, max_length=128)]
MAX_LIST = 1000
MAX_MEMBERS = 100


def _defence(request: Request) -> DefenceService:
    defence = plane(request).defence
    if defence is None:
        raise NotFound("the stateful defence is off (BASTION_DEFENCE)")
    return defence


def _utc(epoch: float | None) -> str | None:
    """An epoch time (s) as ISO 8601 UTC, for people; None stays None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def describe(defence: DefenceService, client: str) -> dict[str, Any]:
    """What the ladder knows of a client: its rung and why (its own statistic, its probes
    among the last ``window`` images, its campaign's rung and pooled statistic, and whether
    the campaign's rung binds it)."""
    ladder = defence.ladder
    account = ladder.account(client)
    if account is None:
        raise NotFound(f"no evidence about client {client!r}")
    campaign = ladder.campaign(client)
    return {
        "client": client,
        "rung": ladder.rung(client),
        "statistic": account.statistic,
        "campaign_rung": ladder.campaign_rung(client),
        "campaign_statistic": ladder.campaign_statistic(client),
        "bound": ladder.bound(client),
        "images": account.images,
        "flagged": account.flagged,
        "probes": account.probes,
        "recent_probes": account.window.count(ladder.spec.window),
        "last_seen": account.last_seen,
        "last_seen_utc": _utc(account.last_seen),
        "released_at": account.released_at,
        "released_at_utc": _utc(account.released_at),
        "campaign_size": len(campaign),
        "campaign": campaign[:MAX_MEMBERS],
    }


@router.get("/v2/admin/clients", responses=errors(400, 403, 404))
async def list_clients(
    request: Request,
    rung: Annotated[str | None, Query(pattern="^(" + "|".join(RUNGS) + ")$")] = None,
    limit: Annotated[int, Query(ge=0, le=MAX_LIST)] = 100,
) -> Response:
    """Tracked clients, most recently seen first; ``rung`` keeps those on one rung."""
    defence = _defence(request)
    with defence.lock:
        rows = [describe(defence, c) for c in defence.ladder.clients()]
    if rung is not None:
        rows = [r for r in rows if r["rung"] == rung]
    return json_response({"clients": [{**r, "campaign": None} for r in rows[:limit]]})


@router.get("/v2/admin/clients/{client:path}", responses=errors(400, 403, 404))
async def show_client(request: Request, client: ClientPath) -> Response:
    defence = _defence(request)
    with defence.lock:
        return json_response(describe(defence, client))


@router.post("/v2/admin/clients/{client:path}/release", responses=errors(400, 403, 404))
async def release_client(request: Request, client: ClientPath) -> Response:
    """Lifts containment from the client and every client of its campaign (logged)."""
    defence = _defence(request)
    with defence.lock:
        before = describe(defence, client)  # 404 for a client with no evidence
        released = defence.release(client)
    evidence = {k: before[k] for k in ("rung", "statistic", "campaign_statistic", "probes")}
    body = {"released": released[:MAX_MEMBERS], "count": len(released), "before": evidence}
    await record_decision(request, "release", client, body)
    return json_response({"released": released})
