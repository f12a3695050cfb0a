"""Durable storage for inputs the screening policy quarantines, and the admin operations on them."""

from bastion.gateway.quarantine.postgres import PostgresQuarantineStore
from bastion.gateway.quarantine.sqlite import SQLiteQuarantineStore
from bastion.gateway.quarantine.store import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    DROP_REASONS,
    QUARANTINED,
    RECORDS_QUOTA,
    RELEASED,
    REVIEW,
    STATUSES,
    Caps,
    NewItem,
    QuarantineRecord,
    QuarantineStore,
    Quota,
    Stats,
    Usage,
)

__all__ = [
    "BYTES_QUOTA",
    "CLIENT_QUOTA",
    "DROP_REASONS",
    "QUARANTINED",
    "RECORDS_QUOTA",
    "RELEASED",
    "REVIEW",
    "STATUSES",
    "Caps",
    "NewItem",
    "PostgresQuarantineStore",
    "QuarantineRecord",
    "QuarantineStore",
    "Quota",
    "SQLiteQuarantineStore",
    "Stats",
    "Usage",
]
