"""Admin routes for client API keys: create (the key is returned once), list, revoke."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import Field
from starlette.responses import Response

from bastion.gateway.admin import AdminRoute, StrictBody, errors
from bastion.gateway.errors import InvalidInput, NotFound
from bastion.gateway.http import json_response
from bastion.gateway.identity.keys import CLIENT_NAME, NOTE_CHARS, KeyRecord, KeyRing
from bastion.gateway.incidents.audit import record as record_decision

router = APIRouter(route_class=AdminRoute, tags=["admin"])
KeyPath = Annotated[str, Path(min_length=12, max_length=12, pattern="^[0-9a-f]{12}$")]


class CreateKeyBody(StrictBody):
    client: str = Field(min_length=1, max_length=128, pattern=CLIENT_NAME.pattern)
    note: str | None = Field(None, max_length=NOTE_CHARS)


def _ring(request: Request) -> KeyRing:
    return request.app.state.keys


def _record(record: KeyRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(record), "active": record.active}


@router.post("/v2/admin/keys", responses=errors(400, 403))
async def create_key(request: Request, body: CreateKeyBody) -> Response:
    """A new key for a client. The response is the only place the key ever appears."""
    try:
        record, key = await asyncio.to_thread(_ring(request).create, body.client, body.note)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    await record_decision(request, "key_created", record.id, {"client": record.client})
    return json_response({**_record(record), "key": key}, 201)


@router.get("/v2/admin/keys", responses=errors(403))
async def list_keys(request: Request) -> Response:
    records = await asyncio.to_thread(_ring(request).store.list)
    return json_response({"keys": [_record(r) for r in records]})


@router.post("/v2/admin/keys/{key}/revoke", responses=errors(400, 403, 404))
async def revoke_key(request: Request, key: KeyPath) -> Response:
    """Revokes a key at once in this gateway (others re-read the keys every keys_refresh_s)."""
    try:
        record = await asyncio.to_thread(_ring(request).revoke, key)
    except KeyError:
        raise NotFound(f"no key {key!r}") from None
    await record_decision(request, "key_revoked", record.id, {"client": record.client})
    return json_response(_record(record))
