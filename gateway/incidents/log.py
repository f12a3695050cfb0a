"""The incident log: every security decision, append-only, in a Merkle tree with signed heads.

An entry is one decision (a containment and its lifting, a key created or revoked, a route
changed, a quarantine purge ...) with its evidence as a JSON body. Its leaf is the SHA-256 of
``0x00 ‖ content`` and the tree's inner nodes hash ``0x01 ‖ left ‖ right`` (RFC 9162 §2.1.1:
the domain separation that keeps a leaf from passing for a node); the tree is ``pymerkle``'s,
which reproduces RFC 6962's test vectors (``tests/unit/test_incident_log.py``), over leaves
kept in the log's SQLite table. Each append commits the entry and a signed checkpoint of the
new tree head in one transaction (WAL, ``synchronous=FULL``): an appended entry is durable and
covered by a signature when ``append`` returns, whichever process wrote it (the gateway, or the
CLI for key and quarantine commands). ``gateway.incidents.verify`` checks it offline.
With ``database_url`` the same log lives in PostgreSQL, one for every replica
(``gateway.incidents.log_postgres``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pymerkle import BaseMerkleTree
from pymerkle.hasher import MerkleHasher

from bastion.gateway.incidents.database import Database, SQLiteDatabase
from bastion.gateway.incidents.signing import (
    Checkpoint,
    Signer,
    read_witness,
    valid,
    witness,
    witness_lock,
)

log = logging.getLogger(__name__)

KINDS: Final = frozenset(
    {
        "containment",  # a client or campaign reached a rung
        "release",  # containment lifted
        "campaign",  # identities linked into a campaign by their probes
        "tier_change",
        "policy_change",
        "recalibration",
        "key_created",
        "key_revoked",
        "quarantine_release",
        "quarantine_purge",
        "route_change",
        "rollback",
        "drift_alarm",
        "flag_rate_alarm",
        "incident_opened",
        "incident_closed",
        "export",
    }
)
SUBJECT_CHARS: Final = 256
BODY_BYTES: Final = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_entries (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    leaf BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_entries_subject ON log_entries (subject);
CREATE TABLE IF NOT EXISTS log_checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    time REAL NOT NULL,
    signature BLOB NOT NULL
);
"""


