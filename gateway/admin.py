"""Admin routes (token required): screening thresholds and policy, and the quarantine store.

Thresholds are admin-only: knowing them is a head start for an adaptive attacker.

Every route checks the token before it reads anything of the request (``AdminRoute``), and every
body and query is one pydantic model with bounded, typed fields that forbids unknown keys: a
value of the wrong type or size fails validation, which the app's handler answers with 400 in
the protocol's ``{"error": "..."}`` format, never a 500 from deep inside the store. All routes are
tagged ``admin``, so the public OpenAPI document can leave them out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.responses import Response

from bastion.gateway.errors import InvalidInput, NotFound
from bastion.gateway.http import json_response, plane, require_admin
from bastion.gateway.incidents.audit import record as record_decision
from bastion.gateway.protocol.dtypes import from_numpy
from bastion.gateway.protocol.schema import error
from bastion.gateway.quarantine.store import QUARANTINED, RELEASED, REVIEW, QuarantineRecord, Stats
from bastion.gateway.registry import LoadedModel
from bastion.gateway.repository import parse_version
from bastion.gateway.screening.calibration import Calibration, threshold
from bastion.gateway.screening.policy import ACTIONS, ADVERSARIAL, SUSPICIOUS

ID_CHARS = 64  # ids are 32 hex digits; some slack for a future id scheme
MAX_IDS = 1000
MAX_LIMIT = 1000
MAX_OFFSET = 2**53  # exact as a JSON number in every client; far below SQLite's int64
NAME_CHARS = 256
TOP_CLIENTS = 10

Status = Literal[QUARANTINED, RELEASED, REVIEW]  # type: ignore[valid-type]
Action = Literal[ACTIONS]  # type: ignore[valid-type]
RecordId = Annotated[str, StringConstraints(min_length=1, max_length=ID_CHARS)]
ItemPath = Annotated[str, Path(min_length=1, max_length=ID_CHARS)]
ModelPath = Annotated[str, Path(min_length=1, max_length=NAME_CHARS)]


class StrictBody(BaseModel):
    """JSON bodies: no coercion (``"5"`` is not a number, ``1`` is not a string)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ActionBody(StrictBody):
    action: Action


class ReleaseBody(StrictBody):
    note: str | None = Field(None, description="At most max_note_chars (default 1024).")


class PurgeBody(StrictBody):
    status: Status | None = None
    older_than_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    ids: list[RecordId] | None = Field(None, max_length=MAX_IDS)

    @model_validator(mode="after")
    def _has_a_filter(self) -> PurgeBody:
        """An empty admin form must not wipe the evidence (the store refuses it too)."""
        if self.status is None and self.older_than_s is None and self.ids is None:
            raise ValueError("purge needs at least one of status, older_than_s, ids")
        return self


class ListQuery(BaseModel):
    """Query strings are text, so numbers are parsed (not strict), but still bounded."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1, max_length=NAME_CHARS)
    status: Status | None = None
    limit: int = Field(100, ge=0, le=MAX_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=``: the listed statuses, plus ``default`` (an unexpected 500; it also
    keeps FastAPI from documenting a 422 that this app never sends)."""
    text = {
        400: "Invalid body, query or path (type, range, length, unknown key)",
        403: "Missing or wrong admin token, or admin actions disabled",
        404: "No such model or quarantine record",
        503: "The incident log or a store cannot take the change now",
    }
    out: dict[int | str, dict[str, Any]] = {s: error(text[s]) for s in statuses}
    out["default"] = error("Unexpected error")
    return out


