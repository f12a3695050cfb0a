"""The incident log in PostgreSQL: one sequence and one Merkle tree for every replica.

The tables are the SQLite file's (``state/migrations/0003.incident-log.sql``), so
``verify`` reads either. Replicas append concurrently; each append is one transaction that
first takes a transaction-scoped advisory lock (``pg_advisory_xact_lock(LOCK_KEY)``, released
by its COMMIT or ROLLBACK, or by the server when the connection dies), so appends are
serialised across replicas the way ``BEGIN IMMEDIATE`` serialises processes on SQLite. Under
the lock the replica reads the leaves it lacks (entries other replicas appended since its
last append), checks that its tree's root is the one the last checkpoint signed, and inserts
the entry, the signed checkpoint over the new root and a ``NOTIFY bastion_incident_log,
'<seq>'``; all commit together (PostgreSQL's default ``synchronous_commit``: durable when
COMMIT returns). If the database cannot be reached, or COMMIT fails, ``append`` raises
``DatabaseUnavailable`` and nothing is acknowledged; the replica's tree drops what it added
and reads it again next time.

Each replica keeps the tree's leaves in memory (32 bytes an entry), read once when it opens
and then only the new ones: an append costs a few statements, not a read of the log. A
replica signs over the leaves it has read and checked, so a later edit of an entry it has
read is not signed over either (``verify`` names it), and a cut below its tree's size stops
its appends (``TamperedLog``), as a witness would.

The signing key is shared. Checkpoints are valid only under one public key, so every replica
must sign with the same Ed25519 private key: ``incident_key_path`` names one file that each
replica mounts (a Kubernetes Secret; ``openssl genpkey -algorithm ed25519`` writes one). The
log keeps the public half of the key it was started with (table ``log_signing_key``) and a
replica holding another key is refused when it opens the log, instead of failing every append
as tampered. ``verify`` never trusts that copy: it takes the public key from outside.

The witness file (``incident_checkpoint_path``) is each replica's own: the largest head that
replica has seen, on its own disk. A replica with no witness yet starts one (a new pod), so
keep it off shared volumes whose file locks do not hold across machines.

``follow`` runs ``LISTEN bastion_incident_log`` on a connection of its own, in a thread, and
calls back with every entry other replicas commit (the notification carries only the seq; the
entries are read from the table, so a notification lost while the connection was down costs
nothing: the follower reads what it missed when it reconnects).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from pymerkle import BaseMerkleTree

from bastion.gateway.incidents.database import PostgresDatabase, pg_sql
from bastion.gateway.incidents.log import (
    Entry,
    IncidentLog,
    TamperedLog,
    _entry,
    entries_query,
    leaf_hash,
)
from bastion.gateway.incidents.signing import Checkpoint, Signer, key_id

log = logging.getLogger(__name__)
CHANNEL: Final = "bastion_incident_log"
LOCK_KEY: Final = int.from_bytes(b"bastion1", "big")  # the advisory lock the appends take
LOCK_TIMEOUT: Final = "10s"  # the longest an append waits for the other replicas' appends
WAKE_S: Final = 0.5  # how often a follower waiting for a notification looks at its stop flag
RECONNECT_S: Final = (0.2, 5.0)  # a follower's back-off after losing its connection
PAGE: Final = 1000


class _MemoryTree(BaseMerkleTree):
    """pymerkle's tree over leaf hashes held in a list (leaf i is ``leaves[i - 1]``)."""

    def __init__(self) -> None:
        super().__init__("sha256")
        self.leaves: list[bytes] = []

    def _encode_entry(self, data: bytes) -> bytes:
        return data

    def _store_leaf(self, data: bytes, digest: bytes) -> int:
        raise NotImplementedError("PostgresIncidentLog.append stores leaves")

    def _get_leaf(self, index: int) -> bytes:
        return self.leaves[index - 1]

    def _get_leaves(self, offset: int, width: int) -> list[bytes]:
        return self.leaves[offset : offset + width]

    def _get_size(self) -> int:
        return len(self.leaves)

    def truncate(self, size: int) -> None:
        if size < len(self.leaves):
            del self.leaves[size:]
            self.cache_clear()  # cached subtrees may cover the leaves dropped


