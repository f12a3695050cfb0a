"""The quarantine store in PostgreSQL, shared by every replica (``database_url``).

The same records and rules as ``SQLiteQuarantineStore`` (``rows.py`` holds what they share),
in the table ``state/migrations/0002.quarantine.sql`` makes, migrated by yoyo on open. A record
written through one replica is listed, reviewed, released and purged through any other.

Quotas hold across replicas: every write transaction first locks the one row of
``quarantine_totals`` (``SELECT ... FOR UPDATE``), whose counts statement triggers keep in the
same transaction as the rows they count, so writers on every replica take turns, each checks
its batch against totals no other writer can change under it, and none overshoots. Deletions
take the same lock first, so two replicas' sweeps never deadlock on each other's rows. A
replica stuck holding the lock fails the others' writes after ``LOCK_TIMEOUT`` instead of
stalling them.

Durability: ``add_many`` returns ids only after COMMIT returned, and the transaction commits
with ``synchronous_commit`` on (forced on if the server's default is off), so an id the
gateway names in a 403 is in the WAL on disk. When the database cannot be reached, or the
COMMIT fails, it raises ``DatabaseUnavailable`` (an ``OSError``) and nothing is acknowledged
(a COMMIT cut off by a broken connection may still have landed: an orphan record, never a
missing one). The connection is reopened on the next call (``PostgresDatabase``).

Ids stay uuid4 hex, as the admin API, the CLI and the SQLite store have them; the ``UNIQUE``
constraint makes a collision an error, never two records under one id.

Every method is blocking network I/O: call it from a thread, never on the event loop.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

from bastion.gateway.incidents.database import PostgresDatabase
from bastion.gateway.quarantine import rows
from bastion.gateway.quarantine.rows import FULL, INSERT, NEWEST_FIRST, SUMMARY, new_row, record
from bastion.gateway.quarantine.store import (
    CLIENT_QUOTA,
    DROP_REASONS,
    QUARANTINED,
    RELEASED,
    REVIEW,
    STATUSES,
    Caps,
    NewItem,
    QuarantineRecord,
    Quota,
    Stats,
    Usage,
    cap,
    check_page,
    check_status,
)

LOCK_TIMEOUT: Final = "10s"
_WRITE = (
    f"SELECT set_config('lock_timeout', '{LOCK_TIMEOUT}', true),"
    " CASE WHEN current_setting('synchronous_commit') = 'off'"
    " THEN set_config('synchronous_commit', 'on', true) END"
)
_LOCK_TOTALS = "SELECT records, bytes FROM quarantine_totals FOR UPDATE"
_TOTALS = "SELECT records, bytes, refused FROM quarantine_totals"
_KINDS = {True: f"status = '{REVIEW}'", False: f"status IN ('{QUARANTINED}', '{RELEASED}')"}
_CLIENT_COUNT = {  # (client id is None, review) -> a count that reads the client index
    (anonymous, review): f"SELECT COUNT(*) FROM quarantine WHERE client_id"
    f" {'IS NULL' if anonymous else '= ?'} AND {kind}"
    for anonymous in (True, False)
    for review, kind in _KINDS.items()
}


class PostgresQuarantineStore(rows.Deletions):
    """Quarantine in the PostgreSQL database at ``url``, shared by every replica; the
    ``QuarantineStore`` contract. One connection per store, shared by the gateway's threads
    under a lock (quarantine writes are rare by design; the review writer batches).

    ``usage().dropped`` counts this replica's drops (a counter per replica, summed by the
    metrics); ``over_quota`` is the shared store's, the same on every replica. Raises
    ``DatabaseUnavailable`` when the database cannot be reached, here and on every call.
    """

    IDS_CLAUSE = "id = ANY(CAST(? AS TEXT[]))"  # one array parameter, however many ids
    ids_value = staticmethod(builtins.list)

    def __init__(
        self,
        url: str,
        *,
        quota: Quota = Quota(),
        caps: Caps = Caps(),
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
    ) -> None:
        self.quota = quota
        self.caps = caps
        self._clock = clock
        self._dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self._dropped_lock = threading.Lock()
        self._db = PostgresDatabase(url, migrate)

    def add_many(self, items: Sequence[NewItem]) -> builtins.list[str | None]:
        now = self._clock()
        new = [_texts(new_row(item, now, self.caps)) for item in items]  # before any lock
        if not new:
            return []
        db = self._db
        with db.transaction():
            db.query(_WRITE)
            ((records, size),) = db.query(_LOCK_TOTALS)
            reasons = rows.admit(self.quota, (records, size), new, self._client_count)
            kept = [row for row, why in zip(new, reasons, strict=True) if why is None]
            if kept:
                db.run_many(INSERT, kept)
            if any(why is not None and why != CLIENT_QUOTA for why in reasons):
                db.run("UPDATE quarantine_totals SET refused = TRUE")
        with self._dropped_lock:
            self._dropped.update(why for why in reasons if why is not None)
        return [None if why else row[0] for row, why in zip(new, reasons, strict=True)]

    def _client_count(self, client: str | None, review: bool) -> int:
        sql = _CLIENT_COUNT[(client is None, review)]
        ((count,),) = self._db.query(sql, () if client is None else (client,))
        return int(count)

    def get(self, id: str) -> QuarantineRecord | None:
        found = self._db.query(f"SELECT {FULL} FROM quarantine WHERE id = ?", (id,))
        return record(found[0]) if found else None

    def list(
        self,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        include_input: bool = False,
    ) -> builtins.list[QuarantineRecord]:
        check_page(limit, offset)
        where, params = self._where(model=model, status=status)
        columns = FULL if include_input else SUMMARY
        found = self._db.query(
            f"SELECT {columns} FROM quarantine{where} {NEWEST_FIRST} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [record(row) for row in found]

    def count(self, model: str | None = None, status: str | None = None) -> int:
        where, params = self._where(model=model, status=status)
        sql = f"SELECT COUNT(*) FROM quarantine{where}" if where else _TOTALS
        return int(self._db.query(sql, params)[0][0])

    def status_usage(self, status: str) -> tuple[int, int]:
        check_status(status)
        sql = "SELECT COUNT(*), COALESCE(SUM(input_bytes), 0) FROM quarantine WHERE status = ?"
        ((records, size),) = self._db.query(sql, (status,))
        return int(records), int(size)

    def release(self, id: str, note: str | None = None) -> QuarantineRecord:
        """One transaction; of two replicas releasing at once, the second waits for the first's
        row lock, then finds the record released and returns it as the first released it."""
        db = self._db
        with db.transaction():
            db.run(
                "UPDATE quarantine SET status = ?, released_at = ?, note = ?"
                " WHERE id = ? AND status = ?",
                (RELEASED, self._clock(), _text(cap(note, self.caps.note_chars)), id, QUARANTINED),
            )
            found = db.query(f"SELECT {FULL} FROM quarantine WHERE id = ?", (id,))
        if not found:
            raise KeyError(id)
        return record(found[0])

    def _delete(self, sql: str, params: Sequence[Any]) -> int:
        """Takes the totals lock before any row lock: the order every writer takes them in."""
        db = self._db
        with db.transaction():
            db.query(_WRITE)
            db.query(_LOCK_TOTALS)
            return db.run(sql, params)

    def usage(self) -> Usage:
        ((records, size, refused),) = self._db.query(_TOTALS)
        return self._usage(int(records), int(size), bool(refused))

    def _usage(self, records: int, size: int, refused: bool) -> Usage:
        full = records >= self.quota.max_records or size >= self.quota.max_bytes
        with self._dropped_lock:
            dropped = dict(self._dropped)
        return Usage(records, size, full or refused, dropped)

    def stats(self, top_clients: int = 10) -> Stats:
        """One snapshot (REPEATABLE READ) across the scans, as the SQLite store reads one."""
        db = self._db
        with db.transaction():
            db.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            ((records, size, refused),) = db.query(_TOTALS)
            by_status = db.query("SELECT status, COUNT(*) FROM quarantine GROUP BY status")
            by_model = db.query("SELECT model, COUNT(*) FROM quarantine GROUP BY model")
            ((oldest, newest),) = db.query(
                "SELECT MIN(created_at), MAX(created_at) FROM quarantine"
            )
            clients = db.query(
                "SELECT client_id, COUNT(*) AS n FROM quarantine GROUP BY client_id"
                " ORDER BY n DESC, client_id LIMIT ?",
                (max(0, top_clients),),
            )
        return Stats(
            usage=self._usage(int(records), int(size), bool(refused)),
            quota=self.quota,
            by_status={s: 0 for s in sorted(STATUSES)} | {s: int(n) for s, n in by_status},
            by_model={m: int(n) for m, n in by_model},
            oldest=oldest,
            newest=newest,
            top_clients=[(client, int(n)) for client, n in clients],
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PostgresQuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(value: Any) -> Any:
    """PostgreSQL text holds no NUL and no lone surrogate, either of which a client can put in
    a request id (JSON ``\\u0000``); an insert that failed on one would lose the evidence of a
    withheld input, so each becomes U+FFFD (one character for one: the caps still hold)."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "\ufffd")
    try:
        value.encode()
    except UnicodeEncodeError:
        value = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def _texts(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_text(value) for value in row)
