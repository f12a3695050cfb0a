"""A single-node quarantine store on SQLite (stdlib ``sqlite3``), durable on every commit."""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bastion.gateway.quarantine import rows
from bastion.gateway.quarantine.rows import FULL, INSERT, NEWEST_FIRST, SUMMARY, new_row, record
from bastion.gateway.quarantine.schema import MIGRATIONS, SCHEMA_VERSION
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
from bastion.gateway.quarantine.tensors import decode_array, encode_array

__all__ = ["SCHEMA_VERSION", "SQLiteQuarantineStore", "decode_array", "encode_array"]

_CLIENT_REVIEWS = f"SELECT COUNT(*) FROM quarantine WHERE client_id IS ? AND status = '{REVIEW}'"
_CLIENT_WITHHELD = (
    f"SELECT COUNT(*) FROM quarantine WHERE client_id IS ? AND status IN ('{QUARANTINED}', "
    f"'{RELEASED}')"
)


class SQLiteQuarantineStore(rows.Deletions):
    """Quarantine on one SQLite file, shared by the threads of one gateway process.

    Durability: ``journal_mode=WAL`` with ``synchronous=FULL``. In WAL mode a committed
    transaction sits in the WAL file, so it survives ``kill -9`` of the process under both
    NORMAL and FULL. NORMAL, however, only fsyncs the WAL at checkpoints, so an OS crash or power
    loss can roll back the last commits. The gateway names a quarantine id in its response only
    after ``add_many`` returns; FULL fsyncs the WAL on every commit, so that id can never point
    at a record that vanished. The cost is one fsync per request that quarantines something,
    which is rare by design.

    Bounds: ``quota`` (see ``Quota``: when full, new records are dropped, old evidence is never
    evicted) is checked inside the insert transaction, against totals that triggers keep in the
    database, so threads and other processes on the same file cannot overshoot it together.
    ``caps`` truncates every stored string (see ``Caps``).

    Threads: one connection (``check_same_thread=False``) serialized by a lock, because the
    gateway calls in from ``asyncio.to_thread`` workers. Other processes on the same file are
    safe too: writes take ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout_s`` for the lock.

    ``clock`` gives ``created_at``/``released_at`` (unix seconds); tests inject one to order
    records without sleeping. ``path=":memory:"`` gives a private throwaway database.
    """

    # one JSON parameter: any number of ids fits within SQLite's bound-variable limit
    IDS_CLAUSE = "id IN (SELECT value FROM json_each(?))"
    ids_value = staticmethod(json.dumps)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        quota: Quota = Quota(),
        caps: Caps = Caps(),
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        target = os.fspath(path)
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self.quota = quota
        self.caps = caps
        self._clock = clock
        self._lock = threading.Lock()
        self._dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self._refused = False  # a global quota dropped a record since the last deletion
        self._conn = sqlite3.connect(
            target, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _configure(self) -> None:
        """``busy_timeout`` is already set by ``connect(timeout=...)``."""
        conn = self._conn
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA fullfsync = ON")

    def _migrate(self) -> None:
        """Applies missing schema steps in one transaction; refuses a newer schema than this code
        knows, since writing to it could break the newer gateway that made it."""
        with self._lock, self._transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"quarantine schema version {current} is newer than {SCHEMA_VERSION}; "
                    "upgrade the gateway"
                )
            for step in MIGRATIONS[current:]:
                for statement in step:
                    conn.execute(statement)
            if current < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` takes the write lock up front, so a writer in another process
        waits on ``busy_timeout`` instead of failing halfway with SQLITE_BUSY on lock upgrade.
        Readers use ``DEFERRED``: one consistent snapshot across several statements."""
        conn = self._conn
        conn.execute(f"BEGIN {mode}")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def add_many(self, items: Sequence[NewItem]) -> builtins.list[str | None]:
        now = self._clock()
        new = [new_row(item, now, self.caps) for item in items]  # encoded outside the lock
        if not new:
            return []
        with self._lock:
            with self._transaction() as conn:
                reasons = self._admit(conn, new)
                kept = [row for row, why in zip(new, reasons, strict=True) if why is None]
                conn.executemany(INSERT, kept)
            for why in reasons:
                if why is not None:
                    self._dropped[why] += 1
                    self._refused |= why != CLIENT_QUOTA
        return [None if why else row[0] for row, why in zip(new, reasons, strict=True)]

    def _admit(self, conn: sqlite3.Connection, new: Sequence[tuple[Any, ...]]) -> list[str | None]:
        """``rows.admit`` against the totals inside the caller's write transaction."""
        totals = conn.execute("SELECT records, bytes FROM quarantine_totals").fetchone()

        def client_count(client: str | None, review: bool) -> int:
            sql = _CLIENT_REVIEWS if review else _CLIENT_WITHHELD
            return conn.execute(sql, (client,)).fetchone()[0]

        return rows.admit(self.quota, totals, new, client_count)

    def get(self, id: str) -> QuarantineRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {FULL} FROM quarantine WHERE id = ?", (id,)
            ).fetchone()
        return None if row is None else record(row)

    def status_usage(self, status: str) -> tuple[int, int]:
        check_status(status)
        sql = "SELECT COUNT(*), COALESCE(SUM(input_bytes), 0) FROM quarantine WHERE status = ?"
        with self._lock:
            records, size = self._conn.execute(sql, (status,)).fetchone()
        return int(records), int(size)

    def count(self, model: str | None = None, status: str | None = None) -> int:
        where, params = self._where(model=model, status=status)
        sql = f"SELECT COUNT(*) FROM quarantine{where}" if where else _TOTAL_RECORDS
        with self._lock:
            (total,) = self._conn.execute(sql, params).fetchone()
        return int(total)

    def release(self, id: str, note: str | None = None) -> QuarantineRecord:
        with self._lock, self._transaction() as conn:
            conn.execute(
                "UPDATE quarantine SET status = ?, released_at = ?, note = ?"
                " WHERE id = ? AND status = ?",
                (RELEASED, self._clock(), cap(note, self.caps.note_chars), id, QUARANTINED),
            )
            row = conn.execute(f"SELECT {FULL} FROM quarantine WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        return record(row)

    def _delete(self, sql: str, params: Sequence[Any]) -> int:
        with self._lock:
            with self._transaction() as conn:
                deleted = conn.execute(sql, params).rowcount
            if deleted:
                self._refused = False
        return deleted

    def usage(self) -> Usage:
        with self._lock:
            records, size = self._conn.execute(
                "SELECT records, bytes FROM quarantine_totals"
            ).fetchone()
            return self._usage(records, size)

    def _usage(self, records: int, size: int) -> Usage:
        """Needs the lock (reads the drop counters)."""
        full = records >= self.quota.max_records or size >= self.quota.max_bytes
        return Usage(records, size, full or self._refused, dict(self._dropped))

    def stats(self, top_clients: int = 10) -> Stats:
        with self._lock, self._transaction("DEFERRED") as conn:
            records, size = conn.execute("SELECT records, bytes FROM quarantine_totals").fetchone()
            by_status = conn.execute("SELECT status, COUNT(*) FROM quarantine GROUP BY status")
            by_model = conn.execute("SELECT model, COUNT(*) FROM quarantine GROUP BY model")
            oldest, newest = conn.execute(
                "SELECT MIN(created_at), MAX(created_at) FROM quarantine"
            ).fetchone()
            clients = conn.execute(
                "SELECT client_id, COUNT(*) AS n FROM quarantine GROUP BY client_id"
                " ORDER BY n DESC, client_id LIMIT ?",
                (max(0, top_clients),),
            )
            return Stats(
                usage=self._usage(records, size),
                quota=self.quota,
                by_status={s: 0 for s in sorted(STATUSES)} | dict(by_status.fetchall()),
                by_model=dict(by_model.fetchall()),
                oldest=oldest,
                newest=newest,
                top_clients=[(client, n) for client, n in clients.fetchall()],
            )

    def pragmas(self) -> dict[str, Any]:
        """The settings in force on this connection, for diagnostics and tests."""
        names = ("journal_mode", "synchronous", "busy_timeout", "user_version")
        with self._lock:
            return {n: self._conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SQLiteQuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        with self._lock:
            found = self._conn.execute(
                f"SELECT {columns} FROM quarantine{where} {NEWEST_FIRST} LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [record(row) for row in found]


_TOTAL_RECORDS = "SELECT records FROM quarantine_totals"
