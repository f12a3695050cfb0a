"""The served-prediction ledger in PostgreSQL: the SQLite ledger's rows and bounds, shared by
replicas, and rows counted as dropped (never a stuck writer) while the database is away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest

from bastion.gateway.incidents.database import PostgresDatabase
from bastion.gateway.incidents.factory import open_ledger
from bastion.gateway.incidents.ledger import Ledger, Row, ledger_rows
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings

pytestmark = pytest.mark.slow


def rows_for(n: int, t: float, client: str = "lab") -> list[Row]:
    images = np.zeros((n, 1, 28, 28), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    prints = np.arange(n * 50, dtype=np.int64).reshape(n, 50)  # a sketch to store
    probabilities = np.eye(10, dtype=np.float32)[np.arange(n) % 10] * 0.9 + 0.01
    outputs = {"probabilities": probabilities}
    verdicts = ["clean"] * n
    rows = ledger_rows(("digits", "1"), (client, "r1"), images, outputs, prints, verdicts, "served")
    return [r._replace(time=t) for r in rows]


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "ledger.db"
    return request.getfixturevalue("postgres_db")


def opened(where: Path | str, **kwargs: object) -> Ledger:
    target = PostgresDatabase(where) if isinstance(where, str) else where
    return Ledger(target, **kwargs)  # type: ignore[arg-type]


def test_rows_are_written_as_they_were_built_on_both_backends(where: Path | str) -> None:
    ledger = opened(where, retention_s=100.0, max_rows=1000)
    rows = rows_for(3, t=5.0)
    assert ledger.submit(rows)
    ledger.flush()
    assert ledger.count() == 3 and ledger.written == 3
    ledger.close()
    if isinstance(where, str):
        with psycopg.connect(where) as conn:
            stored = conn.execute("SELECT * FROM served ORDER BY id").fetchall()
    else:
        import sqlite3

        conn = sqlite3.connect(where)
        stored = conn.execute("SELECT * FROM served ORDER BY id").fetchall()
        conn.close()
    assert [Row(*row[1:]) for row in stored] == rows  # every column, the sketch's bytes too


def test_the_ledger_keeps_within_age_and_size_on_both_backends(where: Path | str) -> None:
    now = [1000.0]
    ledger = opened(where, retention_s=100.0, max_rows=1000, clock=lambda: now[0])
    for t in range(30):
        assert ledger.submit(rows_for(64, t=800.0 + 10 * t))  # 1,920 rows, t = 800 .. 1090
    ledger.flush()
    assert ledger.written == 1920 and ledger.count() == 1920
    assert ledger.sweep() == 1920 - 1000 and ledger.count() == 1000
    now[0] = 1200.0  # everything now older than the retention
    assert ledger.sweep() == 1000 and ledger.count() == 0
    ledger.close()


def test_replicas_writing_one_table_share_one_bound(postgres_db: str) -> None:
    now = [1000.0]
    ledgers = [
        opened(postgres_db, retention_s=1e6, max_rows=1000, clock=lambda: now[0]) for _ in "ab"
    ]
    for t in range(10):
        for i, ledger in enumerate(ledgers):
            assert ledger.submit(rows_for(64, t=900.0 + t, client=f"replica-{i}"))
    for ledger in ledgers:
        ledger.flush()
    assert ledgers[0].count() == ledgers[1].count() == 1280
    ledgers[1].sweep()
    assert ledgers[0].count() == 1000  # the oldest beyond the bound, whoever wrote them
    for ledger in ledgers:
        ledger.close()


def test_rows_are_dropped_and_counted_while_postgres_is_away(tmp_path: Path) -> None:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as cluster:
        dropped: list[int] = []
        ledger = opened(cluster.url, retention_s=100.0, max_rows=1000, on_drop=dropped.append)
        ledger.submit(rows_for(4, t=1.0))
        ledger.flush()
        cluster.stop()
        ledger.submit(rows_for(5, t=2.0))
        ledger.flush()  # returns: the writer gave the batch up, it did not hang
        assert dropped == [5]
        cluster.start()
        ledger.submit(rows_for(6, t=3.0))
        ledger.flush()
        assert ledger.count() == 10 and dropped == [5]
        ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "off"])
def test_open_ledger_follows_the_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db") if backend == "postgres" else None
    settings = Settings(
        database_url=url, ledger=backend != "off", ledger_path=tmp_path / "ledger.db"
    )
    metrics = Metrics()
    ledger = open_ledger(settings, metrics)
    if backend == "off":
        assert ledger is None
        return
    assert ledger is not None
    ledger.submit(rows_for(2, t=1.0))
    ledger.close()
    assert (tmp_path / "ledger.db").exists() is (url is None)
    if url:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM served").fetchone() == (2,)
