"""The incident files' two databases behind one small interface: SQLite, or PostgreSQL.

SQLite (a file beside the gateway) is the embedded default; PostgreSQL (``database_url``) is
where replicas share one incident log, one incidents table and one ledger. The stores write
their SQL once, in the words both understand (``?`` marks, ``ON CONFLICT DO NOTHING``,
``RETURNING``); ``PostgresDatabase`` turns the marks into psycopg's ``%s``.

Every method is blocking network or disk I/O: call it from a thread, never on the event loop.
A transaction holds the database's lock, so statements of one thread are never interleaved
with another's on the shared connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from bastion.gateway.incidents.sqlite import connect, transaction

log = logging.getLogger(__name__)
Params = Sequence[Any]


class DatabaseUnavailable(OSError):
    """PostgreSQL could not be reached, or failed a statement: what the transaction wrote was
    not committed (when the connection broke during COMMIT, whether it was is unknown; it was
    never acknowledged). An ``OSError``, so callers that handle a failing disk handle it too."""


class Database(Protocol):
    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement."""
        ...

    def run(self, sql: str, params: Params = ()) -> int:
        """One statement; the rows it changed."""
        ...

    def run_many(self, sql: str, rows: Sequence[Params]) -> None: ...

    def insert_many(self, table: str, columns: str, rows: Sequence[Params]) -> None:
        """Appends rows to ``table`` (``columns``: a comma-separated list): many INSERTs on
        SQLite, one ``COPY`` on PostgreSQL (a fraction of the server's work per row)."""
        ...

    def transaction(self) -> Any:
        """A context manager: BEGIN (taking the write lock at once on SQLite) ... COMMIT, or
        ROLLBACK when its body raises."""
        ...

    def close(self) -> None: ...


class SQLiteDatabase:
    """A SQLite file: WAL, a busy timeout, ``synchronous`` as ``connect`` explains."""

    def __init__(self, path: str | Path, synchronous: str, schema: str) -> None:
        self.conn = connect(path, synchronous, schema)
        self.lock = threading.RLock()

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Params = ()) -> int:
        with self.lock:
            return self.conn.execute(sql, params).rowcount

    def run_many(self, sql: str, rows: Sequence[Params]) -> None:
        with self.lock:
            self.conn.executemany(sql, rows)

    def insert_many(self, table: str, columns: str, rows: Sequence[Params]) -> None:
        marks = ", ".join("?" for _ in columns.split(","))
        self.run_many(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock, transaction(self.conn, immediate=True):
            yield

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def pg_sql(sql: str) -> str:
    """A statement in psycopg's paramstyle (``%s``): our SQL holds no other ``?`` or ``%``."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDatabase:
    """One connection to PostgreSQL, shared under a lock, reopened when the server dropped it:
    a transaction whose BEGIN finds the connection dead starts again on a new one (nothing was
    sent yet), and so does a statement outside a transaction. Any other failure raises
    ``DatabaseUnavailable``. ``migrate``: apply the schema's migrations first (yoyo, under its
    lock: replicas starting together migrate once)."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        from bastion.gateway.state import postgres

        self.url = url
        self.lock = threading.RLock()
        self._conn: Any = None
        self._depth = 0  # open transactions: statements inside one are never retried
        with _unavailable():
            if migrate:
                postgres.migrate(url)
            self._conn = postgres.connect(url)

    def _connection(self) -> Any:
        from bastion.gateway.state import postgres

        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._conn = postgres.connect(self.url)
        return self._conn

    def _call(self, run: Any) -> Any:
        import psycopg

        with self.lock, _unavailable():
            try:
                return run(self._connection())
            except psycopg.OperationalError:
                dropped = self._conn is not None and (self._conn.closed or self._conn.broken)
                if self._depth or not dropped:
                    raise
                return run(self._connection())  # the server had dropped us: once, afresh

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self._call(lambda conn: conn.execute(pg_sql(sql), params).fetchall())

    def run(self, sql: str, params: Params = ()) -> int:
        return self._call(lambda conn: conn.execute(pg_sql(sql), params).rowcount)

    def run_many(self, sql: str, rows: Sequence[Params]) -> None:
        def many(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(pg_sql(sql), rows)

        self._call(many)

    def insert_many(self, table: str, columns: str, rows: Sequence[Params]) -> None:
        def copy(conn: Any) -> None:
            statement = f"COPY {table} ({columns}) FROM STDIN"
            with conn.cursor() as cursor, cursor.copy(statement) as out:
                for row in rows:
                    out.write_row(row)

        self._call(copy)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            self._call(lambda conn: conn.execute("BEGIN"))
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                self._rollback()
                raise
            self._depth -= 1
            with _unavailable():
                self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        import psycopg

        try:
            self._conn.execute("ROLLBACK")
        except psycopg.Error:  # a dead connection rolled back with the server's session
            log.debug("rollback on a broken connection", exc_info=True)

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()


@contextmanager
def _unavailable() -> Iterator[None]:
    """psycopg's errors as ``DatabaseUnavailable`` (callers need not import psycopg)."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}".strip()) from exc


def is_postgres(where: object) -> bool:
    """Whether ``where`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))
