"""Incidents: related log entries grouped under one case, with a timeline, opened and closed.

An incident lives beside the log in its SQLite file: its header (title, trigger, state, times),
the subjects it concerns (clients, campaigns, models) and the log entries on its timeline.
The entries themselves stay in the tamper-evident log; an incident only points at them, so a
closed incident's timeline is still proven by ``bastion incidents verify``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.gateway.incidents.log import Entry
from bastion.gateway.incidents.sqlite import connect, transaction

OPEN, CLOSED = "open", "closed"
MAX_SUBJECTS = 10_000  # per incident: a rotating attacker's identities, bounded

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL,
    closed_by TEXT,
    note TEXT
);
CREATE TABLE IF NOT EXISTS incident_subjects (
    incident INTEGER NOT NULL,
    subject TEXT NOT NULL,
    PRIMARY KEY (incident, subject)
);
CREATE INDEX IF NOT EXISTS incident_subjects_subject ON incident_subjects (subject);
CREATE TABLE IF NOT EXISTS incident_entries (
    incident INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (incident, seq)
);
"""


@dataclass(frozen=True)
class Incident:
    id: int
    title: str
    trigger: str  # the kind of entry (or "admin") that opened it
    state: str
    opened_at: float
    closed_at: float | None
    closed_by: str | None
    note: str | None
    subjects: int
    entries: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class IncidentStore:
    """Thread-safe; shares the log's database file (its own connection)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self._conn = connect(path, "FULL", _SCHEMA)
        self._lock = threading.Lock()
        self.clock = clock

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def open(self, title: str, trigger: str, subjects: Iterable[str], seqs: Iterable[int]) -> int:
        """Opens an incident over ``subjects`` with these log entries; returns its id."""
        with self._lock, transaction(self._conn, immediate=True):
            cursor = self._conn.execute(
                "INSERT INTO incidents (title, trigger, state, opened_at) VALUES (?, ?, ?, ?)",
                (title[:200], trigger, OPEN, self.clock()),
            )
            incident = int(cursor.lastrowid or 0)
            self._add(incident, subjects, seqs)
        return incident

    def discard(self, incident: int) -> None:
        """Removes an incident whose opening could not be logged."""
        with self._lock, transaction(self._conn, immediate=True):
            for table in ("incident_subjects", "incident_entries"):
                self._conn.execute(f"DELETE FROM {table} WHERE incident = ?", (incident,))
            self._conn.execute("DELETE FROM incidents WHERE id = ?", (incident,))

    def attach(self, incident: int, subjects: Iterable[str], seqs: Iterable[int]) -> None:
        with self._lock, transaction(self._conn, immediate=True):
            self._add(incident, subjects, seqs)

    def _add(self, incident: int, subjects: Iterable[str], seqs: Iterable[int]) -> None:
        count = self._conn.execute(
            "SELECT COUNT(*) FROM incident_subjects WHERE incident = ?", (incident,)
        ).fetchone()[0]
        fresh = [(incident, s) for s in dict.fromkeys(subjects) if s][: MAX_SUBJECTS - count]
        self._conn.executemany("INSERT OR IGNORE INTO incident_subjects VALUES (?, ?)", fresh)
        self._conn.executemany(
            "INSERT OR IGNORE INTO incident_entries VALUES (?, ?)", [(incident, q) for q in seqs]
        )

    def find_open(self, subjects: Iterable[str]) -> int | None:
        """The oldest open incident concerning any of ``subjects``."""
        wanted = [s for s in dict.fromkeys(subjects) if s][:100]
        if not wanted:
            return None
        marks = ",".join("?" * len(wanted))
        with self._lock:
            row = self._conn.execute(
                f"SELECT MIN(i.id) FROM incidents i JOIN incident_subjects s ON s.incident = i.id "
                f"WHERE i.state = ? AND s.subject IN ({marks})",
                (OPEN, *wanted),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def close_incident(self, incident: int, who: str, note: str | None) -> Incident:
        """Closes an open incident. Raises KeyError when there is none with that id, ValueError
        when it is closed already."""
        with self._lock, transaction(self._conn, immediate=True):
            row = self._conn.execute("SELECT state FROM incidents WHERE id = ?", (incident,))
            found = row.fetchone()
            if found is None:
                raise KeyError(incident)
            if found[0] == CLOSED:
                raise ValueError(f"incident {incident} is closed already")
            self._conn.execute(
                "UPDATE incidents SET state = ?, closed_at = ?, closed_by = ?, note = ? "
                "WHERE id = ?",
                (CLOSED, self.clock(), who, note, incident),
            )
        return self.get(incident)

    def get(self, incident: int) -> Incident:
        """Raises KeyError for an unknown id."""
        rows = self.list(ids=[incident])
        if not rows:
            raise KeyError(incident)
        return rows[0]

    def list(
        self, state: str | None = None, limit: int = 100, ids: list[int] | None = None
    ) -> list[Incident]:
        """Incidents, newest first."""
        query = (
            "SELECT i.id, i.title, i.trigger, i.state, i.opened_at, i.closed_at, i.closed_by, "
            "i.note, (SELECT COUNT(*) FROM incident_subjects s WHERE s.incident = i.id), "
            "(SELECT COUNT(*) FROM incident_entries e WHERE e.incident = i.id) FROM incidents i"
        )
        where, params = [], []
        if state is not None:
            where.append("i.state = ?")
            params.append(state)
        if ids is not None:
            where.append(f"i.id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY i.id DESC LIMIT ?", (*params, limit))
            return [Incident(*row) for row in rows.fetchall()]

    def subjects(self, incident: int, limit: int = 1000) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT subject FROM incident_subjects WHERE incident = ? ORDER BY subject LIMIT ?",
                (incident, limit),
            ).fetchall()
        return [row[0] for row in rows]

    def timeline(self, incident: int, limit: int = 10_000) -> list[Entry]:
        """The incident's log entries, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT l.seq, l.time, l.kind, l.actor, l.subject, l.body FROM log_entries l "
                "JOIN incident_entries e ON e.seq = l.seq WHERE e.incident = ? "
                "ORDER BY l.seq LIMIT ?",
                (incident, limit),
            ).fetchall()
        return [Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]
