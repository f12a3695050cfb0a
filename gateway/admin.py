"""Admin routes (token required): screening thresholds and policy, and the quarantine store.

Thresholds are admin-only: knowing them is a head start for an adaptive attacker.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import InvalidInput, NotFound
from gateway.http import json_response, plane, require_admin
from gateway.protocol.codec import parse_json_object
from gateway.protocol.dtypes import from_numpy
from gateway.quarantine.store import QuarantineRecord
from gateway.repository import parse_version
from gateway.screening.policy import ACTIONS

router = APIRouter()


@router.get("/v2/models/{model}/screening")
@router.get("/v2/models/{model}/versions/{version}/screening")
async def screening(request: Request, model: str, version: str | None = None) -> Response:
    require_admin(request)
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
        "detectors": [d.name for d in job.detectors],
        "squeeze": {"bits": list(job.squeeze_spec.bits), "medians": list(job.squeeze_spec.medians)},
        "calibrated": calibration is not None,
    }
    if calibration is not None:
        body |= {
            "thresholds": calibration.thresholds,
            "combined_threshold": calibration.combined_threshold,
            "target_fpr": calibration.target_fpr,
            "calibration_fpr": calibration.calibration_fpr,
            "calibration_samples": calibration.samples,
            "calibration_meta": calibration.meta,
        }
    return json_response(body)


@router.post("/v2/models/{model}/screening/action")
async def set_action(request: Request, model: str) -> Response:
    """Changes what an adversarial verdict does for every loaded version, without a reload."""
    require_admin(request)
    action = (await _json_body(request)).get("action")
    if action not in ACTIONS:
        raise InvalidInput(f"action must be one of {list(ACTIONS)}")
    registry = plane(request).registry
    versions = [m for m in registry.loaded() if m.config.name == model]
    if not versions:
        registry.get(model)
    for loaded in versions:
        loaded.screening_action = action
    return json_response({"model": model, "action": action})


@router.get("/v2/quarantine")
async def list_quarantine(
    request: Request,
    model: str | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Response:
    require_admin(request)
    store = plane(request).screening.store
    try:
        records = store.list(model=model, status=status, limit=min(limit, 1000), offset=offset)
        total = store.count(model=model, status=status)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return json_response({"total": total, "items": [_record(r) for r in records]})


@router.get("/v2/quarantine/{item}")
async def get_quarantine(request: Request, item: str) -> Response:
    require_admin(request)
    record = plane(request).screening.store.get(item)
    if record is None:
        raise NotFound(f"no quarantine record {item!r}")
    return json_response(_record(record))


@router.post("/v2/quarantine/{item}/release")
async def release_quarantine(request: Request, item: str) -> Response:
    """Marks a record a false positive; it is kept, with its input, for recalibration."""
    require_admin(request)
    note = (await _json_body(request)).get("note")
    try:
        record = plane(request).screening.store.release(item, note)
    except KeyError:
        raise NotFound(f"no quarantine record {item!r}") from None
    return json_response(_record(record))


@router.post("/v2/quarantine/purge")
async def purge_quarantine(request: Request) -> Response:
    require_admin(request)
    body = await _json_body(request)
    older_than_s = body.get("older_than_s")
    cutoff = None if older_than_s is None else time.time() - float(older_than_s)
    try:
        purged = plane(request).screening.store.purge(
            status=body.get("status"), older_than=cutoff, ids=body.get("ids")
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return json_response({"purged": purged})


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    return parse_json_object(raw) if raw else {}


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