class AdminRoute(APIRoute):
    """Checks the admin token before FastAPI reads or validates anything of the request, so an
    anonymous caller learns nothing of the admin schemas from validation errors."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            require_admin(request)
            return await handler(request)

        return guarded


router = APIRouter(route_class=AdminRoute, tags=["admin"])


@router.get("/v2/models/{model}/screening", responses=errors(400, 403, 404))
@router.get("/v2/models/{model}/versions/{version}/screening", responses=errors(400, 403, 404))
async def screening(request: Request, model: ModelPath, version: str | None = None) -> Response:
    loaded = plane(request).registry.get(model, parse_version(version))
    job = loaded.backend.screening
    if job is None:
        return json_response({"model": model, "version": str(loaded.version), "enabled": False})
    calibration = job.calibration
    body: dict[str, Any] = {
        "model": model,
        "version": str(loaded.version),
        "enabled": True,
        "action": loaded.screening_action,
        "review_action": loaded.screening_review,
        "detectors": [d.name for d in job.detectors],
        "squeeze": {"bits": list(job.squeeze_spec.bits), "medians": list(job.squeeze_spec.medians)},
        "mahalanobis_layer": job.gaussian.layer if job.gaussian is not None else None,
        "calibrated": calibration is not None,
    }
    if calibration is not None and job.targets is not None:
        body |= {
            "combiner": calibration.rule,
            "tiers": tiers(calibration, job.targets, loaded),
            "smallest_fpr": calibration.smallest_fpr,
            "calibration_samples": calibration.samples,
            "calibration_meta": calibration.meta,
        }
    return json_response(body)


def tiers(
    calibration: Calibration, targets: dict[str, float], loaded: LoadedModel
) -> dict[str, dict[str, Any]]:
    """Per verdict tier: its target FPR, threshold on the combined score, what it does, and the
    FPR realised on the calibration split and (when calibrate had one) the held-out test split."""
    actions = {ADVERSARIAL: loaded.screening_action, SUSPICIOUS: loaded.screening_review}
    out = {}
    for tier, target in targets.items():
        key = repr(target)
        out[tier] = {
            "target_fpr": target,
            "threshold": threshold(target),
            "action": actions[tier],
            "calibration_fpr": calibration.calibration_fpr.get(key),
            "test": calibration.test.get(key),
        }
    return out


@router.post("/v2/models/{model}/screening/action", responses=errors(400, 403, 404))
async def set_action(request: Request, model: ModelPath, body: ActionBody) -> Response:
    """Changes what an adversarial verdict does for every loaded version, without a reload."""
    registry = plane(request).registry
    versions = [m for m in registry.loaded() if m.config.name == model]
    if not versions:
        registry.get(model)
    for loaded in versions:
        loaded.screening_action = body.action
    return json_response({"model": model, "action": body.action})


@router.get("/v2/quarantine", responses=errors(400, 403))
async def list_quarantine(request: Request, query: Annotated[ListQuery, Query()]) -> Response:
    store = plane(request).screening.store

    def page() -> tuple[list[QuarantineRecord], int]:
        records = store.list(
            model=query.model, status=query.status, limit=query.limit, offset=query.offset
        )
        return records, store.count(model=query.model, status=query.status)

    records, total = await asyncio.to_thread(page)
    return json_response({"total": total, "items": [_record(r) for r in records]})


# before ``/v2/quarantine/{item}``, which would otherwise take "stats" for an id
@router.get("/v2/quarantine/stats", responses=errors(403))
async def quarantine_stats(request: Request) -> Response:
    """Totals by status and model, stored bytes, age range, the top clients, quotas and drops."""
    screening = plane(request).screening
    stats = await asyncio.to_thread(screening.store.stats, TOP_CLIENTS)
    screening.publish_usage(stats.usage)
    return json_response(_stats(stats))


@router.get("/v2/quarantine/{item}", responses=errors(400, 403, 404))
async def get_quarantine(request: Request, item: ItemPath) -> Response:
    record = await asyncio.to_thread(plane(request).screening.store.get, item)
    if record is None:
        raise NotFound(f"no quarantine record {item!r}")
    return json_response(_record(record))


@router.post("/v2/quarantine/{item}/release", responses=errors(400, 403, 404))
async def release_quarantine(
    request: Request, item: ItemPath, body: ReleaseBody | None = None
) -> Response:
    """Marks a record a false positive; it is kept, with its input, for recalibration."""
    note = body.note if body is not None else None
    limit = plane(request).settings.max_note_chars  # a setting, so checked here, not in the model
    if note is not None and len(note) > limit:
        raise InvalidInput(f"invalid request: body.note: longer than {limit} characters")
    try:
        record = await asyncio.to_thread(plane(request).screening.store.release, item, note)
    except KeyError:
        raise NotFound(f"no quarantine record {item!r}") from None
    await record_decision(request, "quarantine_release", item, {"note": note})
    return json_response(_record(record))


@router.post("/v2/quarantine/purge", responses=errors(400, 403))
async def purge_quarantine(request: Request, body: PurgeBody) -> Response:
    cutoff = None if body.older_than_s is None else time.time() - body.older_than_s
    store = plane(request).screening.store
    purged = await asyncio.to_thread(store.purge, body.status, cutoff, body.ids)
    ids = None if body.ids is None else list(body.ids)
    scope = {"status": body.status, "older_than_s": body.older_than_s, "ids": ids and ids[:100]}
    scope["id_count"] = None if ids is None else len(ids)
    await record_decision(request, "quarantine_purge", "quarantine", {**scope, "purged": purged})
    return json_response({"purged": purged})


def _stats(stats: Stats) -> dict[str, Any]:
    usage = stats.usage
    return {
        "records": usage.records,
        "bytes": usage.bytes,
        "by_status": stats.by_status,
        "by_model": stats.by_model,
        "oldest": stats.oldest,
        "newest": stats.newest,
        "top_clients": [{"client_id": c, "records": n} for c, n in stats.top_clients],
        "quota": dataclasses.asdict(stats.quota),
        "over_quota": usage.over_quota,
        "dropped": usage.dropped,
    }


def _record(record: QuarantineRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: getattr(record, key)
        for key in (
            "id",
            "created_at",
            "model",
            "version",
            "client_id",
            "request_id",
            "image_index",
            "scores",
            "thresholds",
            "verdict",
            "status",
            "released_at",
            "note",
        )
    }
    if record.input is not None:
        out["input"] = {
            "datatype": from_numpy(record.input.dtype).v2,
            "shape": list(record.input.shape),
            "data": record.input.ravel().tolist(),
        }
    return out
