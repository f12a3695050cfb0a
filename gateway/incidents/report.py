"""The impact report of an incident: what was served to whom, as JSON and one HTML page.

Read offline from the incident log's database (the incident, its subjects and timeline) and
the served-prediction ledger, both opened read-only, so it runs while the gateway serves or
after it is gone: the SQLite files, or the PostgreSQL database the replicas share
(``database_url``), read in one repeatable-read snapshot through ``database.Database`` with
the same SQL. Whatever the database, the same events give the same report to the byte (but
``generated_at``): rows are read in id order, ties are broken by id, and strings are sorted
here, never by a collation. The window runs from an hour before the incident's first entry
(an attack's first queries come before any evidence) to its closing, or to now. In it:

- the clients involved: the incident's subjects the ledger knows as clients;
- the campaign's queries: every ledger row of those clients, whatever its outcome;
- the linked served predictions: every row *served* to anyone whose fingerprint sketch shares
  ``SKETCH_MATCH`` hashes with one of the campaign's queries (a near-duplicate of an attack
  query: what the attack may have learnt, or an honest client's picture it probed around);
- what else the involved clients were served; the class mix and the confidence over time
  against the model version's reference profile (or the ledger's hour before the window); the
  model versions that answered; the requests per client.

The page is self-contained: the data as JSON and the charts drawn by uPlot, the library the
dashboard ships, inlined. Built with numpy over the window's rows: a ledger of 1,000,000 rows
reports in seconds (``benchmarks/incident_report_time.py``).
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bastion.gateway.incidents.database import Database, Params, PostgresDatabase, is_postgres
from bastion.gateway.incidents.grouping import LOOKBACK_S
from bastion.gateway.incidents.ledger import SKETCH, SKETCH_MATCH
from bastion.gateway.incidents.sqlite import transaction
from bastion.gateway.incidents.store import MAX_SUBJECTS, IncidentStore
from bastion.gateway.progress import Progress

STATIC = Path(__file__).parents[1] / "monitoring" / "static"
EMPTY = np.iinfo(np.int64).min  # a fingerprint's padding: never a match
BINS = 60
ROWS_LISTED = 100_000
COLUMNS = "id, time, client, model, version, request_id, outcome, predicted, confidence, tier"


class _ReadOnlySQLite:
    """A SQLite file opened read-only (never created, never migrated, no WAL switch), as the
    ``Database`` the report reads: the gateway may be writing it, or be gone."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no database at {path}")
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Params = ()) -> int:
        return self.conn.execute(sql, params).rowcount  # refused: the file is read-only

    def run_many(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, rows)

    def transaction(self) -> AbstractContextManager[None]:
        return transaction(self.conn)  # deferred: one snapshot from its first read on

    def close(self) -> None:
        self.conn.close()


def _open(where: Path | str) -> Database:
    """``where``: a SQLite file, or a ``postgresql://`` URL (its schema migrated by the
    gateway already: the report writes nothing)."""
    if is_postgres(where):
        return PostgresDatabase(str(where), migrate=False)
    return _ReadOnlySQLite(Path(where))


@contextmanager
def snapshot(where: Path | str) -> Iterator[Database]:
    """The database at ``where`` in one read-only transaction: what the replicas or the
    gateway append meanwhile is not half seen."""
    db = _open(where)
    try:
        with db.transaction():
            if isinstance(db, PostgresDatabase):  # SQLite's read transaction is one already
                db.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db
    finally:
        db.close()


def _rows(db: Database, where: str, params: Params) -> list[dict[str, Any]]:
    names = [c.strip() for c in COLUMNS.split(",")]
    found = db.query(f"SELECT {COLUMNS} FROM served WHERE {where} ORDER BY id", params)
    return [dict(zip(names, row, strict=True)) for row in found]


def _matches(candidates: np.ndarray, campaign: np.ndarray) -> np.ndarray:
    """Which candidate sketches (n, SKETCH) share ``SKETCH_MATCH`` hashes with one campaign
    sketch (m, SKETCH): a vectorised screen on the union of the campaign's hashes, then the
    exact count against each campaign sketch for the few that pass it."""
    if not len(candidates) or not len(campaign):
        return np.zeros(len(candidates), bool)
    campaign = np.unique(campaign, axis=0)  # a campaign repeats itself: count each sketch once
    pool = np.unique(campaign[campaign != EMPTY])
    hits = np.isin(candidates, pool) & (candidates != EMPTY)
    found = np.zeros(len(candidates), bool)
    by_hash: dict[int, list[int]] = {}
    for j, row in enumerate(campaign):
        for h in row[row != EMPTY].tolist():
            by_hash.setdefault(h, []).append(j)
    for i in np.flatnonzero(hits.sum(axis=1) >= SKETCH_MATCH):
        counts: dict[int, int] = {}
        for h in candidates[i][hits[i]].tolist():
            for j in by_hash.get(h, ()):
                counts[j] = counts.get(j, 0) + 1
        found[i] = max(counts.values(), default=0) >= SKETCH_MATCH
    return found


