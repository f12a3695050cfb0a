"""The incident log and its incidents in PostgreSQL: the SQLite log's contract, and replicas.

Each test runs on a fresh database of the session's real cluster (``postgres_db``); the outage
test runs its own cluster, which it stops and starts again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from pymerkle import InmemoryTree
from typer.testing import CliRunner

from bastion.gateway.incidents.database import DatabaseUnavailable, PostgresDatabase
from bastion.gateway.incidents.factory import open_incidents, open_log
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.log import Entry, IncidentLog, TamperedLog
from bastion.gateway.incidents.log_postgres import PostgresIncidentLog
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.store import CLOSED, OPEN, IncidentStore
from bastion.gateway.incidents.verify import Verdict, verify
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings

pytestmark = pytest.mark.slow


class Backend:
    """One log's database: the SQLite file, or a PostgreSQL database (``url``)."""

    def __init__(self, tmp: Path, url: str | None) -> None:
        self.tmp, self.url = tmp, url
        self.file = tmp / "incidents.db"
        self.signer = Signer.from_file(tmp / "signing.key")

    def open(self, witness: str = "witness.json") -> IncidentLog:
        clock = iter(float(t) for t in range(1_000_000)).__next__
        if self.url:
            return PostgresIncidentLog(self.url, self.signer, self.tmp / witness, clock)
        return IncidentLog(self.file, self.signer, self.tmp / witness, clock)

    def store(self) -> IncidentStore:
        return IncidentStore(PostgresDatabase(self.url) if self.url else self.file)

    def verify(self, witness: str | None = "witness.json") -> Verdict:
        where = self.url or self.file
        return verify(where, self.signer.public_key, witness and self.tmp / witness)

    def tamper(self, *statements: str) -> None:
        if self.url:
            with psycopg.connect(self.url) as conn:
                for statement in statements:
                    conn.execute(statement)
            return
        conn = sqlite3.connect(self.file)
        with conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = request.getfixturevalue("postgres_db") if request.param == "postgres" else None
    return Backend(tmp_path, url)


@pytest.fixture
def replicas(postgres_db: str, tmp_path: Path) -> Iterator[tuple[IncidentLog, IncidentLog]]:
    """Two gateways' logs on one database: one key, a witness file each."""
    backend = Backend(tmp_path, postgres_db)
    first, second = backend.open("witness-a.json"), backend.open("witness-b.json")
    yield first, second
    first.close()
    second.close()


# -- the same contract on both backends ------------------------------------------------------


def test_entries_are_appended_paged_and_verified_on_both_backends(backend: Backend) -> None:
    log = backend.open()
    seen: list[int] = []
    log.listeners.append(lambda e: seen.append(e.seq))
    for i in range(12):
        kind = "containment" if i % 3 else "campaign"
        log.append(kind, f"client-{i % 4}", {"rung": "refuse", "i": i})
    assert seen == list(range(1, 13))
    assert [e.seq for e in log.entries(after=10)] == [11, 12]
    assert [e.seq for e in log.entries(subject="client-1")] == [2, 6, 10]
    assert [e.seq for e in log.entries(kinds=("campaign",), limit=2)] == [1, 4]
    assert [e.seq for e in log.entries(since=10.0)] == [11, 12]  # the clock counts from 0
    assert log.entries(after=1, limit=1)[0].body == {"rung": "refuse", "i": 1}
    head = log.head()
    assert head is not None and head.size == 12
    with pytest.raises(ValueError, match="unknown"):
        log.append("no-such-kind", "x", {})
    log.close()
    verdict = backend.verify()
    assert verdict.ok, verdict.problems
    assert (verdict.entries, verdict.checkpoints, verdict.witnessed) == (12, 12, 12)


def test_an_edited_entry_is_named_on_both_backends(backend: Backend) -> None:
    log = backend.open()
    for i in range(6):
        log.append("containment", f"client-{i}", {"rung": "refuse"})
    log.close()
    backend.tamper("""UPDATE log_entries SET body = '{"rung":"observe"}' WHERE seq = 4""")
    verdict = backend.verify()
    assert not verdict.ok and verdict.first_bad == 4, verdict.problems


