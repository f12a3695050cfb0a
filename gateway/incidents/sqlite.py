"""The incident files' SQLite connections: WAL, a busy timeout, explicit transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: str | Path, synchronous: str, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit: ``transaction``), shared by
    threads under the caller's lock; ``synchronous`` is FULL where an acknowledged write must
    survive a power cut, NORMAL where surviving the process being killed is enough."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.executescript(schema)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = False) -> Iterator[None]:
    """BEGIN (IMMEDIATE: take the write lock now, across processes) ... COMMIT, or ROLLBACK."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
