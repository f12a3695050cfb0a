"""The incident files' SQLite connections: WAL, a busy timeout, explicit transactions."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: str | Path, synchronous: str, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit: ``transaction``), shared by
    threads under the caller's lock; ``synchronous`` is FULL where an acknowledged write must
    survive a power cut, NORMAL where surviving the process being killed is enough."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    _retry_busy(lambda: conn.executescript(schema))
    return conn


BUSY_TIMEOUT_MS = 10_000


def _retry_busy(run: Callable[[], object]) -> None:
    """Runs ``run``, again while another process holds the lock it needs, for up to the busy
    timeout: switching a new file to WAL can fail at once with "database is locked", without
    SQLite's busy handler, when two processes open it together (the gateway and the CLI)."""
    delay, deadline = 0.01, time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            run()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


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
