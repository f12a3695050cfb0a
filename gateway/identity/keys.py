"""API keys for inference clients: created by an admin, shown once, stored hashed.

A key reads ``bst_<id>_<secret>``: ``<id>`` is 12 hex characters, public (the handle lists and
revocations use), and ``<secret>`` is 32 random bytes, base64url (``secrets.token_urlsafe``).
Clients send it as ``Authorization: Bearer <key>`` (RFC 6750). The store keeps the id, the client
name, a note and the SHA-256 of the whole key, never the key: a 256-bit random secret has no
dictionary to guess from, so a fast hash is enough (as for GitHub's and Stripe's tokens), and the
digests are compared in constant time.

Two stores keep the same records: ``SQLiteKeyStore`` (the embedded default, a file) and
``PostgresKeyStore`` (replicas sharing one database: ``database_url``); ``open_key_store``
picks by the settings.

``KeyRing`` is the serving side: an in-memory copy of the active keys' digests, reloaded from the
store every ``refresh_s`` (so a key revoked by another gateway process stops working within that
time) and updated at once by revocations made through it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

PREFIX: Final = "bst_"
_KEY = re.compile(r"bst_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
CLIENT_NAME = re.compile(r"[A-Za-z0-9._~:@/+=-]{1,128}")
"""Client names follow the client-id header's charset, so a name is a valid client id."""
NOTE_CHARS: Final = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    note TEXT,
    digest BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""


@dataclass(frozen=True)
class KeyRecord:
    """What is kept of a key (never the key itself)."""

    id: str
    client: str
    note: str | None
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str | None:
    """The id of a well-formed key, else None (cheap: a regex, no store access)."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


class SQLiteKeyStore:
    """Keys in SQLite (WAL, synchronous FULL): created and revoked by admins, read by gateways."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._clock = clock
        with self._lock:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def create(self, client: str, note: str | None = None) -> tuple[KeyRecord, str]:
        """A new key for ``client``; returns its record and the key (shown once). Raises
        ``ValueError`` for a client name outside ``CLIENT_NAME`` or an over-long note."""
        _check(client, note)
        id_ = secrets.token_hex(6)
        key = f"{PREFIX}{id_}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(id_, client, note, self._clock(), None)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, client, note, digest, created_at) VALUES (?,?,?,?,?)",
                (id_, client, note, digest(key), record.created_at),
            )
        return record, key

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, client, note, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, id_: str) -> KeyRecord:
        """Revokes a key (again: no change); raises ``KeyError`` for an unknown id."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), id_),
            )
            row = conn.execute(
                "SELECT id, client, note, created_at, revoked_at FROM api_keys WHERE id = ?",
                (id_,),
            ).fetchone()
        if row is None:
            raise KeyError(id_)
        return KeyRecord(*row)

    def active_digests(self) -> tuple[dict[str, tuple[bytes, str]], bool]:
        """id -> (digest, client) of every key not revoked, and whether any key (revoked ones
        included) was ever made: one snapshot."""
        with self._lock:
            return _snapshot(self._conn.execute(_SNAPSHOT).fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresKeyStore:
    """Keys in PostgreSQL, shared by every replica: the same records and rules as
    ``SQLiteKeyStore``. One connection, serialised by a lock (key operations are an admin's,
    and one read per ``refresh_s`` per gateway); a connection the server dropped is reopened
    once per call. Raises ``psycopg.OperationalError`` when the database cannot be reached."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        from bastion.gateway.state import postgres

        postgres.migrate(url)
        self._url, self._clock = url, clock
        self._lock = threading.Lock()
        self._conn = postgres.connect(url)

    def _call(self, run: Callable[[Any], Any]) -> Any:
        import psycopg

        with self._lock:
            try:
                return run(self._conn)
            except psycopg.OperationalError:
                if not self._conn.closed:
                    raise  # the server answered: not a dropped connection
                from bastion.gateway.state import postgres

                self._conn = postgres.connect(self._url)
                return run(self._conn)

    def create(self, client: str, note: str | None = None) -> tuple[KeyRecord, str]:
        """As ``SQLiteKeyStore.create``."""
        _check(client, note)
        id_ = secrets.token_hex(6)
        key = f"{PREFIX}{id_}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(id_, client, note, self._clock(), None)
        self._call(
            lambda conn: conn.execute(
                "INSERT INTO api_keys (id, client, note, digest, created_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (id_, client, note, digest(key), record.created_at),
            )
        )
        return record, key

    def list(self) -> list[KeyRecord]:
        rows = self._call(
            lambda conn: conn.execute(
                "SELECT id, client, note, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        )
        return [KeyRecord(*row) for row in rows]

    def revoke(self, id_: str) -> KeyRecord:
        """As ``SQLiteKeyStore.revoke``: one statement, so two admins revoking at once agree."""
        row = self._call(
            lambda conn: conn.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, %s) WHERE id = %s "
                "RETURNING id, client, note, created_at, revoked_at",
                (self._clock(), id_),
            ).fetchone()
        )
        if row is None:
            raise KeyError(id_)
        return KeyRecord(*row)

    def active_digests(self) -> tuple[dict[str, tuple[bytes, str]], bool]:
        """As ``SQLiteKeyStore.active_digests``: one snapshot (one statement)."""
        return _snapshot(self._call(lambda conn: conn.execute(_SNAPSHOT).fetchall()))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