def test_a_log_cut_short_refuses_the_next_append_on_both_backends(backend: Backend) -> None:
    log = backend.open()
    for i in range(5):
        log.append("campaign", f"c-{i}", {"i": i})
    backend.tamper(
        "DELETE FROM log_entries WHERE seq > 3", "DELETE FROM log_checkpoints WHERE size > 3"
    )
    with pytest.raises(TamperedLog):
        log.append("campaign", "after-the-cut", {})
    log.close()
    assert not backend.verify().ok  # the witness (outside the database) still says 5


def test_incidents_open_gather_and_close_on_both_backends(backend: Backend) -> None:
    log = backend.open()
    grouper = Grouper(backend.store(), log)
    log.listeners.append(grouper.on_entry)
    log.append("campaign", "mallory-0", {"joined": "mallory-1", "via": "mallory-0"})
    log.append("containment", "mallory-1", {"rung": "refuse", "campaign": "mallory-0"})
    (incident,) = grouper.store.list()
    assert incident.state == OPEN and "mallory-1 contained" in incident.title
    log.append("containment", "mallory-2", {"rung": "throttle", "campaign": "mallory-0"})
    kinds = [e.kind for e in grouper.store.timeline(incident.id)]
    assert kinds == ["campaign", "containment", "incident_opened", "containment"]
    assert set(grouper.store.subjects(incident.id)) == {"mallory-0", "mallory-1", "mallory-2"}
    grouper.close(incident.id, "admin", "contained")
    with pytest.raises(ValueError, match="closed already"):
        grouper.close(incident.id, "admin", None)
    with pytest.raises(KeyError):
        grouper.close(999, "admin", None)
    closed = grouper.store.get(incident.id)
    assert closed.state == CLOSED and closed.note == "contained" and closed.entries == 5
    grouper.store.close()
    log.close()
    assert backend.verify().ok


# -- replicas on one PostgreSQL log ------------------------------------------------------------


