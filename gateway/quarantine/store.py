"""The quarantine store contract: what the gateway writes and the admin API reads.

Kept small on purpose so that two stores implement it: SQLite (``sqlite.py``, a file beside the
gateway) and PostgreSQL (``postgres.py``, one store shared by every replica): plain records in,
plain records out, no backend types leaking through.

Anyone who can send a request can make the gateway write here, so the store bounds itself:
every stored string is capped (``Caps``) and the number and size of records are capped
(``Quota``). Both are enforced by the store, whatever its callers already checked.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import numpy as np

QUARANTINED: Final = "quarantined"
RELEASED: Final = "released"
REVIEW: Final = "review"
"""A served input the screening found suspicious, kept as evidence (never released)."""
STATUSES: Final = frozenset({QUARANTINED, RELEASED, REVIEW})

RECORDS_QUOTA: Final = "records_quota"
BYTES_QUOTA: Final = "bytes_quota"
CLIENT_QUOTA: Final = "client_quota"
DROP_REASONS: Final = (RECORDS_QUOTA, BYTES_QUOTA, CLIENT_QUOTA)
"""Why a record was dropped, in the order the checks run: the global quotas first, so the
alarm names the store being full rather than whichever client happened to hit it."""

TRUNCATED: Final = "…"
"""Ends a string the store cut to its cap, so a reader can tell a cut value from a real one."""


@dataclass(frozen=True)
class Quota:
    """How much the store keeps; defaults match ``Settings``.

    When a quota is reached, NEW records are dropped (and counted); old ones are never evicted
    to make room, so an attacker cannot flush the evidence of an attack by flooding the store.
    Retention by age and admin purges are the only ways records leave.

    ``max_bytes`` counts stored input bytes (the encoded tensor). The other columns are capped
    strings, so they add at most a few KiB per record on top.
    ``max_records_per_client`` counts released records too; all records without a client id
    share one bucket, so leaving the header out buys no extra room. Client ids are chosen by
    the client, so the per-client quota only slows down one identity; the global quotas are
    the bound that holds.
    """

    max_records: int = 100_000
    max_records_per_client: int = 1_000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if min(self.max_records, self.max_records_per_client, self.max_bytes) < 1:
            raise ValueError(f"every quota must be >= 1, got {self}")


@dataclass(frozen=True)
class Caps:
    """Longest stored string per field, in characters; defaults match ``Settings``.

    A longer value is truncated, not refused: the store is the last line of defence (the
    transport and the admin API refuse over-long values with 400 before they get here), and
    refusing would lose the record of a withheld input. A cut value keeps its first
    ``cap - 1`` characters and ends with ``TRUNCATED``.
    """

    client_id_chars: int = 128
    request_id_chars: int = 256
    note_chars: int = 1024
    name_chars: int = 256  # model, version, verdict, detector names: from the repository

    def __post_init__(self) -> None:
        if min(self.client_id_chars, self.request_id_chars, self.note_chars, self.name_chars) < 1:
            raise ValueError(f"every cap must be >= 1, got {self}")


def cap(value: str | None, chars: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= chars else text[: chars - 1] + TRUNCATED


@dataclass(frozen=True, eq=False)
class NewItem:
    """One flagged input as the screening path hands it over; the store assigns id and time.

    ``eq=False`` because comparing ndarrays field by field has no single truth value.
    """

    model: str
    version: str
    client_id: str | None
    request_id: str | None
    image_index: int
    input: np.ndarray
    scores: dict[str, float]
    thresholds: dict[str, float]
    verdict: str
    status: str = QUARANTINED  # or REVIEW for a served suspicious input


@dataclass(frozen=True, eq=False)
class QuarantineRecord:
    """A stored item.

    ``input`` is the exact tensor (dtype, shape and bytes as received) or ``None`` when the
    record came from ``list(include_input=False)``: ``None`` cannot be mistaken for a real,
    empty tensor, and listing stays cheap because the blob is never read.
    """

    id: str
    created_at: float
    model: str
    version: str
    client_id: str | None
    request_id: str | None
    image_index: int
    input: np.ndarray | None
    scores: dict[str, float]
    thresholds: dict[str, float]
    verdict: str
    status: str
    released_at: float | None
    note: str | None


@dataclass(frozen=True)
class Usage:
    """Cheap to read (no scan): what the metrics mirror after every write and sweep.

    ``over_quota`` is true while a global quota is reached, and stays true after a record was
    dropped for a global quota until records are deleted (a smaller input may still fit, but
    evidence has been lost and someone should look). ``dropped`` counts by reason since this
    store object was opened (every reason present, zeros included).
    """

    records: int
    bytes: int
    over_quota: bool
    dropped: dict[str, int]


@dataclass(frozen=True)
class Stats:
    """A summary for operators; costs scans of the indexes, so admin-only."""

    usage: Usage
    quota: Quota
    by_status: dict[str, int]
    by_model: dict[str, int]
    oldest: float | None
    newest: float | None
    top_clients: builtins.list[tuple[str | None, int]]  # most records first, bounded


@runtime_checkable
class QuarantineStore(Protocol):
    """Durable storage for quarantined inputs.

    Semantics every implementation keeps:

    - ``add_many`` writes the kept items of one request in one transaction and returns, in item
      order, the id of each stored item (uuid4 hex) or ``None`` for an item dropped by a quota,
      only after the commit is durable. Quotas are checked inside that transaction, so
      concurrent writers (threads, processes or replicas) never overshoot. A dropped item's
      input is still withheld by the caller: the store only decides whether it keeps the
      evidence. When the store cannot commit (its database away) ``add_many`` raises (an
      ``OSError`` for PostgreSQL) and no id exists to name: the caller must refuse the request
      rather than acknowledge a record it does not have.
    - Strings longer than their ``Caps`` are truncated, never refused.
    - ``list`` is newest first (``created_at``, then insertion order); filters combine with AND.
    - ``release`` raises ``KeyError`` for an unknown id; releasing again changes nothing and
      returns the record as first released. Released records keep their input.
    - ``purge`` deletes rows matching all given filters; ``older_than`` is a unix timestamp
      (rows with ``created_at < older_than``); with no filter at all it raises ``ValueError``
      so an empty admin form cannot wipe the evidence.
    - ``expire`` deletes at most ``max_rows`` of the oldest rows older than ``older_than`` in
      one transaction (the retention sweep calls it until it returns less than ``max_rows``, so
      writers never wait behind one huge delete).
    - ``usage`` is O(1); ``stats`` may scan indexes.
    - An unknown ``status`` filter, or a negative ``limit``/``offset``, raises ``ValueError``.
    """

    def add_many(self, items: Sequence[NewItem]) -> builtins.list[str | None]: ...

    def get(self, id: str) -> QuarantineRecord | None: ...

    def list(
        self,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        include_input: bool = False,
    ) -> builtins.list[QuarantineRecord]: ...

    def count(self, model: str | None = None, status: str | None = None) -> int: ...

    def status_usage(self, status: str) -> tuple[int, int]:
        """(records, input bytes) of one status, read from an index."""
        ...

    def release(self, id: str, note: str | None = None) -> QuarantineRecord: ...

    def purge(
        self,
        status: str | None = None,
        older_than: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int: ...

    def expire(self, older_than: float, max_rows: int = 1000) -> int: ...

    def usage(self) -> Usage: ...

    def stats(self, top_clients: int = 10) -> Stats: ...

    def close(self) -> None: ...


def check_status(status: str | None) -> None:
    """Rejects a status filter that could only ever match nothing (a typo in the admin API)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {sorted(STATUSES)}")


MAX_PAGE: Final = 2**63 - 1
"""SQLite's largest integer: a larger ``limit`` or ``offset`` cannot even be bound."""


def check_page(limit: int, offset: int) -> None:
    if not (0 <= limit <= MAX_PAGE and 0 <= offset <= MAX_PAGE):
        raise ValueError(
            f"limit and offset must be in [0, 2**63 - 1], got limit={limit}, offset={offset}"
        )