KeyStore = SQLiteKeyStore | PostgresKeyStore


def open_key_store(database_url: str | None, keys_path: Path) -> KeyStore:
    """PostgreSQL when ``database_url`` is set (replicas share it), else the SQLite file."""
    if database_url:
        return PostgresKeyStore(database_url)
    return SQLiteKeyStore(keys_path)


_SNAPSHOT = "SELECT id, digest, client, revoked_at FROM api_keys"


def _snapshot(rows: list[Any]) -> tuple[dict[str, tuple[bytes, str]], bool]:
    """``_SNAPSHOT``'s rows -> (id -> (digest, client) of the active keys, any key ever made)."""
    active = {id_: (bytes(d), client) for id_, d, client, revoked in rows if revoked is None}
    return active, bool(rows)


def _check(client: str, note: str | None) -> None:
    if not CLIENT_NAME.fullmatch(client):
        raise ValueError("client must be 1-128 of letters, digits and ._~:@/+=-")
    if note is not None and len(note) > NOTE_CHARS:
        raise ValueError(f"note is over {NOTE_CHARS} characters")


class KeyRing:
    """The serving side's view of the active keys. ``client_of`` is pure memory: it runs on the
    event loop, per request, in microseconds.

    A local SQLite store is re-read in passing, at most every ``refresh_s``. A store across the
    network (PostgreSQL) is re-read by a thread of its own (``background``), so the event loop
    never waits on the database; while the database cannot be read, the last keys read stay
    in force (a revoked key stops working when it can be read again) and each failed read is
    logged."""

    def __init__(
        self,
        store: KeyStore,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = False,
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._clock = clock
        self._active, self._configured = store.active_digests()
        self._loaded_at = clock()
        self._background = background
        self._stop = threading.Event()
        if background:
            threading.Thread(target=self._refresh_loop, name="key-ring", daemon=True).start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as exc:  # the database is away: keep the keys last read
                log.warning("client keys could not be re-read: %s", type(exc).__name__)

    def close(self) -> None:
        """Stops the background reader (if any) and closes the store."""
        self._stop.set()
        self.store.close()

    @property
    def enabled(self) -> bool:
        """Keys are required once any key was made; revoking every key does not reopen the
        gateway (deny by default): that takes removing the key file."""
        self._maybe_refresh()
        return self._configured

    def client_of(self, key: str) -> str | None:
        """The client a key belongs to, or None for a malformed, unknown or revoked key."""
        id_ = key_id(key)
        if id_ is None:
            return None
        self._maybe_refresh()
        entry = self._active.get(id_)
        if entry is None or not hmac.compare_digest(entry[0], digest(key)):
            return None
        return entry[1]

    def revoke(self, id_: str) -> KeyRecord:
        record = self.store.revoke(id_)
        self._active.pop(id_, None)  # at once in this process
        return record

    def create(self, client: str, note: str | None = None) -> tuple[KeyRecord, str]:
        record, key = self.store.create(client, note)
        self._active[record.id] = (digest(key), client)
        self._configured = True
        return record, key

    def refresh(self) -> None:
        self._active, self._configured = self.store.active_digests()
        self._loaded_at = self._clock()

    def _maybe_refresh(self) -> None:
        if not self._background and self._clock() - self._loaded_at >= self.refresh_s:
            self.refresh()
