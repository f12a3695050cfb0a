"""What both quarantine stores write and read: one row per record, the same columns, the same
filters, so the SQLite file and the PostgreSQL table hold the same records.

The SQL here uses ``?`` marks; the PostgreSQL store turns them into psycopg's ``%s``
(``incidents.database.pg_sql``). Only the ``ids`` filter differs between the two (SQLite binds
a JSON array, PostgreSQL an array), so each store names its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from bastion.gateway.quarantine.store import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    QUARANTINED,
    RECORDS_QUOTA,
    REVIEW,
    Caps,
    NewItem,
    QuarantineRecord,
    Quota,
    cap,
    check_status,
)
from bastion.gateway.quarantine.tensors import decode_array, encode_array

SUMMARY: Final = (
    "id, created_at, model, version, client_id, request_id, image_index, scores, thresholds, "
    "verdict, status, released_at, note"
)
FULL: Final = SUMMARY + ", input"
NEWEST_FIRST: Final = "ORDER BY created_at DESC, seq DESC"
INSERT: Final = (
    "INSERT INTO quarantine (id, created_at, model, version, client_id, request_id, image_index,"
    " scores, thresholds, verdict, status, input_bytes, input)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
CLIENT: Final = 4  # position of client_id in an insert row
STATUS: Final = 10  # position of status
SIZE: Final = 11  # position of input_bytes


def floats(values: dict[str, float], name_chars: int) -> str:
    """JSON with plain floats: detectors hand over numpy scalars, which ``json`` cannot encode.
    Kept as text, not PostgreSQL ``jsonb``: a score may be ``Infinity``, which JSON lacks."""
    return json.dumps({cap(str(k), name_chars): float(v) for k, v in values.items()})


def new_row(item: NewItem, now: float, caps: Caps) -> tuple[Any, ...]:
    """``INSERT``'s parameters for one item, its strings capped and a fresh uuid4 hex id.
    Encoding is the costly part: callers run it before taking any lock."""
    data = encode_array(item.input)
    return (
        uuid.uuid4().hex,
        now,
        cap(str(item.model), caps.name_chars),
        cap(str(item.version), caps.name_chars),
        cap(item.client_id, caps.client_id_chars),
        cap(item.request_id, caps.request_id_chars),
        int(item.image_index),
        floats(item.scores, caps.name_chars),
        floats(item.thresholds, caps.name_chars),
        cap(str(item.verdict), caps.name_chars),
        item.status if item.status in (QUARANTINED, REVIEW) else QUARANTINED,
        len(data),
        data,
    )


def where(
    ids_clause: str,
    ids_value: Callable[[list[str]], Any],
    model: str | None = None,
    status: str | None = None,
    older_than: float | None = None,
    ids: Sequence[str] | None = None,
) -> tuple[str, list[Any]]:
    """AND of the given filters; ``ids_clause`` (one ``?``, bound to ``ids_value(ids)``) is how
    the backend matches a list of ids with a single parameter, whatever its length."""
    check_status(status)
    clauses: list[str] = []
    params: list[Any] = []
    if model is not None:
        clauses.append("model = ?")
        params.append(model)
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    if older_than is not None:
        clauses.append("created_at < ?")
        params.append(float(older_than))
    if ids is not None:
        clauses.append(ids_clause)
        params.append(ids_value([str(i) for i in ids]))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class Deletions:
    """``purge`` and ``expire``, the same SQL on both stores. A store names how it binds a list
    of ids in one parameter (``IDS_CLAUSE``, ``ids_value``) and deletes under its own locks
    (``_delete``)."""

    IDS_CLAUSE: str = ""

    @staticmethod
    def ids_value(ids: list[str]) -> Any:
        raise NotImplementedError

    def _delete(self, sql: str, params: Sequence[Any]) -> int:
        raise NotImplementedError

    def _where(
        self,
        model: str | None = None,
        status: str | None = None,
        older_than: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> tuple[str, list[Any]]:
        return where(self.IDS_CLAUSE, self.ids_value, model, status, older_than, ids)

    def purge(
        self,
        status: str | None = None,
        older_than: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        """Deletes the records matching every given filter; ValueError when none is given."""
        if status is None and older_than is None and ids is None:
            raise ValueError("purge needs at least one of status, older_than, ids")
        clause, params = self._where(status=status, older_than=older_than, ids=ids)
        return self._delete(f"DELETE FROM quarantine{clause}", params)

    def expire(self, older_than: float, max_rows: int = 1000) -> int:
        """Deletes up to ``max_rows`` records created before ``older_than`` (Unix s), oldest
        first; ValueError when ``max_rows`` < 1."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        return self._delete(
            "DELETE FROM quarantine WHERE seq IN (SELECT seq FROM quarantine"
            " WHERE created_at < ? ORDER BY created_at LIMIT ?)",
            [float(older_than), int(max_rows)],
        )


def record(row: Sequence[Any]) -> QuarantineRecord:
    """A ``SUMMARY`` or ``FULL`` row as a record (``input`` None for a summary)."""
    return QuarantineRecord(
        id=row[0],
        created_at=row[1],
        model=row[2],
        version=row[3],
        client_id=row[4],
        request_id=row[5],
        image_index=row[6],
        scores=json.loads(row[7]),
        thresholds=json.loads(row[8]),
        verdict=row[9],
        status=row[10],
        released_at=row[11],
        note=row[12],
        input=decode_array(row[13]) if len(row) > 13 else None,
    )


def admit(
    quota: Quota,
    totals: tuple[int, int],
    rows: Sequence[tuple[Any, ...]],
    client_count: Callable[[str | None, bool], int],
) -> list[str | None]:
    """The drop reason of each row (``None``: kept), given the store's ``(records, bytes)`` as
    they stand inside the caller's write transaction, counting the rows of this batch kept
    before it. ``client_count(client, review)`` reads a client's stored review copies (or its
    withheld records) in that transaction; it is called once per client and kind.

    The per-client quota counts a client's review copies and its withheld records apart, so
    honest traffic that is merely suspicious never uses up the room its withheld inputs'
    evidence needs."""
    records, size = totals
    per_client: dict[tuple[str | None, bool], int] = {}
    reasons: list[str | None] = []
    for row in rows:
        key = (row[CLIENT], row[STATUS] == REVIEW)
        if key not in per_client:
            per_client[key] = client_count(*key)
        if records >= quota.max_records:
            reasons.append(RECORDS_QUOTA)
        elif size + row[SIZE] > quota.max_bytes:
            reasons.append(BYTES_QUOTA)
        elif per_client[key] >= quota.max_records_per_client:
            reasons.append(CLIENT_QUOTA)
        else:
            reasons.append(None)
            records, size = records + 1, size + row[SIZE]
            per_client[key] += 1
    return reasons
