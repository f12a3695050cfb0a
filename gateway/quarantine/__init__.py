"""Durable storage for inputs the screening policy quarantines, and the admin operations on them."""

from gateway.quarantine.sqlite import SQLiteQuarantineStore
from gateway.quarantine.store import (
    QUARANTINED,
    RELEASED,
    STATUSES,
    NewItem,
    QuarantineRecord,
    QuarantineStore,
)

__all__ = [
    "QUARANTINED",
    "RELEASED",
    "STATUSES",
    "NewItem",
    "QuarantineRecord",
    "QuarantineStore",
    "SQLiteQuarantineStore",
]