def _sketches(db: Database, where: str, params: Params) -> tuple[np.ndarray, np.ndarray]:
    rows = db.query(f"SELECT id, sketch FROM served WHERE {where}", params)
    kept = [(i, bytes(s)) for i, s in rows if len(s) == 8 * SKETCH]
    ids = np.array([i for i, _ in kept], np.int64)
    blob = b"".join(s for _, s in kept)
    return ids, np.frombuffer(blob, "<i8").reshape(-1, SKETCH)


def _series(db: Database, start: float, end: float, clients: list[str]) -> dict:
    """Per time bin: requests (all, and the involved clients'), mean confidence, class mix.
    In id order: the sums, and so the report, come out to the bit whichever database."""
    data = db.query(
        "SELECT time, client, predicted, confidence FROM served "
        "WHERE time BETWEEN ? AND ? AND outcome = 'served' ORDER BY id",
        (start, end),
    )
    t = np.array([d[0] for d in data], np.float64)
    if len(t):  # the bins span the traffic there was, not an empty lead-in
        start = float(t.min())
    width = max((end - start) / BINS, 1e-9)
    index = np.clip(((t - start) / width).astype(np.int64), 0, BINS - 1)
    members = set(clients)
    involved = np.array([d[1] in members for d in data], bool)
    confidence = np.array([d[3] for d in data], np.float64)
    predicted = np.array([d[2] for d in data], np.int64)
    counts = np.bincount(index, minlength=BINS)
    sums = np.bincount(index, weights=confidence, minlength=BINS)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    classes = int(predicted.max()) + 1 if len(predicted) else 0
    return {
        "t": (start + width * (np.arange(BINS) + 0.5)).tolist(),
        "requests": counts.tolist(),
        "involved": np.bincount(index[involved], minlength=BINS).tolist(),
        "confidence": [None if np.isnan(v) else float(v) for v in mean],
        "class_counts": np.bincount(predicted, minlength=classes).tolist(),
    }


def _reference(repository: Path | None, versions: list[dict[str, Any]]) -> dict | None:
    """The reference profile's class mix and mean confidence of the version that answered most."""
    if repository is None or not versions:
        return None
    from bastion.gateway.monitoring.reference import STATISTICS, ReferenceProfile

    top = max(versions, key=lambda v: v["requests"])
    profile = ReferenceProfile.load(repository / top["model"] / top["version"])
    if profile is None:
        return None
    return {
        "model": top["model"],
        "version": top["version"],
        "classes": profile.classes.tolist(),
        "confidence": float(profile.means[STATISTICS.index("confidence")]),
    }


def _served_versions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[r["model"], r["version"]] = counts.get((r["model"], r["version"]), 0) + 1
    return [{"model": m, "version": v, "requests": n} for (m, v), n in counts.items()]


STAGES = 5  # the log, the campaign's sketches, the served ones matched, the rows, the series


