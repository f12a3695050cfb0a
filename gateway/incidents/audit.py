"""Admin actions recorded in the incident log before their response is sent."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from hashlib import sha256
from typing import Any

from fastapi import Request

from bastion.gateway.errors import Unavailable
from bastion.gateway.incidents.log import BODY_BYTES, IncidentLog, TamperedLog, canonical

log = logging.getLogger(__name__)


def fitted(body: dict[str, Any]) -> dict[str, Any]:
    """The body, or when it is over the log's bound a digest of it (its SHA-256, its size and
    its scalar fields): an admin's action is always recorded, never refused for its size."""
    text = canonical(body)
    if len(text) <= BODY_BYTES // 2:
        return body
    scalars = {k: v for k, v in body.items() if isinstance(v, int | float | bool) or v is None}
    return {**scalars, "truncated": True, "bytes": len(text), "sha256": sha256(text).hexdigest()}


async def record(request: Request, kind: str, subject: str, body: dict[str, Any]) -> None:
    """``append_decision`` to the app's incident log (see there)."""
    await append_decision(getattr(request.app.state, "incident_log", None), kind, subject, body)


async def append_decision(
    incident_log: IncidentLog | None, kind: str, subject: str, body: dict[str, Any]
) -> None:
    """Appends an admin's decision (in a thread: an append is an fsync'd commit) and waits for
    it to be durable. Raises ``Unavailable`` (503) when the log cannot take it: the action was
    done, and the caller must know it went unrecorded."""
    if incident_log is None:
        return
    try:
        await asyncio.to_thread(incident_log.append, kind, subject, fitted(body), "admin")
    except (sqlite3.Error, OSError, TamperedLog) as exc:
        log.exception("could not record %s for %s in the incident log", kind, subject)
        raise Unavailable(
            f"done, but not recorded in the incident log ({type(exc).__name__}); "
            "check its disk and run 'bastion incidents verify'"
        ) from exc