class TamperedLog(RuntimeError):
    """The stored log is not the one last signed: nothing more is appended to it until an
    operator has run ``bastion incidents verify``."""


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that is hashed: sorted keys, no spaces, ASCII, no
    NaN (RFC 8785's aims, for the plain values the log holds)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


@dataclass(frozen=True)
class Entry:
    """One security decision: ``seq`` from 1, ``time`` in Unix seconds, its ``kind`` (one of
    ``KINDS``), who made it (``actor``: the gateway, an admin, a rule), what it is about
    (``subject``: a client, a campaign, a model, a key id) and its evidence (``body``)."""

    seq: int
    time: float
    kind: str
    actor: str
    subject: str
    body: dict[str, Any]

    def content(self) -> bytes:
        """What the leaf hashes: every field, the position included (a moved entry no longer
        matches its leaf)."""
        return canonical(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "body": self.body,
        }


class _StoredTree(BaseMerkleTree):
    """pymerkle's tree over the leaves in ``log_entries`` (leaf i is the entry with seq i)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__("sha256")
        self._conn = conn

    def _encode_entry(self, data: bytes) -> bytes:
        return data

    def _store_leaf(self, data: bytes, digest: bytes) -> int:
        raise NotImplementedError("IncidentLog.append stores leaves")

    def _get_leaf(self, index: int) -> bytes:
        row = self._conn.execute("SELECT leaf FROM log_entries WHERE seq = ?", (index,)).fetchone()
        return bytes(row[0])

    def _get_leaves(self, offset: int, width: int) -> list[bytes]:
        rows = self._conn.execute(
            "SELECT leaf FROM log_entries WHERE seq > ? AND seq <= ? ORDER BY seq",
            (offset, offset + width),
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    def _get_size(self) -> int:
        return int(
            self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM log_entries").fetchone()[0]
        )


_HASHER = MerkleHasher("sha256", security=True)


def leaf_hash(content: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x00 ‖ content)."""
    return _HASHER.hash_buff(content)


class IncidentLog:
    """The log on SQLite. Thread-safe; several processes may append to one file.

    ``PostgresIncidentLog`` (``log_postgres``) keeps the same log in PostgreSQL for replicas:
    it shares this class's checks, entries and listeners and replaces ``_commit``."""

    def __init__(
        self,
        path: str | Path,
        signer: Signer,
        witness_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        db = SQLiteDatabase(path, "FULL", _SCHEMA)
        self._setup(db, _StoredTree(db.conn), signer, witness_path, clock)

    def _setup(
        self,
        db: Database,
        tree: BaseMerkleTree,
        signer: Signer,
        witness_path: Path | None,
        clock: Callable[[], float],
    ) -> None:
        self._db, self._tree = db, tree
        self._lock = threading.Lock()  # one append at a time in this process
        self.signer, self.witness_path, self.clock = signer, witness_path, clock
        # called with each entry after its commit (metrics, incident grouping), in the thread
        # that appended it; an error there is logged, never the append's caller's
        self.listeners: list[Callable[[Entry], None]] = []

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(
        self, kind: str, subject: str, body: dict[str, Any], actor: str = "gateway"
    ) -> Entry:
        """Appends one entry and a signed checkpoint of the new head; returns the entry once
        both are committed. Raises ValueError for an unknown kind, a subject over
        ``SUBJECT_CHARS`` or a body that is not JSON or over ``BODY_BYTES``; ``TamperedLog``
        when the stored log is not the one last signed; the database's error (nothing
        acknowledged) when it cannot commit."""
        if kind not in KINDS:
            raise ValueError(f"unknown log entry kind {kind!r}")
        if len(subject) > SUBJECT_CHARS or len(actor) > SUBJECT_CHARS:
            raise ValueError(f"subject and actor take at most {SUBJECT_CHARS} characters")
        text = canonical(body)
        if len(text) > BODY_BYTES:
            raise ValueError(f"an entry's body takes at most {BODY_BYTES} bytes")
        held = (
            contextlib.nullcontext()
            if self.witness_path is None
            else witness_lock(self.witness_path)
        )
        with self._lock, held:  # the witness's lock first: checked head to witnessed head
            entry, head = self._commit(kind, subject, actor, text)
            if self.witness_path is not None:
                witness(self.witness_path, head, held=True)
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:
                log.exception("an incident log listener failed on entry %d", entry.seq)
        return entry

    def _commit(self, kind: str, subject: str, actor: str, text: bytes) -> tuple[Entry, Checkpoint]:
        """Stores the entry after the tree's last and its signed checkpoint in one transaction
        (``BEGIN IMMEDIATE``: one writer at a time, across processes)."""
        try:
            with self._db.transaction():
                self._check_head()  # never sign over entries someone else changed
                return self._store(self._tree.get_size() + 1, kind, subject, actor, text)
        except BaseException:
            self._tree.cache_clear()  # a cached subtree may hold the leaf rolled back
            raise

    def _store(
        self, seq: int, kind: str, subject: str, actor: str, text: bytes
    ) -> tuple[Entry, Checkpoint]:
        """Inserts entry ``seq`` and the signed head over it (caller holds the transaction;
        the tree must read the new leaf once it is inserted)."""
        entry = Entry(seq, float(self.clock()), kind, actor, subject, json.loads(text))
        leaf = leaf_hash(entry.content())
        self._db.run(
            "INSERT INTO log_entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, entry.time, kind, actor, subject, text.decode(), leaf),
        )
        self._stored(leaf)
        head = self.signer.sign(Checkpoint(seq, self._tree.get_root(seq), entry.time))
        self._db.run(
            "INSERT INTO log_checkpoints VALUES (?, ?, ?, ?)",
            (head.size, head.root, head.time, head.signature),
        )
        return entry, head

    def _stored(self, leaf: bytes) -> None:
        """A leaf was inserted (the SQLite tree reads it from the table)."""

    def _check_head(self, missing_witness: bool = False) -> None:
        """Raises ``TamperedLog`` unless the stored tree is the one last signed: a checkpoint
        for its current size, signed by our key, with its root, and a witness it extends
        (``missing_witness``: an absent witness file is a new one, not a deleted one). So
        an edit, a deletion or a cut made without the key is never signed over by the next
        append (caller holds the write transaction)."""
        size = self._tree.get_size()
        last = self._last_checkpoint()
        public = self.signer.public_key
        if size:
            if last is None or last.size != size or not valid(last, public):
                raise TamperedLog(
                    f"the log's {size} entries have no signed checkpoint at their end"
                )
            if self._tree.get_root(size) != last.root:
                raise TamperedLog(f"the log's {size} entries no longer match their checkpoint")
        elif last is not None:
            raise TamperedLog(f"the log has no entries but a checkpoint at {last.size}")
        if self.witness_path is None:
            return
        try:
            seen = read_witness(self.witness_path)
        except ValueError as exc:
            raise TamperedLog(f"the witness is unreadable: {exc}") from None
        if seen is None:
            if size and not missing_witness:
                raise TamperedLog(f"the witness {self.witness_path} is gone")
            return
        if not valid(seen, public) or seen.size > size:
            raise TamperedLog(f"the log ({size} entries) is not the one witnessed ({seen.size})")
        if self._tree.get_root(seen.size) != seen.root:
            raise TamperedLog(f"the first {seen.size} entries no longer match the witness")

    def _last_checkpoint(self) -> Checkpoint | None:
        rows = self._db.query(
            "SELECT size, root, time, signature FROM log_checkpoints ORDER BY size DESC LIMIT 1"
        )
        return None if not rows else _checkpoint(rows[0])

    def entries(
        self,
        after: int = 0,
        limit: int = 100,
        subject: str | None = None,
        since: float | None = None,
        kinds: tuple[str, ...] = (),
    ) -> list[Entry]:
        """Entries with seq above ``after`` (and time from ``since``), oldest first (at most
        ``limit``, up to 10,000)."""
        return [
            _entry(r) for r in self._db.query(*entries_query(after, limit, subject, since, kinds))
        ]

    def head(self) -> Checkpoint | None:
        """The latest signed checkpoint, None for an empty log."""
        return self._last_checkpoint()


def entries_query(
    after: int = 0,
    limit: int = 100,
    subject: str | None = None,
    since: float | None = None,
    kinds: tuple[str, ...] = (),
) -> tuple[str, list[Any]]:
    """``IncidentLog.entries``' statement (``?`` marks) and its parameters."""
    limit = max(1, min(limit, 10_000))
    query = "SELECT seq, time, kind, actor, subject, body FROM log_entries WHERE seq > ?"
    params: list[Any] = [after]
    if subject is not None:
        query += " AND subject = ?"
        params.append(subject)
    if since is not None:
        query += " AND time >= ?"
        params.append(since)
    if kinds:
        query += f" AND kind IN ({','.join('?' * len(kinds))})"
        params.extend(kinds)
    return query + " ORDER BY seq LIMIT ?", [*params, limit]


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint:
    return Checkpoint(row[0], bytes(row[1]), row[2], bytes(row[3]))
