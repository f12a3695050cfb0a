"""Offline verification of the incident log: was anything edited, removed, reordered, truncated?

Reads the database read-only and trusts only the public key. Each entry's leaf is recomputed
from its content (which holds its position) and compared with the stored leaf: a plain edit, or
a swap of two entries, is named at once. An editor who also rewrites the stored leaves is caught
by the signed checkpoints, one per append: the tree is rebuilt from the recomputed leaves and
its root at every checkpoint's size is compared with the signed root (RFC 9162 §2.1.1 roots, by
``pymerkle``), so the first checkpoint that no longer matches names the entry. The witness
file, outside the database, catches a log cut short together with its checkpoints.

The log in PostgreSQL (``database_url``: the replicas' shared log) is read the same way, in one
read-only repeatable-read transaction, so appends the replicas make meanwhile are not half
seen. Each replica keeps its own witness file there: give one (or none) with ``witness_path``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pymerkle import InmemoryTree

from bastion.gateway.incidents.database import DatabaseUnavailable, is_postgres
from bastion.gateway.incidents.log import Entry, canonical, leaf_hash
from bastion.gateway.incidents.signing import Checkpoint, read_witness, valid


@dataclass
class Verdict:
    """What ``verify`` found: ``first_bad`` is the lowest entry (seq) shown tampered with."""

    entries: int = 0
    checkpoints: int = 0
    witnessed: int | None = None
    first_bad: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad(self, seq: int, why: str) -> None:
        self.problems.append(f"entry {seq}: {why}")
        self.first_bad = seq if self.first_bad is None else min(self.first_bad, seq)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "witnessed": self.witnessed,
            "first_bad": self.first_bad,
            "problems": self.problems,
        }


ENTRIES = "SELECT seq, time, kind, actor, subject, body, leaf FROM log_entries ORDER BY seq"
CHECKPOINTS = "SELECT size, root, time, signature FROM log_checkpoints ORDER BY size"


def verify(
    database: Path | str, key: Ed25519PublicKey, witness_path: Path | None = None
) -> Verdict:
    """Checks the log in ``database`` (a SQLite file, or a ``postgresql://`` URL) against
    checkpoints signed by ``key`` and the witness (``None``: none kept; a log with entries and
    no witness file fails). Raises FileNotFoundError when there is no database file,
    ``DatabaseUnavailable`` when PostgreSQL cannot be reached; anything else wrong is a
    problem found."""
    verdict, tree = Verdict(), InmemoryTree("sha256")
    if is_postgres(database):
        reader = _postgres(_connect(str(database)))
    else:
        reader = _sqlite(Path(database))
    try:
        with reader as read:
            _check_entries(read(ENTRIES), verdict, tree)
            signed = _check_checkpoints(read(CHECKPOINTS), verdict, tree, key)
    except (sqlite3.Error, RecursionError, TypeError, ValueError, DatabaseUnavailable) as exc:
        verdict.problems.append(f"the log cannot be read as one: {type(exc).__name__}: {exc}")
        return verdict
    if witness_path is not None:
        _check_witness(witness_path, verdict, tree, key)
    if signed:
        missing = verdict.entries - len(signed)
        if missing > 0:  # one checkpoint per append: a missing one was deleted
            first = next(n for n in range(1, verdict.entries + 1) if n not in signed)
            verdict.bad(first, f"{missing} entries from {first} on have no signed checkpoint")
    elif verdict.entries:
        verdict.bad(1, "no entry has a signed checkpoint")
    return verdict


@contextmanager
def _sqlite(database: Path) -> Iterator[Any]:
    """The file read-only, in one read transaction (one snapshot, whoever appends meanwhile)."""
    if not database.is_file():
        raise FileNotFoundError(f"no incident log at {database}")
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        yield lambda sql: conn.execute(sql)
    finally:
        conn.close()


def _connect(url: str) -> Any:
    """Raises ``DatabaseUnavailable`` when the server cannot be reached."""
    import psycopg

    from bastion.gateway.state import postgres

    try:
        return postgres.connect(url)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"PostgreSQL: {exc}".strip()) from exc


@contextmanager
def _postgres(conn: Any) -> Iterator[Any]:
    """One read-only repeatable-read transaction; rows streamed by server-side cursors, so a
    long log is not held in memory twice."""
    import psycopg

    opened: list[Any] = []

    def read(sql: str) -> Any:
        cursor = conn.cursor(name=f"verify_{len(opened)}")
        opened.append(cursor)
        cursor.itersize = 10_000
        cursor.execute(sql)
        return cursor

    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            try:
                yield read
            finally:
                for cursor in opened:
                    cursor.close()
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _check_entries(rows: Iterable[Any], verdict: Verdict, tree: InmemoryTree) -> None:
    expected = 1
    for seq, time_, kind, actor, subject, body, leaf in rows:
        if seq != expected:
            verdict.bad(expected, f"removed or inserted (the next entry is {seq})")
        try:
            parsed = json.loads(body)
            entry = Entry(seq, time_, kind, actor, subject, parsed)
            content = entry.content()
            if canonical(parsed).decode() != body:  # e.g. a duplicate key SQL would read
                verdict.bad(seq, "its body is not in the canonical form it was written in")
        except (ValueError, TypeError, RecursionError):
            verdict.bad(seq, "its body is not JSON")
            content = b""
        if not isinstance(leaf, bytes) or leaf_hash(content) != leaf:
            verdict.bad(seq, "edited or moved: its content does not match its leaf hash")
        tree.append_entry(content)
        expected = seq + 1
    verdict.entries = tree.get_size()


def _check_checkpoints(
    rows: Iterable[Any], verdict: Verdict, tree: InmemoryTree, key: Ed25519PublicKey
) -> set[int]:
    """Checks every signed checkpoint; returns the sizes our key signed. After the first that
    no longer matches the entries, the rest are counted in one line, not one each."""
    signed: set[int] = set()
    good, mismatched, forged = 0, [], []
    for size, root, time_, signature in rows:
        verdict.checkpoints += 1
        if not (isinstance(size, int) and isinstance(root, bytes) and isinstance(signature, bytes)):
            verdict.problems.append(f"checkpoint at size {size!r}: malformed")
            continue
        checkpoint = Checkpoint(size, root, float(time_), signature)
        if not valid(checkpoint, key):
            forged.append(size)
            continue
        signed.add(size)
        if size > verdict.entries:
            verdict.bad(verdict.entries + 1, f"truncated: a checkpoint covers {size} entries")
        elif size < 1 or tree.get_root(size) != checkpoint.root:
            if not mismatched:
                verdict.bad(
                    good + 1, f"entries {good + 1}..{size} do not match the checkpoint at {size}"
                )
            mismatched.append(size)
        elif not mismatched:
            good = size
    if len(mismatched) > 1:
        verdict.problems.append(f"{len(mismatched) - 1} later checkpoints do not match either")
    if forged:
        more = f" (and {len(forged) - 1} more)" if len(forged) > 1 else ""
        verdict.problems.append(f"checkpoint at size {forged[0]}: bad signature (forged){more}")
    return signed


def _check_witness(path: Path, verdict: Verdict, tree: InmemoryTree, key: Ed25519PublicKey) -> None:
    try:
        witnessed = read_witness(path)
    except ValueError as exc:
        verdict.problems.append(f"witness: {exc}")
        return
    if witnessed is None:
        if verdict.entries:
            verdict.problems.append(
                f"witness: {path} is missing (deleted? a replica that never appended to a shared "
                "log keeps none: give the witness of one that did)"
            )
        return
    verdict.witnessed = witnessed.size
    if not valid(witnessed, key):
        verdict.problems.append("witness: bad signature (forged)")
    elif witnessed.size > verdict.entries:
        verdict.bad(
            verdict.entries + 1,
            f"truncated: the witness covers {witnessed.size} entries, the log has "
            f"{verdict.entries}",
        )
    elif tree.get_root(witnessed.size) != witnessed.root:
        verdict.problems.append(f"the first {witnessed.size} entries do not match the witness")
