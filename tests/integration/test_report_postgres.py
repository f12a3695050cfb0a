"""The impact report from PostgreSQL: the same events give the SQLite files' report, to the byte
(but ``generated_at``), from ``build``, the admin route and ``bastion incidents report``.

Each backend is written through the gateway's own classes (the log, its incidents, the ledger)
with a fixed clock, so both hold the same rows under the same ids. The PostgreSQL database
sorts text by an ICU collation where the server has one (``en-US``: case folded, punctuation
ignored first), so an order left to the database would show.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bastion.gateway.app import create_app
from bastion.gateway.incidents.database import PostgresDatabase
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.ledger import SKETCH, Ledger, Row
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.log_postgres import PostgresIncidentLog
from bastion.gateway.incidents.report import build
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.store import IncidentStore
from bastion.gateway.settings import Settings

pytestmark = pytest.mark.slow
T0 = 1_700_000_000.0  # the log's first entry; the ledger's rows around it
ADMIN = {"Authorization": "Bearer tok"}
# the incident's subjects, in an order C and en-US collations disagree on
ATTACKERS = ["mallory-B", "Mallory-a", "_mallory-c"]


@pytest.fixture
def icu_db(postgres_url: str) -> str:
    """A fresh database that sorts text by ICU's en-US rules (the server's default where
    PostgreSQL has no ICU)."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        try:
            conn.execute(
                f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "
                "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error:
            conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name


class Backend:
    """One gateway's files: the log, its incidents and the ledger in SQLite files, or in the
    PostgreSQL database ``url``; the signing key and the witness beside them."""

    def __init__(self, folder: Path, url: str | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.url = folder, url
        self.log_path, self.ledger_path = folder / "incidents.db", folder / "ledger.db"
        self.key, self.witness = folder / "signing.key", folder / "witness.json"

    @property
    def log_where(self) -> Path | str:
        return self.url or self.log_path

    @property
    def ledger_where(self) -> Path | str:
        return self.url or self.ledger_path

    def settings(self, repository: Path, **overrides: Any) -> Settings:
        return Settings(
            database_url=self.url,
            incident_log_path=self.log_path,
            ledger_path=self.ledger_path,
            incident_key_path=self.key,
            incident_checkpoint_path=self.witness,
            quarantine_path=self.folder / "quarantine.db",
            keys_path=self.folder / "keys.db",
            model_repository=repository,
            admin_token="tok",
            defence=False,
            torch_threads=1,
            **overrides,
        )

    def record(self) -> None:
        """The story: a campaign contained, an incident opened and closed, and the ledger's
        rows of the attackers, of honest clients near and far from their queries, and of the
        hour before."""
        ticks = iter(range(1_000_000))
        clock = lambda: T0 + 10.0 * next(ticks)  # noqa: E731
        signer = Signer.from_file(self.key)
        if self.url:
            log: IncidentLog = PostgresIncidentLog(self.url, signer, self.witness, clock)
            store = IncidentStore(PostgresDatabase(self.url, migrate=False), lambda: T0 + 55.0)
        else:
            log = IncidentLog(self.log_path, signer, self.witness, clock)
            store = IncidentStore(self.log_path, lambda: T0 + 55.0)
        grouper = Grouper(store, log)
        log.listeners.append(grouper.on_entry)
        log.append("campaign", ATTACKERS[0], {"joined": ATTACKERS[1], "via": ATTACKERS[0]})
        log.append("campaign", ATTACKERS[0], {"joined": ATTACKERS[2], "via": ATTACKERS[0]})
        log.append("containment", ATTACKERS[1], {"rung": "refuse", "campaign": ATTACKERS[0]})
        log.append("containment", ATTACKERS[2], {"rung": "throttle", "campaign": ATTACKERS[0]})
        (incident,) = store.list()
        store.clock = lambda: T0 + 400.0
        grouper.close(incident.id, "admin", "contained")
        store.close()
        log.close()
        ledger = Ledger(
            PostgresDatabase(self.url) if self.url else self.ledger_path, 1e12, 10_000_000
        )
        assert ledger.submit(ledger_story())
        ledger.flush()
        ledger.close()


def sketch(values: np.ndarray) -> bytes:
    return np.sort(values).astype("<i8").tobytes()


def ledger_story() -> list[Row]:
    """Attack queries (refused and served), honest near-duplicates of some (13 of 16 hashes
    shared: linked), honest unrelated rows, two versions, ties in requests per client, and
    traffic in the hour before the window."""
    rng = np.random.default_rng(7)
    attack = [np.arange(SKETCH, dtype=np.int64) + 1000 * k for k in range(6)]
    rows: list[Row] = []

    def row(t: float, client: str, outcome: str, marks: bytes, predicted: int, version: str):
        confidence = float(rng.uniform(0.3, 1.0))
        rows.append(Row(t, client, "digits", version, f"r{len(rows)}", outcome,
                        int(rng.integers(-(2**62), 2**62)), marks, predicted, confidence,
                        "suspicious" if outcome != "served" else "clean"))  # fmt: skip

    for i in range(40):  # the hour before the window: its class mix and confidence
        row(T0 - 3600 - 1000 + 20 * i, "early", "served", sketch(rng.integers(10**6, 10**9, 16)),
            i % 10, "1")  # fmt: skip
    for k, values in enumerate(attack):
        client = ATTACKERS[k % 3]
        outcome = "refused" if k % 2 else "served"
        row(T0 - 600 + 30 * k, client, outcome, sketch(values), k % 10, "1" if k < 3 else "2")
        near = values.copy()
        near[:3] = rng.integers(10**6, 10**9, 3)  # 13 of 16 shared: a near-duplicate
        row(T0 - 590 + 30 * k, ["alice", "Bob", "_carol"][k % 3], "served", sketch(near), 3, "1")
    for i in range(30):  # honest traffic, unrelated: ties in the requests per client
        client = ["dave", "Erin", "_frank", "alice"][i % 4]
        row(T0 - 300 + 10 * i, client, "served", sketch(rng.integers(10**6, 10**9, 16)),
            int(rng.integers(0, 10)), "2" if i % 3 else "1")  # fmt: skip
    rows.append(rows[-1]._replace(time=T0 + 10**6, request_id="after the window"))
    rows.append(rows[-1]._replace(sketch=b"short", time=T0 - 100))  # no sketch: never linked
    return rows


@pytest.fixture
def backends(tmp_path: Path, icu_db: str) -> dict[str, Backend]:
    """The same story in SQLite files and in PostgreSQL."""
    made = {
        "sqlite": Backend(tmp_path / "sqlite", None),
        "postgres": Backend(tmp_path / "pg", icu_db),
    }
    for backend in made.values():
        backend.record()
    return made


def without_time(text: str) -> str:
    """A report's JSON (or its page) but the moment it was made."""
    return re.sub(r'"generated_at": [-+.0-9eE]+', '"generated_at": 0', text)


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
def test_the_report_finds_the_campaign_and_its_linked_predictions_on_both_backends(
    where: str, backends: dict[str, Backend], repository: Path
) -> None:
    backend = backends[where]
    report = build(1, backend.log_where, backend.ledger_where, repository)
    assert report["incident"]["state"] == "closed" and report["incident"]["closed_at"] == T0 + 400
    assert report["window"] == {"start": T0 - 3600.0, "end": T0 + 400.0}
    assert report["subjects"] == sorted(ATTACKERS)  # by code point, whatever the collation
    assert report["clients_involved"] == sorted(ATTACKERS)
    assert report["campaign_outcomes"] == {"refused": 3, "served": 3}
    assert list(report["campaign_outcomes"]) == ["refused", "served"]
    assert report["campaign_queries"] == 6
    linked = report["linked_served"]
    assert report["linked_served_count"] == 9  # 3 attack queries served, 6 near-duplicates
    assert {r["client"] for r in linked} == {*ATTACKERS, "alice", "Bob", "_carol"}
    assert [r["id"] for r in linked] == sorted(r["id"] for r in linked)
    assert report["attacker_served_count"] == 3 and not report["else_served_to_involved"]
    assert report["versions"] == [
        {"model": "digits", "version": "1", "requests": 18},
        {"model": "digits", "version": "2", "requests": 22},
    ]
    per_client = [(c["client"], c["requests"]) for c in report["requests_per_client"]]
    # ties in the order each client first appears, never in a collation's
    assert per_client == [
        ("alice", 9), ("Erin", 9), ("dave", 8), ("_frank", 7), ("mallory-B", 2),
        ("Mallory-a", 2), ("Bob", 2), ("_mallory-c", 2), ("_carol", 2),
    ]  # fmt: skip
    assert sum(report["series"]["requests"]) == 40 and report["reference"]["version"] == "1"
    assert [e["kind"] for e in report["timeline"]][:3] == ["campaign", "campaign", "containment"]


@pytest.fixture
def gateway(backends: dict[str, Backend], repository: Path) -> Iterator[Callable[..., TestClient]]:
    """An in-process gateway on one backend's files or database (the report's route)."""
    opened: list[TestClient] = []

    def make(where: str) -> TestClient:
        client = TestClient(create_app(backends[where].settings(repository))).__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_the_admin_route_reports_from_postgres_what_it_reports_from_sqlite(
    gateway: Callable[..., TestClient],
) -> None:
    answers = {}
    for where in ("sqlite", "postgres"):
        client = gateway(where)
        data = client.get("/v2/admin/incidents/1/report", headers=ADMIN)
        page = client.get("/v2/admin/incidents/1/report?format=html", headers=ADMIN)
        assert data.status_code == page.status_code == 200, (where, data.text)
        assert page.headers["content-type"].startswith("text/html")
        missing = client.get("/v2/admin/incidents/99/report", headers=ADMIN)
        assert missing.status_code == 404, missing.text
        answers[where] = without_time(data.text), without_time(page.text)
    assert json.loads(answers["postgres"][0])["linked_served_count"] == 9
    assert answers["postgres"][0] == answers["sqlite"][0]
    assert answers["postgres"][1] == answers["sqlite"][1]


def test_a_postgres_gateway_whose_database_is_away_answers_503_for_the_report(
    backends: dict[str, Backend], repository: Path
) -> None:
    settings = backends["postgres"].settings(repository)
    with TestClient(create_app(settings)) as client:
        client.app.state.settings = settings.model_copy(  # type: ignore[attr-defined]
            update={"database_url": "postgresql://bastion@127.0.0.1:1/nowhere"}
        )
        away = client.get("/v2/admin/incidents/1/report", headers=ADMIN)
    assert away.status_code == 503 and "cannot be reached" in away.json()["error"], away.text


def test_the_cli_reports_from_postgres_what_it_reports_from_sqlite(
    backends: dict[str, Backend],
    repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bastion.gateway.cli import app

    sqlite, postgres = backends["sqlite"], backends["postgres"]

    def report(out: str, *options: str, incident: str = "1") -> Any:
        args = ["incidents", "report", incident, "--repository", str(repository)]
        return CliRunner().invoke(app, [*args, "--out", str(tmp_path / out), *options])

    made = report("a", "--log", str(sqlite.log_path), "--ledger", str(sqlite.ledger_path))
    assert made.exit_code == 0, made.output
    made = report("b", "--database-url", str(postgres.url))
    assert made.exit_code == 0 and "9 served predictions linked" in made.output, made.output
    monkeypatch.setenv("BASTION_DATABASE_URL", str(postgres.url))  # the gateway's own setting
    made = report("c")
    assert made.exit_code == 0, made.output
    for name in ("incident-1.json", "incident-1.html"):
        texts = [without_time((tmp_path / d / name).read_text()) for d in "abc"]
        assert texts[1] == texts[0] and texts[2] == texts[0], name
    missing = report("d", incident="99")
    assert missing.exit_code == 1 and "no incident 99" in missing.output, missing.output
    monkeypatch.setenv("BASTION_DATABASE_URL", "postgresql://bastion@127.0.0.1:1/nowhere")
    away = report("e")
    assert away.exit_code == 2 and "PostgreSQL" in away.output, away.output
