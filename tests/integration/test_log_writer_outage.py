"""The background log writer through a PostgreSQL outage: what the defence decided while the
database was down is kept (within the backlog), written in order once it is back, and what
did not fit is counted as dropped; ``close`` returns in bounded time if it never comes back.

The tests share one cluster of their own, which they stop and start again; each takes a fresh
database. Attempts are observed through the log's ``append`` (an event when one fails), never
through sleeps.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bastion.gateway.incidents.database import DatabaseUnavailable
from bastion.gateway.incidents.log_postgres import PostgresIncidentLog
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.verify import verify
from bastion.gateway.incidents.writer import LogWriter
from bastion.gateway.monitoring.metrics import Metrics

pytestmark = pytest.mark.slow
RETRY_S = (0.02, 0.2)  # short back-off: the tests wait for the writer, not for the clock


class Outage:
    """One database on the module's cluster, its log, and the cluster's ``stop``/``start``."""

    def __init__(self, cluster: Any, tmp: Path) -> None:
        self.cluster, self.up = cluster, True
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.url = cluster.url.rsplit("/", 1)[0] + "/" + name
        self.signer, self.witness = Signer.from_file(tmp / "signing.key"), tmp / "witness.json"
        self.log = PostgresIncidentLog(self.url, self.signer, self.witness)
        self.failed = threading.Event()  # set when an append finds the database away
        append = self.log.append

        def observed(*args: Any, **kwargs: Any) -> Any:
            try:
                return append(*args, **kwargs)
            except DatabaseUnavailable:
                self.failed.set()
                raise

        self.log.append = observed  # type: ignore[method-assign]

    def stop(self) -> None:
        self.cluster.stop()
        self.up = False

    def start(self) -> None:
        self.cluster.start()
        self.up = True

    def subjects(self) -> list[str]:
        return [e.subject for e in self.log.entries(limit=10_000)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as started:
        yield started


@pytest.fixture
def outage(cluster: Any, tmp_path: Path) -> Iterator[Outage]:
    made = Outage(cluster, tmp_path)
    yield made
    if not made.up:  # a failed test leaves the cluster up for the next
        made.start()
    made.log.close()


def flushed(writer: LogWriter, seconds: float = 60.0) -> bool:
    """Whether ``writer.flush()`` returned within ``seconds`` (a stuck writer fails the test
    instead of hanging it)."""
    done = threading.Thread(target=writer.flush, daemon=True)
    done.start()
    done.join(seconds)
    return not done.is_alive()


def test_entries_decided_while_postgres_is_down_are_written_in_order_once_it_is_back(
    outage: Outage,
) -> None:
    dropped: list[int] = []
    writer = LogWriter(outage.log, 100, lambda: dropped.append(1), retry_s=RETRY_S)
    for i in range(3):
        assert writer.submit("campaign", f"before-{i}", {"i": i})
    assert flushed(writer)
    outage.stop()
    started = time.monotonic()
    assert writer.submit("containment", "during-0", {"rung": "refuse"})
    assert outage.failed.wait(30)  # the writer tried, found the database away, kept it
    for i in range(1, 20):
        kind = "campaign" if i % 2 else "containment"
        assert writer.submit(kind, f"during-{i}", {"i": i})
    assert time.monotonic() - started < 5.0  # submit never waited for the database
    outage.start()
    assert flushed(writer)
    writer.close()
    expected = [f"before-{i}" for i in range(3)] + [f"during-{i}" for i in range(20)]
    assert outage.subjects() == expected
    assert not dropped
    verdict = verify(outage.url, outage.signer.public_key, outage.witness)
    assert verdict.ok and verdict.entries == verdict.witnessed == 23, verdict.problems


def test_what_overflows_the_backlog_during_an_outage_is_counted_as_dropped(
    outage: Outage,
) -> None:
    metrics = Metrics()
    writer = LogWriter(outage.log, 5, metrics.incident_log_dropped.inc, retry_s=RETRY_S)
    outage.stop()
    assert writer.submit("containment", "held", {})
    assert outage.failed.wait(30)  # the writer holds "held" and retries it
    accepted = [writer.submit("containment", f"queued-{i}", {}) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert not writer.submit("campaign", "link", {})  # links fill at most half the backlog
    dropped = metrics.private_registry.get_sample_value("bastion_incident_log_dropped_total")
    assert dropped == 4.0
    outage.start()
    assert flushed(writer)
    writer.close()
    assert outage.subjects() == ["held", *(f"queued-{i}" for i in range(5))]
    assert metrics.private_registry.get_sample_value("bastion_incident_log_dropped_total") == 4.0


def test_close_gives_up_in_bounded_time_when_postgres_stays_down(outage: Outage) -> None:
    dropped: list[int] = []
    writer = LogWriter(outage.log, 100, lambda: dropped.append(1), RETRY_S, drain_s=0.5)
    outage.stop()
    for i in range(10):
        assert writer.submit("containment", f"lost-{i}", {})
    assert outage.failed.wait(30)
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 5.0  # the drain's half second and one last attempt
    assert len(dropped) == 10  # every entry not written is counted
    assert not writer.submit("containment", "after-close", {})
    assert len(dropped) == 11
    outage.start()
    assert outage.subjects() == []
