"""The quarantine store's bounds: string caps, quotas checked atomically with the insert,
expiry and stats."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bastion.gateway.quarantine import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    QUARANTINED,
    RECORDS_QUOTA,
    RELEASED,
    REVIEW,
    Caps,
    NewItem,
    Quota,
    SQLiteQuarantineStore,
)
from bastion.gateway.quarantine.schema import MIGRATIONS
from bastion.gateway.quarantine.sqlite import _CLIENT_REVIEWS, _CLIENT_WITHHELD, SCHEMA_VERSION
from bastion.gateway.quarantine.store import TRUNCATED
from bastion.gateway.quarantine.tensors import encode_array
from tests.unit.quarantine_helpers import Clock

# -- bounds: caps on stored strings, quotas, stats -------------------------------------------


def bounded(path: str | Path = ":memory:", **quota: int) -> SQLiteQuarantineStore:
    return SQLiteQuarantineStore(path, quota=Quota(**quota), caps=Caps(), clock=Clock())


def from_client(client: str | None, index: int = 0, size: int = 48) -> NewItem:
    return NewItem("resnet", "1", client, "req", index, np.zeros(size, np.uint8), {}, {}, "adv")


def test_long_strings_are_truncated_to_their_caps_and_marked(store: SQLiteQuarantineStore) -> None:
    huge = "x" * (1 << 20)
    new = NewItem(huge, huge, huge, huge, 0, np.zeros(2, np.uint8), {huge: 1.0}, {}, huge)
    (id_,) = store.add_many([new])
    record = store.release(id_, note=huge)
    caps = Caps()
    assert record.client_id == "x" * (caps.client_id_chars - 1) + TRUNCATED
    assert record.request_id is not None and len(record.request_id) == caps.request_id_chars
    assert record.note is not None and len(record.note) == caps.note_chars
    assert record.note.endswith(TRUNCATED)
    for name in (record.model, record.version, record.verdict, *record.scores):
        assert len(name) == caps.name_chars and name.endswith(TRUNCATED)


def test_strings_within_their_caps_are_stored_unchanged(store: SQLiteQuarantineStore) -> None:
    exact = "c" * Caps().client_id_chars
    (id_,) = store.add_many([from_client(exact)])
    record = store.release(id_, note="n" * Caps().note_chars)
    assert record.client_id == exact and record.note == "n" * Caps().note_chars


def test_the_attack_that_grew_the_database_by_229_mib_now_stores_kilobytes(
    tmp_path: Path,
) -> None:
    """One request: a 1 MiB request id, a 1 MiB client id, 64 flagged 28x28 images."""
    with bounded(tmp_path / "q.db", max_records_per_client=10) as store:
        image = np.zeros((1, 28, 28), np.float32)
        items = [
            NewItem("digits", "1", "c" * (1 << 20), "r" * (1 << 20), i, image, {}, {}, "adv")
            for i in range(64)
        ]
        ids = store.add_many(items)
        assert sum(i is not None for i in ids) == 10
        assert store.usage().dropped[CLIENT_QUOTA] == 54
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 1 << 20  # db, WAL (if any)


def test_client_quota_drops_new_records_and_keeps_the_old(store_path: Path) -> None:
    with bounded(store_path, max_records_per_client=3) as store:
        first = store.add_many([from_client("mallory", i) for i in range(2)])
        second = store.add_many([from_client("mallory", i) for i in range(2, 5)])
        assert None not in first
        assert second[0] is not None and second[1:] == [None, None]
        alice = store.add_many([from_client("alice")])[0]
        assert alice is not None
        assert {r.id for r in store.list()} == {*first, second[0], alice}
        usage = store.usage()
        assert usage.records == 4 and usage.dropped[CLIENT_QUOTA] == 2
        assert not usage.over_quota  # a per-client quota is no global alarm


def test_clients_without_an_id_share_one_quota_bucket(store_path: Path) -> None:
    with bounded(store_path, max_records_per_client=2) as store:
        ids = store.add_many([from_client(None, i) for i in range(3)])
        assert ids[2] is None and None not in ids[:2]
        assert store.usage().dropped[CLIENT_QUOTA] == 1


def test_records_quota_drops_new_records_and_raises_the_alarm(store_path: Path) -> None:
    with bounded(store_path, max_records=3) as store:
        kept = store.add_many([from_client(f"c{i}") for i in range(2)])
        assert None not in kept and not store.usage().over_quota
        kept += store.add_many([from_client("c2")])
        assert None not in kept and store.usage().over_quota  # full: the next one is refused
        assert store.add_many([from_client("late")]) == [None]
        usage = store.usage()
        assert usage.records == 3 and usage.over_quota
        assert usage.dropped == {RECORDS_QUOTA: 1, BYTES_QUOTA: 0, CLIENT_QUOTA: 0}
        assert {r.id for r in store.list()} == set(kept)  # old evidence is never evicted
        assert store.purge(ids=kept[:1]) == 1
        assert not store.usage().over_quota
        assert store.add_many([from_client("late")])[0] is not None


def test_bytes_quota_counts_stored_input_bytes(store_path: Path) -> None:
    encoded = len(encode_array(np.zeros(48, np.uint8)))
    empty = len(encode_array(np.zeros(0, np.uint8)))
    with bounded(store_path, max_bytes=3 * encoded + empty) as store:
        ids = store.add_many([from_client(f"c{i}") for i in range(4)])
        assert ids[3] is None and None not in ids[:3]
        usage = store.usage()
        assert usage.bytes == 3 * encoded and usage.dropped[BYTES_QUOTA] == 1
        assert usage.over_quota  # refused for bytes, though below the byte limit
        small = store.add_many([from_client("tiny", size=0)])
        assert small[0] is not None  # a smaller input still fits
        assert store.usage().over_quota  # evidence was lost: the alarm stays until space frees
        store.purge(ids=ids[:1])
        assert not store.usage().over_quota


def test_totals_follow_every_insert_and_delete(store: SQLiteQuarantineStore) -> None:
    sizes = [len(encode_array(np.zeros(n, np.uint8))) for n in (10, 20, 30)]
    ids = store.add_many([from_client("a", i, size=n) for i, n in enumerate((10, 20, 30))])
    assert (store.usage().records, store.usage().bytes) == (3, sum(sizes))
    store.purge(ids=ids[1:2])
    assert (store.usage().records, store.usage().bytes) == (2, sizes[0] + sizes[2])
    assert store.expire(older_than=float("inf")) == 2
    assert (store.usage().records, store.usage().bytes) == (0, 0)


@pytest.mark.parametrize(
    ("quota", "reason"),
    [({"max_records_per_client": 7}, CLIENT_QUOTA), ({"max_records": 7}, RECORDS_QUOTA)],
)
def test_concurrent_writers_never_overshoot_a_quota(
    store_path: Path, quota: dict[str, int], reason: str
) -> None:
    threads, per_thread = 8, 5
    start = threading.Barrier(threads)

    def write(store: SQLiteQuarantineStore) -> list[str | None]:
        start.wait(timeout=10)
        return [i for _ in range(per_thread) for i in store.add_many([from_client("m")] * 2)]

    stores = [bounded(store_path, **quota) for _ in range(2)]  # two connections, one file
    try:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(write, stores[n % 2]) for n in range(threads)]
            ids = [i for f in futures for i in f.result(timeout=30)]
        kept = [i for i in ids if i is not None]
        assert len(kept) == 7 == stores[0].count()
        dropped = sum(s.usage().dropped[reason] for s in stores)
        assert dropped == threads * per_thread * 2 - 7
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("query", [_CLIENT_REVIEWS, _CLIENT_WITHHELD], ids=["review", "withheld"])
def test_the_per_client_counts_read_only_the_client_index(query: str) -> None:
    conn = sqlite3.connect(":memory:")
    for statement in [s for step in MIGRATIONS for s in step]:
        conn.execute(statement)
    plan = conn.execute(f"EXPLAIN QUERY PLAN {query}", ("m",)).fetchall()
    assert "COVERING INDEX quarantine_client_status" in plan[0][3]
    conn.close()


def test_review_copies_never_use_up_a_clients_room_for_withheld_records(
    store_path: Path,
) -> None:
    with bounded(store_path, max_records_per_client=2) as store:
        review = [replace(from_client("orders", i), status=REVIEW) for i in range(3)]
        assert [id_ is not None for id_ in store.add_many(review)] == [True, True, False]
        withheld = store.add_many([from_client("orders", 9), from_client("orders", 10)])
        assert all(withheld)  # the client's two withheld records still fit
        assert store.usage().dropped[CLIENT_QUOTA] == 1


def test_expire_deletes_the_oldest_rows_in_bounded_chunks(store: SQLiteQuarantineStore) -> None:
    ids = [store.add_many([from_client("a", i)])[0] for i in range(5)]
    cutoff = store.get(ids[3]).created_at  # type: ignore[union-attr]
    assert store.expire(cutoff, max_rows=2) == 2
    assert store.expire(cutoff, max_rows=2) == 1
    assert store.expire(cutoff, max_rows=2) == 0
    assert [r.id for r in store.list()] == ids[:2:-1]


def test_stats_sum_up_status_model_clients_age_quota_and_drops(store_path: Path) -> None:
    with bounded(store_path, max_records_per_client=3) as store:
        store.add_many([from_client("mallory", i) for i in range(5)])
        store.add_many([from_client(None), from_client("alice")])
        vit = NewItem("vit", "2", "alice", None, 0, np.zeros(4, np.uint8), {}, {}, "adv")
        released = store.add_many([vit])[0]
        assert released is not None
        store.release(released)
        review = NewItem("vit", "2", "bob", None, 0, np.zeros(4, np.uint8), {}, {}, "s", REVIEW)
        store.add_many([review])
        stats = store.stats(top_clients=2)
    assert stats.usage.records == 7
    assert stats.by_status == {QUARANTINED: 5, RELEASED: 1, REVIEW: 1}
    assert stats.by_model == {"resnet": 5, "vit": 2}
    assert stats.top_clients == [("mallory", 3), ("alice", 2)]
    assert stats.oldest is not None and stats.newest is not None
    assert stats.oldest < stats.newest
    assert stats.quota.max_records_per_client == 3
    assert stats.usage.dropped[CLIENT_QUOTA] == 2


def test_stats_of_an_empty_store(store: SQLiteQuarantineStore) -> None:
    stats = store.stats()
    assert stats.usage.records == 0 and stats.usage.bytes == 0
    assert stats.by_status == {QUARANTINED: 0, RELEASED: 0, REVIEW: 0} and stats.by_model == {}
    assert stats.oldest is None and stats.newest is None and stats.top_clients == []


def test_a_version_1_database_is_migrated_with_its_totals(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    blob = encode_array(np.arange(5, dtype=np.uint8))
    conn.execute(
        "INSERT INTO quarantine (id, created_at, model, version, client_id, request_id,"
        " image_index, scores, thresholds, verdict, status, input)"
        " VALUES ('a1', 1.0, 'm', '1', 'c', 'r', 0, '{}', '{}', 'adv', 'quarantined', ?)",
        (blob,),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with SQLiteQuarantineStore(path) as store:
        assert store.pragmas()["user_version"] == SCHEMA_VERSION
        assert (store.usage().records, store.usage().bytes) == (1, len(blob))
        record = store.get("a1")
        assert record is not None and record.input is not None
        assert record.input.tolist() == [0, 1, 2, 3, 4]
        # the rebuilt tables keep the totals triggers: a new record still counts
        store.add_many([from_client("after")])
        assert store.usage().records == 2


def test_quota_and_caps_refuse_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="quota"):
        Quota(max_records=0)
    with pytest.raises(ValueError, match="cap"):
        Caps(note_chars=0)


def test_paging_past_sqlite_integers_is_a_value_error(store: SQLiteQuarantineStore) -> None:
    with pytest.raises(ValueError, match="offset"):
        store.list(offset=2**70)