class PostgresIncidentLog(IncidentLog):
    """The log in PostgreSQL at ``url``, shared by replicas; the same contract as
    ``IncidentLog``. Raises ``DatabaseUnavailable`` when the database cannot be reached and
    ``ValueError`` when the log was started with another signing key."""

    def __init__(
        self,
        url: str,
        signer: Signer,
        witness_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
    ) -> None:
        db = PostgresDatabase(url, migrate)
        self.url = url
        self._tree: _MemoryTree
        self._setup(db, _MemoryTree(), signer, witness_path, clock)
        self._followers: list[Follower] = []
        try:
            self._adopt_key()
            self._catch_up()
        except TamperedLog as exc:  # opened all the same: its appends refuse until verified
            log.error("the incident log in PostgreSQL: %s", exc)
            self._tree.truncate(0)
        except BaseException:
            db.close()
            raise

    def _adopt_key(self) -> None:
        """Records our public key as the log's if it has none; raises ValueError if it has
        another."""
        raw = self.signer.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        with self._db.transaction():
            self._db.run(
                "INSERT INTO log_signing_key (public_key) VALUES (?) ON CONFLICT DO NOTHING",
                (raw,),
            )
            ((stored,),) = self._db.query("SELECT public_key FROM log_signing_key")
        if bytes(stored) != raw:
            ours = key_id(self.signer.public_key)
            raise ValueError(
                f"this replica's incident signing key ({ours}) is not the one the shared log "
                "is signed with: every replica must mount the same key file "
                "(incident_key_path)"
            )

    def _catch_up(self) -> None:
        """Reads the leaves appended after the tree's last (by other replicas)."""
        size = self._tree.get_size()
        rows = self._db.query(
            "SELECT seq, leaf FROM log_entries WHERE seq > ? ORDER BY seq", (size,)
        )
        for seq, leaf in rows:
            if seq != len(self._tree.leaves) + 1:
                raise TamperedLog(f"entry {len(self._tree.leaves) + 1} is missing")
            self._tree.leaves.append(bytes(leaf))

    def _commit(self, kind: str, subject: str, actor: str, text: bytes) -> tuple[Entry, Checkpoint]:
        known = self._tree.get_size()
        try:
            with self._db.transaction():
                # a replica stuck holding the lock fails our append in time, unacknowledged
                self._db.query("SELECT set_config('lock_timeout', ?, true)", (LOCK_TIMEOUT,))
                self._db.query("SELECT pg_advisory_xact_lock(?)", (LOCK_KEY,))
                self._catch_up()
                self._check_head(missing_witness=True)
                seq = self._tree.get_size() + 1
                entry, head = self._store(seq, kind, subject, actor, text)
                leaf = self._tree.get_leaf(seq)
                for follower in list(self._followers):
                    follower.mine(entry.seq, leaf)
                self._db.query("SELECT pg_notify(?, ?)", (CHANNEL, str(entry.seq)))
        except BaseException:
            self._tree.truncate(known)  # read again, from what was committed, next time
            raise
        return entry, head

    def _stored(self, leaf: bytes) -> None:
        self._tree.leaves.append(leaf)

    def follow(
        self, callback: Callable[[Entry], None], after: int | None = None, own: bool = False
    ) -> Follower:
        """Calls ``callback`` (on a thread of its own) with every entry committed after seq
        ``after`` (default: the log's end now), in order; ``own``: also those appended
        through this object, which its ``listeners`` have had already. ``close`` the result
        to stop. Blocking: call it from a thread or before serving."""
        if after is None:
            ((after,),) = self._db.query("SELECT COALESCE(MAX(seq), 0) FROM log_entries")
        follower = Follower(self, callback, int(after), own)
        self._followers.append(follower)
        follower.start()
        return follower

    def close(self) -> None:
        for follower in list(self._followers):
            follower.close()
        super().close()


class Follower:
    """``PostgresIncidentLog.follow``'s listener: one connection, one thread. ``listening``
    is set while its ``LISTEN`` is active; ``cursor`` is the last seq it has passed on."""

    def __init__(
        self, owner: PostgresIncidentLog, callback: Callable[[Entry], None], after: int, own: bool
    ) -> None:
        self._owner, self._callback, self.cursor, self._own = owner, callback, after, own
        self._mine: dict[int, bytes] = {}  # seq -> leaf of the entries appended through owner
        self._mine_lock = threading.Lock()
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="incident-log-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self in self._owner._followers:
            self._owner._followers.remove(self)

    def mine(self, seq: int, leaf: bytes) -> None:
        """The owner is committing entry ``seq`` with this leaf: not passed on unless ``own``
        (the leaf tells it from another replica's entry that took the seq if this commit
        failed)."""
        if not self._own:
            with self._mine_lock:
                self._mine[seq] = leaf

    def _run(self) -> None:
        from bastion.gateway.state import postgres

        delay = RECONNECT_S[0]
        while not self._stop.is_set():
            try:
                with postgres.connect(self._owner.url) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = RECONNECT_S[0]
                    self._deliver(conn)  # what was committed while nobody listened
                    while not self._stop.is_set():
                        notes = list(conn.notifies(timeout=WAKE_S, stop_after=1))
                        if any(_newer(n.payload, self.cursor) for n in notes):
                            self._deliver(conn)
            except Exception as exc:  # the database went away: listen again when it is back
                log.warning("incident log follower: %s: %s", type(exc).__name__, exc)
            self.listening.clear()
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_S[1])

    def _deliver(self, conn: Any) -> None:
        while True:
            sql, params = entries_query(after=self.cursor, limit=PAGE)
            rows = conn.execute(pg_sql(sql), params).fetchall()
            for row in rows:
                entry = _entry(row)
                self.cursor = entry.seq
                if self._is_mine(entry):
                    continue
                try:
                    self._callback(entry)
                except Exception:
                    log.exception("an incident log follower failed on entry %d", entry.seq)
            if len(rows) < PAGE:
                break
        with self._mine_lock:
            for seq in [s for s in self._mine if s <= self.cursor]:
                del self._mine[seq]

    def _is_mine(self, entry: Entry) -> bool:
        with self._mine_lock:
            leaf = self._mine.pop(entry.seq, None)
        return leaf is not None and leaf == leaf_hash(entry.content())


def _newer(payload: str, cursor: int) -> bool:
    """Whether a notification names an entry after ``cursor`` (one that does not parse: yes)."""
    try:
        return int(payload) > cursor
    except ValueError:
        return True
