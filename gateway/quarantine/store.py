"""The quarantine store contract: what the gateway writes and the admin API reads.

Kept small on purpose so a shared store (PostgreSQL) can implement it next to SQLite: plain
records in, plain records out, no backend types leaking through.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import numpy as np

QUARANTINED: Final = "quarantined"
RELEASED: Final = "released"
STATUSES: Final = frozenset({QUARANTINED, RELEASED})


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


@runtime_checkable
class QuarantineStore(Protocol):
    """Durable storage for quarantined inputs.

    Semantics every implementation keeps:

    - ``add_many`` writes all items of one request in one transaction and returns their ids
      (uuid4 hex, in item order) only after the commit is durable.
    - ``list`` is newest first (``created_at``, then insertion order); filters combine with AND.
    - ``release`` raises ``KeyError`` for an unknown id; releasing again changes nothing and
      returns the record as first released. Released records keep their input.
    - ``purge`` deletes rows matching all given filters; ``older_than`` is a unix timestamp
      (rows with ``created_at < older_than``); with no filter at all it raises ``ValueError``
      so an empty admin form cannot wipe the evidence.
    - An unknown ``status`` filter, or a negative ``limit``/``offset``, raises ``ValueError``.
    """

    def add_many(self, items: Sequence[NewItem]) -> builtins.list[str]: ...

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

    def release(self, id: str, note: str | None = None) -> QuarantineRecord: ...

    def purge(
        self,
        status: str | None = None,
        older_than: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int: ...

    def close(self) -> None: ...


def check_status(status: str | None) -> None:
    """Rejects a status filter that could only ever match nothing (a typo in the admin API)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {sorted(STATUSES)}")


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