def build(
    incident: int,
    log: Path | str,
    ledger: Path | str,
    repository: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict. ``log`` and ``ledger``: SQLite files, or the
    ``postgresql://`` URL of the database the replicas share (read in one snapshot when both
    name it); ``progress`` advances once per stage (``STAGES``). Raises KeyError for an
    unknown incident, FileNotFoundError for a missing file, ``DatabaseUnavailable`` when
    PostgreSQL cannot be reached."""
    step = progress.advance if progress is not None else lambda count=1: None
    with snapshot(log) as log_db:  # a clear error for a wrong log before the ledger's
        store = IncidentStore(log_db)  # not closed here: its database is the snapshot's
        header = store.get(incident)
        subjects = sorted(store.subjects(incident, limit=MAX_SUBJECTS))  # in no collation
        timeline = store.timeline(incident)
        # from an hour before its first entry: an attack's first queries come before any
        # evidence
        start = min([e.time for e in timeline], default=header.opened_at) - LOOKBACK_S
        end = max([e.time for e in timeline] + [header.closed_at or time.time()])
        step()
        if is_postgres(ledger) and ledger == log:
            served = _served(log_db, start, end, subjects, step)
        else:
            with snapshot(ledger) as ledger_db:
                served = _served(ledger_db, start, end, subjects, step)
    return {
        "incident": header.to_json(),
        "window": {"start": start, "end": end},
        "subjects": subjects,
        **served,
        # the reference of the version the involved clients were served (else the busiest)
        "reference": _reference(
            repository, _served_versions(served["attacker_served"]) or served["versions"]
        ),
        "timeline": [e.to_json() for e in timeline[:1000]],
        "generated_at": time.time(),
    }


def _served(
    db: Database, start: float, end: float, subjects: list[str], step: Callable[..., None]
) -> dict[str, Any]:
    """The ledger's part of the report: what was served in the window, to whom, linked how.
    Ties are broken by the first row's id, never by a string order the collation decides."""
    window = "time BETWEEN ? AND ?"
    present = db.query(f"SELECT DISTINCT client FROM served WHERE {window}", (start, end))
    clients = sorted({c for (c,) in present} & set(subjects))
    own = f"{window} AND client IN ({','.join('?' * len(clients)) or 'NULL'})"
    _, campaign = _sketches(db, own, (start, end, *clients))
    step()
    ids, served = _sketches(db, f"{window} AND outcome = 'served'", (start, end))
    linked_ids = ids[_matches(served, campaign)].tolist()
    step()
    linked = _rows(db, f"id IN ({','.join(map(str, linked_ids)) or 'NULL'})", ())
    attacker_served = _rows(db, f"{own} AND outcome = 'served'", (start, end, *clients))
    outcomes = dict(
        db.query(
            f"SELECT outcome, COUNT(*) FROM served WHERE {own} GROUP BY outcome ORDER BY outcome",
            (start, end, *clients),
        )
    )
    versions = sorted(  # by name in Python: no collation's say in it (a handful of rows)
        db.query(
            f"SELECT model, version, COUNT(*) FROM served WHERE {window} "
            "AND outcome = 'served' GROUP BY model, version",
            (start, end),
        )
    )
    per_client = db.query(
        f"SELECT client, COUNT(*) FROM served WHERE {window} GROUP BY client "
        "ORDER BY COUNT(*) DESC, MIN(id) LIMIT 20",
        (start, end),
    )
    step()
    series = _series(db, start, end, clients)
    before = _series(db, start - 3600.0, start, [])
    step()
    linked_set = {r["id"] for r in linked}
    return {
        "clients_involved": clients,
        "campaign_queries": sum(outcomes.values()),
        "campaign_outcomes": outcomes,
        "linked_served": linked[:ROWS_LISTED],
        "linked_served_count": len(linked),
        "attacker_served": attacker_served[:ROWS_LISTED],
        "attacker_served_count": len(attacker_served),
        "else_served_to_involved": [r for r in attacker_served if r["id"] not in linked_set][
            :ROWS_LISTED
        ],
        "versions": [{"model": m, "version": v, "requests": n} for m, v, n in versions],
        "requests_per_client": [{"client": c, "requests": n} for c, n in per_client],
        "series": series,
        "before": {"class_counts": before["class_counts"], "confidence": before["confidence"]},
    }


def page(report: dict[str, Any]) -> tuple[str, str]:
    """The report as JSON text and as the self-contained HTML page."""
    data = json.dumps(report, allow_nan=False, default=str)
    template = (Path(__file__).parent / "report.html").read_text()
    values = {
        "/*UPLOT_CSS*/": (STATIC / "uPlot.min.css").read_text(),
        "/*UPLOT_JS*/": (STATIC / "uPlot.iife.min.js").read_text(),
        "__TITLE__": html.escape(report["incident"]["title"]),
        # the data sits in a <script type="application/json">: with <, > and & escaped no
        # client-chosen string (a request id, a title) can end or comment out that element
        "/*REPORT_JSON*/": data.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e"),
    }
    # one pass over the template: text put in is never searched for placeholders again
    return data, re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], template)


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Writes ``incident-<id>.json`` and ``incident-<id>.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"incident-{report['incident']['id']}"
    data, html_page = page(report)
    (out / f"{name}.json").write_text(data)
    (out / f"{name}.html").write_text(html_page)
    return out / f"{name}.json", out / f"{name}.html"
