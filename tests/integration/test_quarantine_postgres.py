"""The quarantine store in PostgreSQL: the SQLite store's behaviour on a real server, quotas
that hold across replicas writing at once, one quarantine for every replica, retention, and no
acknowledged record while the database is away."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

import tests.unit.test_quarantine_bounds as unit_bounds
from bastion.gateway.app import create_app
from bastion.gateway.incidents.database import DatabaseUnavailable
from bastion.gateway.quarantine import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    QUARANTINED,
    RECORDS_QUOTA,
    RELEASED,
    REVIEW,
    NewItem,
    PostgresQuarantineStore,
    Quota,
    SQLiteQuarantineStore,
)
from bastion.gateway.quarantine.factory import open_store
from bastion.gateway.quarantine.retention import RetentionSweep
from bastion.gateway.quarantine.tensors import encode_array
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float
from tests.conftest import flag_every_image
from tests.unit.quarantine_helpers import Clock, item

# The unit tier's behavioural tests, run again here on PostgreSQL: they take their store from
# the ``store`` fixture, or build it with ``bounded(store_path, **quota)``; below, both give a
# PostgreSQL store on a fresh database. (Tests about SQLite's file, pragmas and schema steps
# stay in the unit tier only.)
from tests.unit.test_quarantine_bounds import (  # noqa: F401
    test_bytes_quota_counts_stored_input_bytes,
    test_client_quota_drops_new_records_and_keeps_the_old,
    test_clients_without_an_id_share_one_quota_bucket,
    test_concurrent_writers_never_overshoot_a_quota,
    test_expire_deletes_the_oldest_rows_in_bounded_chunks,
    test_long_strings_are_truncated_to_their_caps_and_marked,
    test_paging_past_sqlite_integers_is_a_value_error,
    test_records_quota_drops_new_records_and_raises_the_alarm,
    test_review_copies_never_use_up_a_clients_room_for_withheld_records,
    test_stats_of_an_empty_store,
    test_stats_sum_up_status_model_clients_age_quota_and_drops,
    test_strings_within_their_caps_are_stored_unchanged,
    test_totals_follow_every_insert_and_delete,
)
from tests.unit.test_quarantine_store import (  # noqa: F401
    test_bad_filters_raise_value_error,
    test_count_matches_filters,
    test_empty_request_writes_nothing,
    test_json_fields_round_trip_as_plain_floats,
    test_list_is_newest_first_and_filters_by_model_and_status,
    test_list_reads_input_only_when_asked,
    test_object_arrays_are_refused_and_nothing_is_written,
    test_paging_walks_every_record_exactly_once,
    test_purge_accepts_more_ids_than_sqlite_binds,
    test_purge_by_status_age_and_ids,
    test_purge_without_filters_refuses_to_wipe,
    test_records_of_one_request_list_last_item_first,
    test_release_keeps_input_and_is_idempotent,
    test_review_records_keep_their_status_and_are_never_released,
    test_round_trip_keeps_every_dtype_shape_and_bit,
    test_store_satisfies_the_protocol,
    test_unknown_ids_are_none_on_get_and_key_error_on_release,
)

pytestmark = pytest.mark.slow
DAY = 86400.0


@pytest.fixture
def store(postgres_db: str) -> Iterator[PostgresQuarantineStore]:
    with PostgresQuarantineStore(postgres_db, clock=Clock()) as s:
        yield s


@pytest.fixture
def store_path(postgres_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the unit tests' ``bounded`` opens its stores: here, the test's database."""

    def bounded(where: str | Path = postgres_db, **quota: int) -> PostgresQuarantineStore:
        return PostgresQuarantineStore(str(where), quota=Quota(**quota), clock=Clock())

    monkeypatch.setattr(unit_bounds, "bounded", bounded)
    return postgres_db


def from_client(client: str | None, index: int = 0, size: int = 48) -> NewItem:
    return NewItem("resnet", "1", client, "req", index, np.zeros(size, np.uint8), {}, {}, "adv")


