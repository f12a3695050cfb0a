"""Incidents: related log entries grouped under one case, with a timeline, opened and closed.

An incident lives beside the log in its database (the SQLite file, or PostgreSQL shared by the
replicas: ``PostgresDatabase``): its header (title, trigger, state, times),
the subjects it concerns (clients, campaigns, models) and the log entries on its timeline.
The entries themselves stay in the tamper-evident log; an incident only points at them, so a
closed incident's timeline is still proven by ``bastion incidents verify``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.gateway.incidents.database import Database, SQLiteDatabase
from bastion.gateway.incidents.log import Entry

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
    """Thread-safe; shares the log's database (its own connection): ``where`` is the SQLite
    file, or an open ``Database`` (PostgreSQL)."""

    def __init__(
        self, where: str | Path | Database, clock: Callable[[], float] = time.time
    ) -> None:
        local = isinstance(where, str | Path)
        self._db = SQLiteDatabase(where, "FULL", _SCHEMA) if local else where
        # PostgreSQL locks the incident's row for the transaction (replicas change one
        # incident at once); SQLite's BEGIN IMMEDIATE has locked the whole file already
        self._for_update = "" if local else " FOR UPDATE"
        self.clock = clock

    def close(self) -> None:
        self._db.close()

    def open(self, title: str, trigger: str, subjects: Iterable[str], seqs: Iterable[int]) -> int:
        """Opens an incident over ``subjects`` with these log entries; returns its id."""
        with self._db.transaction():
            ((incident,),) = self._db.query(
                "INSERT INTO incidents (title, trigger, state, opened_at) VALUES (?, ?, ?, ?) "
                "RETURNING id",
                (title[:200], trigger, OPEN, self.clock()),
            )
            self._add(incident, subjects, seqs)
        return int(incident)

    def discard(self, incident: int) -> None:
        """Removes an incident whose opening could not be logged."""
        with self._db.transaction():
            for table in ("incident_subjects", "incident_entries"):
                self._db.run(f"DELETE FROM {table} WHERE incident = ?", (incident,))
            self._db.run("DELETE FROM incidents WHERE id = ?", (incident,))

    def attach(self, incident: int, subjects: Iterable[str], seqs: Iterable[int]) -> None:
        with self._db.transaction():
            self._add(incident, subjects, seqs)

    def _add(self, incident: int, subjects: Iterable[str], seqs: Iterable[int]) -> None:
        """(In a transaction.) The incident's row locked first, so two replicas adding at once
        keep within ``MAX_SUBJECTS``."""
        if self._for_update:
            self._db.query("SELECT id FROM incidents WHERE id = ?" + self._for_update, (incident,))
        ((count,),) = self._db.query(
            "SELECT COUNT(*) FROM incident_subjects WHERE incident = ?", (incident,)
        )
        fresh = [(incident, s) for s in dict.fromkeys(subjects) if s][: MAX_SUBJECTS - count]
        if fresh:
            self._db.run_many(
                "INSERT INTO incident_subjects VALUES (?, ?) ON CONFLICT DO NOTHING", fresh
            )
        rows = [(incident, q) for q in seqs]
        if rows:
            self._db.run_many(
                "INSERT INTO incident_entries VALUES (?, ?) ON CONFLICT DO NOTHING", rows
            )

    def find_open(self, subjects: Iterable[str]) -> int | None:
        """The oldest open incident concerning any of ``subjects``."""
        wanted = [s for s in dict.fromkeys(subjects) if s][:100]
        if not wanted:
            return None
        marks = ",".join("?" * len(wanted))
        ((found,),) = self._db.query(
            f"SELECT MIN(i.id) FROM incidents i JOIN incident_subjects s ON s.incident = i.id "
            f"WHERE i.state = ? AND s.subject IN ({marks})",
            (OPEN, *wanted),
        )
        return None if found is None else int(found)

    def close_incident(self, incident: int, who: str, note: str | None) -> Incident:
        """Closes an open incident. Raises KeyError when there is none with that id, ValueError
        when it is closed already."""
        with self._db.transaction():
            found = self._db.query(
                "SELECT state FROM incidents WHERE id = ?" + self._for_update, (incident,)
            )
            if not found:
                raise KeyError(incident)
            if found[0][0] == CLOSED:
                raise ValueError(f"incident {incident} is closed already")
            self._db.run(
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
        rows = self._db.query(query + " ORDER BY i.id DESC LIMIT ?", (*params, limit))
        return [Incident(*row) for row in rows]

    def subjects(self, incident: int, limit: int = 1000) -> list[str]:
        rows = self._db.query(
            "SELECT subject FROM incident_subjects WHERE incident = ? ORDER BY subject LIMIT ?",
            (incident, limit),
        )
        return [row[0] for row in rows]

    def timeline(self, incident: int, limit: int = 10_000) -> list[Entry]:
        """The incident's log entries, oldest first."""
        rows = self._db.query(
            "SELECT l.seq, l.time, l.kind, l.actor, l.subject, l.body FROM log_entries l "
            "JOIN incident_entries e ON e.seq = l.seq WHERE e.incident = ? "
            "ORDER BY l.seq LIMIT ?",
            (incident, limit),
        )
        return [Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]