def test_two_replicas_appending_at_once_make_one_log_without_gaps(
    replicas: tuple[IncidentLog, IncidentLog], postgres_db: str, tmp_path: Path
) -> None:
    def append_many(log: IncidentLog, name: str) -> list[int]:
        return [log.append("campaign", f"{name}-{i}", {"i": i}).seq for i in range(40)]

    jobs = [(log, f"{n}-{t}") for n, log in zip("ab", replicas, strict=True) for t in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        acknowledged = [
            seq for seqs in pool.map(lambda job: append_many(*job), jobs) for seq in seqs
        ]
    assert sorted(acknowledged) == list(range(1, 241))  # no gap, no seq given twice
    key = Signer.from_file(tmp_path / "signing.key").public_key
    for witness in ("witness-a.json", "witness-b.json"):
        verdict = verify(postgres_db, key, tmp_path / witness)
        assert verdict.ok, verdict.problems
        assert verdict.entries == verdict.checkpoints == 240
    assert replicas[0].head() == replicas[1].head()


def test_a_replica_catches_up_with_what_another_appended(
    replicas: tuple[IncidentLog, IncidentLog], postgres_db: str, tmp_path: Path
) -> None:
    first, second = replicas
    for i in range(5):
        first.append("campaign", f"a-{i}", {"i": i})
    entry = second.append("release", "b-0", {})  # its tree had none of the five
    assert entry.seq == 6
    tree = InmemoryTree("sha256")
    for e in first.entries(limit=100):
        tree.append_entry(e.content())
    head = second.head()
    assert head is not None and (head.size, head.root) == (6, tree.get_root())
    late = Backend(tmp_path, postgres_db).open("witness-c.json")  # a replica started later
    assert late.append("release", "c-0", {}).seq == 7
    late.close()
    assert first.append("campaign", "a-5", {}).seq == 8
    verdict = verify(postgres_db, second.signer.public_key, tmp_path / "witness-b.json")
    assert verdict.ok and verdict.entries == 8, verdict.problems


def test_a_replica_with_another_signing_key_is_refused(
    replicas: tuple[IncidentLog, IncidentLog], postgres_db: str, tmp_path: Path
) -> None:
    replicas[0].append("campaign", "a", {})
    stranger = Signer.from_file(tmp_path / "other.key")
    with pytest.raises(ValueError, match="same key file"):
        PostgresIncidentLog(postgres_db, stranger)
    assert replicas[1].append("campaign", "b", {}).seq == 2


def test_another_replicas_entry_is_followed_within_a_second(
    replicas: tuple[IncidentLog, IncidentLog],
) -> None:
    first, second = replicas
    assert isinstance(second, PostgresIncidentLog)
    arrived: list[tuple[float, Entry]] = []
    event = threading.Event()

    def got(entry: Entry) -> None:
        arrived.append((time.monotonic(), entry))
        event.set()

    follower = second.follow(got)
    assert follower.listening.wait(5)
    second.append("release", "own", {})  # its own: its listeners had it, not the follower
    appended = time.monotonic()
    entry = first.append("route_change", "digits", {"to": 2})
    assert event.wait(1.0), "no notification within a second"
    assert [e for _, e in arrived] == [entry] and arrived[0][0] - appended < 1.0
    follower.close()
    everything: list[Entry] = []
    every = second.follow(everything.append, after=0, own=True)
    assert _eventually(lambda: len(everything) == 2)
    assert [e.subject for e in everything] == ["own", "digits"]
    second.close()  # closes its followers
    assert not every.listening.is_set()


def test_an_append_while_postgres_is_down_raises_and_the_log_is_intact_after(
    tmp_path: Path,
) -> None:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as cluster:
        backend = Backend(tmp_path, cluster.url)
        log = backend.open()
        seen: list[int] = []
        log.listeners.append(lambda e: seen.append(e.seq))
        for i in range(3):
            log.append("campaign", f"before-{i}", {"i": i})
        cluster.stop()
        with pytest.raises(DatabaseUnavailable):
            log.append("containment", "during", {"rung": "refuse"})
        with pytest.raises(DatabaseUnavailable):  # again: not acknowledged, not queued
            log.append("containment", "during", {"rung": "refuse"})
        assert seen == [1, 2, 3]
        cluster.start()
        assert log.append("release", "after", {}).seq == 4  # a new connection, same log
        assert [e.subject for e in log.entries()] == [*(f"before-{i}" for i in range(3)), "after"]
        log.close()
        verdict = backend.verify()
        assert verdict.ok and verdict.entries == verdict.witnessed == 4, verdict.problems


# -- the composition and the command line -----------------------------------------------------


def settings_for(tmp: Path, url: str | None) -> Settings:
    return Settings(
        database_url=url,
        incident_log_path=tmp / "incidents.db",
        incident_key_path=tmp / "signing.key",
        incident_checkpoint_path=tmp / "witness.json",
    )


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
def test_open_incidents_puts_the_log_where_the_settings_say(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db") if where == "postgres" else None
    metrics = Metrics()
    log, grouper = open_incidents(settings_for(tmp_path, url), metrics)
    assert isinstance(log, PostgresIncidentLog) is (url is not None)
    log.append("containment", "mallory", {"rung": "refuse", "campaign": "mallory"})
    assert [i.trigger for i in grouper.store.list()] == ["containment"]
    sample = metrics.private_registry.get_sample_value(
        "bastion_incident_log_entries_total", {"kind": "containment"}
    )
    assert sample == 1.0
    grouper.store.close()
    log.close()
    assert (tmp_path / "incidents.db").exists() is (url is None)


def test_cli_verify_checks_the_log_in_postgres(
    postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.gateway.cli import app

    settings = settings_for(tmp_path, postgres_db)
    log = open_log(settings)
    for i in range(4):
        log.append("key_created", f"key-{i}", {"client": "orders"}, "admin")
    log.close()
    monkeypatch.setenv("BASTION_INCIDENT_KEY_PATH", str(tmp_path / "signing.key"))
    run: Callable[..., object] = CliRunner().invoke
    args = ["incidents", "verify", "--database-url", postgres_db]
    ok = run(app, args)
    assert ok.exit_code == 0 and "ok: 4 entries, 4 signed checkpoints" in ok.output, ok.output
    monkeypatch.setenv("BASTION_DATABASE_URL", postgres_db)  # the gateway's own setting
    assert (
        run(app, ["incidents", "verify", "--witness", str(tmp_path / "witness.json")]).exit_code
        == 0
    )
    Backend(tmp_path, postgres_db).tamper("UPDATE log_entries SET actor = 'nobody' WHERE seq = 2")
    bad = run(app, ["incidents", "verify"])
    assert bad.exit_code == 1 and "TAMPERED: first bad entry 2" in bad.output, bad.output
    monkeypatch.setenv("BASTION_DATABASE_URL", "postgresql://bastion@127.0.0.1:1/nowhere")
    away = run(app, ["incidents", "verify"])
    assert away.exit_code == 2 and "PostgreSQL" in away.output


def _eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False