@pytest.fixture
def replicas(postgres_db: str) -> Iterator[Callable[..., PostgresQuarantineStore]]:
    """Opens stores on one database, as replicas do (each its own connection); closes them."""
    opened: list[PostgresQuarantineStore] = []

    def replica(**kwargs: Any) -> PostgresQuarantineStore:
        opened.append(PostgresQuarantineStore(postgres_db, **kwargs))
        return opened[-1]

    yield replica
    for s in opened:
        s.close()


@pytest.mark.parametrize(
    ("quota", "reason", "kept"),
    [({"max_records": 25}, RECORDS_QUOTA, 25), ({"max_bytes": 25 * 176}, BYTES_QUOTA, 25)],
)
def test_replicas_writing_at_once_never_exceed_a_global_quota(
    replicas: Callable[..., PostgresQuarantineStore],
    quota: dict[str, int],
    reason: str,
    kept: int,
) -> None:
    assert len(encode_array(np.zeros(48, np.uint8))) == 176  # the bytes quota's unit
    stores = [replicas(quota=Quota(**quota)) for _ in range(2)]
    threads, batches = 8, 6
    start = threading.Barrier(threads)

    def write(n: int) -> list[str | None]:
        start.wait(timeout=10)
        mine = stores[n % 2]
        return [
            id_
            for b in range(batches)
            for id_ in mine.add_many([from_client(f"c{n}-{b}", i) for i in range(3)])
        ]

    with ThreadPoolExecutor(threads) as pool:
        ids = [i for f in [pool.submit(write, n) for n in range(threads)] for i in f.result(60)]
    stored = [i for i in ids if i is not None]
    assert len(stored) == kept == len(set(stored))
    assert stores[0].count() == stores[1].count() == kept
    assert {r.id for r in stores[1].list(limit=100)} == set(stored)
    usages = [s.usage() for s in stores]
    assert sum(u.dropped[reason] for u in usages) == threads * batches * 3 - kept
    assert all(u.over_quota for u in usages)  # the alarm is the shared store's, on both


def test_replicas_writing_at_once_lose_nothing_and_share_no_id(
    replicas: Callable[..., PostgresQuarantineStore],
) -> None:
    stores = [replicas() for _ in range(2)]
    threads, batches = 8, 10
    start = threading.Barrier(threads)

    def write(n: int) -> list[str | None]:
        start.wait(timeout=10)
        return [i for _ in range(batches) for i in stores[n % 2].add_many([item()] * 3)]

    with ThreadPoolExecutor(threads) as pool:
        ids = [i for f in [pool.submit(write, n) for n in range(threads)] for i in f.result(60)]
    assert None not in ids and len(set(ids)) == threads * batches * 3
    assert stores[0].usage().records == stores[1].count() == len(ids)
    assert {r.id for r in stores[0].list(limit=1000)} == set(ids)


def test_a_record_written_through_one_replica_is_reviewed_through_another(
    replicas: Callable[..., PostgresQuarantineStore],
) -> None:
    a, b = replicas(clock=Clock()), replicas(clock=Clock(1_800_000_000.0))
    sent = np.arange(12, dtype=np.float32).reshape(3, 4)
    withheld, review = a.add_many([item(array=sent), replace(item(index=1), status=REVIEW)])
    assert withheld is not None and review is not None
    assert [r.id for r in b.list()] == [review, withheld]
    assert b.count(status=QUARANTINED) == 1 and b.count(status=REVIEW) == 1
    seen = b.get(withheld)
    assert seen is not None and seen.input is not None
    assert seen.input.tobytes() == sent.tobytes() and seen.input.dtype == sent.dtype
    released = b.release(withheld, note="false positive")
    again = a.release(withheld, note="second opinion")
    assert (again.status, again.released_at, again.note) == (
        RELEASED,
        released.released_at,
        "false positive",
    )
    assert [r.id for r in a.list(status=RELEASED)] == [withheld]
    assert a.stats().by_status == {QUARANTINED: 0, RELEASED: 1, REVIEW: 1}
    assert b.purge(ids=[review]) == 1
    assert a.get(review) is None and a.usage().records == 1


