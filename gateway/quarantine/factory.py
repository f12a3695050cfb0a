"""Builds the quarantine store and its retention sweep from ``Settings`` (for ``app.py``).

A SQLite file beside the gateway by default; PostgreSQL, shared by every replica, when
``database_url`` is set (its schema migrated on open). Opening is blocking I/O (network, for
PostgreSQL): call it before serving, or from a thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.gateway.quarantine.retention import RetentionSweep
from bastion.gateway.quarantine.sqlite import SQLiteQuarantineStore
from bastion.gateway.quarantine.store import Caps, QuarantineStore, Quota, Usage

if TYPE_CHECKING:
    from bastion.gateway.quarantine.postgres import PostgresQuarantineStore
    from bastion.gateway.settings import Settings


def open_store(settings: Settings) -> SQLiteQuarantineStore | PostgresQuarantineStore:
    quota = Quota(
        max_records=settings.quarantine_max_records,
        max_records_per_client=settings.quarantine_max_records_per_client,
        max_bytes=settings.quarantine_max_bytes,
    )
    caps = Caps(
        client_id_chars=settings.max_client_id_chars,
        request_id_chars=settings.max_request_id_chars,
        note_chars=settings.max_note_chars,
    )
    if settings.database_url:
        from bastion.gateway.quarantine.postgres import PostgresQuarantineStore

        return PostgresQuarantineStore(settings.database_url, quota=quota, caps=caps)
    return SQLiteQuarantineStore(settings.quarantine_path, quota=quota, caps=caps)


def retention_sweep(
    store: QuarantineStore, settings: Settings, publish: Callable[[Usage], None]
) -> RetentionSweep:
    return RetentionSweep(
        store,
        settings.quarantine_retention_s,
        settings.quarantine_retention_interval_s,
        publish,
    )