def test_a_purge_through_another_replica_clears_the_shared_alarm(
    replicas: Callable[..., PostgresQuarantineStore],
) -> None:
    a, b = replicas(quota=Quota(max_records=1)), replicas(quota=Quota(max_records=1))
    (kept,) = a.add_many([from_client("x")])
    assert b.add_many([from_client("y")]) == [None]
    assert a.usage().over_quota and b.usage().over_quota
    assert b.usage().dropped[RECORDS_QUOTA] == 1 and a.usage().dropped[RECORDS_QUOTA] == 0
    assert a.purge(ids=[kept]) == 1
    assert not a.usage().over_quota and not b.usage().over_quota


def test_retention_deletes_old_records_in_postgres(postgres_db: str) -> None:
    now = [1_700_000_000.0]
    with PostgresQuarantineStore(postgres_db, clock=lambda: now[0]) as store:
        old = store.add_many([item(index=i) for i in range(5)])
        now[0] += 2 * DAY
        new = store.add_many([item(index=9)])
        now[0] += 29 * DAY  # the old ones are 31 days old, the new one 29
        sweep = RetentionSweep(store, 30 * DAY, 600, batch_rows=2, clock=lambda: now[0])
        deleted, usage = sweep.sweep()
        assert deleted == 5 and usage.records == 1
        assert [r.id for r in store.list()] == new
        assert all(store.get(i) is None for i in old if i is not None)
    with psycopg.connect(postgres_db) as conn:  # what another replica (or psql) sees
        assert conn.execute("SELECT COUNT(*) FROM quarantine").fetchone() == (1,)
        assert conn.execute("SELECT records FROM quarantine_totals").fetchone() == (1,)


def test_two_replicas_sweeping_at_once_both_finish(
    replicas: Callable[..., PostgresQuarantineStore],
) -> None:
    now = [1_700_000_000.0]
    stores = [replicas(clock=lambda: now[0]) for _ in range(2)]
    for n in range(20):
        stores[n % 2].add_many([item(index=i) for i in range(20)])
    now[0] += 2 * DAY
    sweeps = [RetentionSweep(s, DAY, 600, batch_rows=7, clock=lambda: now[0]) for s in stores]
    with ThreadPoolExecutor(2) as pool:
        done = [f.result(60) for f in [pool.submit(s.sweep) for s in sweeps]]
    assert sum(deleted for deleted, _ in done) == 400
    assert stores[0].count() == 0 and stores[1].usage().records == 0


def test_a_request_id_with_nul_is_still_stored(store: PostgresQuarantineStore) -> None:
    (id_,) = store.add_many([replace(item(), request_id="a\x00b", client_id="\ud800")])
    record = store.get(id_)
    assert record is not None and record.request_id == "a\ufffdb" and record.client_id == "\ufffd"


def test_a_write_while_postgres_is_down_raises_and_nothing_is_stored() -> None:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as cluster:
        store = PostgresQuarantineStore(cluster.url)
        try:
            before = store.add_many([item(request_id="before")])
            cluster.stop()
            with pytest.raises(DatabaseUnavailable):
                store.add_many([item(request_id="during")])
            with pytest.raises(OSError):  # what the gateway's callers catch
                store.usage()
            cluster.start()
            after = store.add_many([item(request_id="after")])  # the connection is reopened
            assert None not in after
            assert [r.request_id for r in store.list()] == ["after", "before"]
            assert store.get(before[0]) is not None and store.usage().records == 2
        finally:
            store.close()


def test_a_store_cannot_be_opened_while_postgres_is_down() -> None:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as cluster:
        cluster.stop()
        with pytest.raises(DatabaseUnavailable):
            PostgresQuarantineStore(cluster.url)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_open_store_follows_the_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db") if backend == "postgres" else None
    path = tmp_path / "quarantine.db"
    settings = Settings(database_url=url, quarantine_path=path, quarantine_max_records_per_client=1)
    store = open_store(settings)
    try:
        kind = PostgresQuarantineStore if url else SQLiteQuarantineStore
        assert isinstance(store, kind)
        assert store.quota.max_records_per_client == 1
        assert store.add_many([from_client("c"), from_client("c")])[1] is None
        assert store.usage().dropped[CLIENT_QUOTA] == 1
    finally:
        store.close()
    assert path.exists() is (url is None)


# -- through the gateway: two replicas in process, one database ---------------------------------

ADMIN = {"Authorization": "Bearer tok"}


@pytest.fixture
def gateways(repository: Path, tmp_path: Path) -> Iterator[Callable[[str], TestClient]]:
    """Starts gateways on a database (each its own witness file, as each pod has its own)
    that quarantine every image; stops them at the end."""
    started: list[TestClient] = []

    def start(url: str) -> TestClient:
        settings = Settings(
            model_repository=flag_every_image(repository),
            admin_token="tok",
            torch_threads=1,
            database_url=url,
            quarantine_path=tmp_path / "never-used.db",
            incident_checkpoint_path=tmp_path / f"witness-{len(started)}",
        )
        client = TestClient(create_app(settings)).__enter__()
        started.append(client)
        action = {"action": "quarantine"}
        response = client.post("/v2/models/digits/screening/action", json=action, headers=ADMIN)
        assert response.status_code == 200, response.text
        return client

    yield start
    for client in started:
        client.__exit__(None, None, None)
    assert not (tmp_path / "never-used.db").exists()


def infer(client: TestClient, n: int, request_id: str) -> Any:
    pixels = to_float(load_split("test")[0][:n])
    data = pixels.ravel().tolist()
    tensor = {"name": "images", "datatype": "FP32", "shape": list(pixels.shape), "data": data}
    body = {"id": request_id, "inputs": [tensor]}
    return client.post("/v2/models/digits/infer", json=body, headers={"X-Client-ID": "mallory"})


def test_a_record_quarantined_by_one_gateway_is_released_through_another(
    gateways: Callable[[str], TestClient], postgres_db: str
) -> None:
    a, b = gateways(postgres_db), gateways(postgres_db)
    refused = infer(a, 2, "r-a")
    assert refused.status_code == 403, refused.text
    ids = refused.json()["quarantine_ids"]
    assert len(ids) == 2
    listed = b.get("/v2/quarantine", headers=ADMIN).json()
    assert listed["total"] == 2 and {r["id"] for r in listed["items"]} == set(ids)
    assert {r["request_id"] for r in listed["items"]} == {"r-a"}
    released = b.post(f"/v2/quarantine/{ids[0]}/release", json={"note": "fp"}, headers=ADMIN)
    assert released.status_code == 200 and released.json()["status"] == RELEASED
    seen = a.get(f"/v2/quarantine/{ids[0]}", headers=ADMIN).json()
    assert seen["status"] == RELEASED and seen["note"] == "fp" and seen["input"]["shape"]
    stats = a.get("/v2/quarantine/stats", headers=ADMIN).json()
    assert stats["by_status"] == {QUARANTINED: 1, RELEASED: 1, REVIEW: 0}


def test_a_gateway_whose_database_is_down_never_names_a_record_it_does_not_have(
    gateways: Callable[[str], TestClient],
) -> None:
    from tests.services.postgres import postgres_cluster

    with postgres_cluster() as cluster:
        gateway = gateways(cluster.url)
        assert len(infer(gateway, 1, "before").json()["quarantine_ids"]) == 1
        cluster.stop()
        try:
            during = infer(gateway, 1, "during")
        finally:
            cluster.start()
        assert during.status_code == 503, during.text  # neither served nor acknowledged
        assert "quarantine_ids" not in during.json() and "probabilities" not in during.text
        assert len(infer(gateway, 1, "after").json()["quarantine_ids"]) == 1
        listed = gateway.get("/v2/quarantine", headers=ADMIN).json()["items"]
        assert [r["request_id"] for r in listed] == ["after", "before"]
