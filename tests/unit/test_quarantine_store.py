"""The SQLite quarantine store: exact tensors, newest-first listing, release, purge, durability,
and its bounds: string caps, quotas checked atomically with the insert, expiry, stats."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gateway.quarantine import (
    BYTES_QUOTA,
    CLIENT_QUOTA,
    QUARANTINED,
    RECORDS_QUOTA,
    RELEASED,
    Caps,
    NewItem,
    QuarantineStore,
    Quota,
    SQLiteQuarantineStore,
)
from gateway.quarantine.schema import MIGRATIONS
from gateway.quarantine.sqlite import SCHEMA_VERSION, encode_array
from gateway.quarantine.store import TRUNCATED

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A clock that ticks one second per reading, so order never depends on real time."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def item(
    model: str = "resnet",
    index: int = 0,
    array: np.ndarray | None = None,
    request_id: str | None = "req-1",
) -> NewItem:
    return NewItem(
        model=model,
        version="1",
        client_id="client-a",
        request_id=request_id,
        image_index=index,
        input=np.zeros((3, 4, 4), np.float32) if array is None else array,
        scores={"squeeze": 0.9},
        thresholds={"squeeze": 0.5},
        verdict="adversarial",
    )


@pytest.fixture
def store() -> Iterator[SQLiteQuarantineStore]:
    with SQLiteQuarantineStore(":memory:", clock=Clock()) as s:
        yield s


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


def tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    nan_payload = np.array([0x7FC00001, 0xFFC00000, 0x80000000], np.uint32).view(np.float32)
    return [
        rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8),
        nan_payload.reshape(1, 3),
        rng.standard_normal((4, 5)).astype(np.float16),
        np.asfortranarray(rng.standard_normal((3, 7))),
        np.array(42, np.int64),
        np.array([True, False, True]),
        (rng.standard_normal(4) + 1j).astype(np.complex64),
        np.zeros((0, 3), np.float32),
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.arange(40, dtype=np.int16).reshape(5, 8)[::2, 1::3],
    ]


def test_round_trip_keeps_every_dtype_shape_and_bit(store: SQLiteQuarantineStore) -> None:
    arrays = tensors()
    ids = store.add_many([item(index=i, array=a) for i, a in enumerate(arrays)])
    assert len(set(ids)) == len(arrays)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    for i, (id_, sent) in enumerate(zip(ids, arrays, strict=True)):
        record = store.get(id_)
        assert record is not None and record.input is not None
        assert record.image_index == i
        assert record.input.dtype == sent.dtype
        assert record.input.shape == sent.shape
        assert record.input.tobytes() == sent.tobytes()


def test_object_arrays_are_refused_and_nothing_is_written(store: SQLiteQuarantineStore) -> None:
    with pytest.raises(ValueError, match="object"):
        store.add_many([item(), item(array=np.array([{"a": 1}], dtype=object))])
    with pytest.raises(TypeError, match="ndarray"):
        store.add_many([item(array=[1, 2, 3])])  # type: ignore[arg-type]
    assert store.count() == 0


def test_json_fields_round_trip_as_plain_floats(store: SQLiteQuarantineStore) -> None:
    new = NewItem(
        model="vit",
        version="2024-05",
        client_id=None,
        request_id=None,
        image_index=np.int64(3),  # type: ignore[arg-type]
        input=np.ones(2, np.float32),
        scores={"squeeze": np.float32(0.25), "lid": float("inf"), "mahal": 1e-300},
        thresholds={"squeeze": 0.125, "lid": -2.5},
        verdict="adversarial:squeeze",
    )
    (id_,) = store.add_many([new])
    record = store.get(id_)
    assert record is not None
    assert record.scores == {"squeeze": 0.25, "lid": float("inf"), "mahal": 1e-300}
    assert all(type(v) is float for v in record.scores.values())
    assert record.thresholds == {"squeeze": 0.125, "lid": -2.5}
    assert (record.model, record.version, record.verdict) == ("vit", "2024-05", new.verdict)
    assert record.client_id is None and record.request_id is None
    assert record.image_index == 3
    assert record.status == QUARANTINED and record.released_at is None and record.note is None


def test_list_is_newest_first_and_filters_by_model_and_status(
    store: SQLiteQuarantineStore,
) -> None:
    a = store.add_many([item("resnet")])[0]
    b = store.add_many([item("vit")])[0]
    c = store.add_many([item("resnet")])[0]
    store.release(b)
    assert [r.id for r in store.list()] == [c, b, a]
    assert [r.id for r in store.list(model="resnet")] == [c, a]
    assert [r.id for r in store.list(status=RELEASED)] == [b]
    assert [r.id for r in store.list(model="resnet", status=QUARANTINED)] == [c, a]
    assert store.list(model="vit", status=QUARANTINED) == []
    created = [r.created_at for r in store.list()]
    assert created == sorted(created, reverse=True)


def test_records_of_one_request_list_last_item_first(store: SQLiteQuarantineStore) -> None:
    ids = store.add_many([item(index=i) for i in range(3)])
    listed = store.list()
    assert [r.id for r in listed] == ids[::-1]
    assert len({r.created_at for r in listed}) == 1


def test_paging_walks_every_record_exactly_once(store: SQLiteQuarantineStore) -> None:
    for n in range(4):
        store.add_many([item(index=i, request_id=f"r{n}") for i in range(3)])
    everything = [r.id for r in store.list(limit=1000)]
    pages = [store.list(limit=5, offset=o) for o in range(0, 15, 5)]
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [r.id for p in pages for r in p] == everything
    assert store.list(limit=0) == []
    assert store.list(offset=12) == []


def test_list_reads_input_only_when_asked(store: SQLiteQuarantineStore) -> None:
    sent = np.arange(12, dtype=np.uint8).reshape(3, 4)
    store.add_many([item(array=sent)])
    (summary,) = store.list()
    assert summary.input is None
    assert summary.scores == {"squeeze": 0.9}
    (full,) = store.list(include_input=True)
    assert full.input is not None and np.array_equal(full.input, sent)


def test_count_matches_filters(store: SQLiteQuarantineStore) -> None:
    store.add_many([item("resnet"), item("resnet", 1)])
    released = store.add_many([item("vit")])[0]
    store.release(released)
    assert store.count() == 3
    assert store.count(model="resnet") == 2
    assert store.count(status=RELEASED) == 1
    assert store.count(model="vit", status=QUARANTINED) == 0


def test_release_keeps_input_and_is_idempotent(store: SQLiteQuarantineStore) -> None:
    sent = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    (id_,) = store.add_many([item(array=sent)])
    first = store.release(id_, note="false positive: glare")
    assert first.status == RELEASED and first.note == "false positive: glare"
    assert first.released_at is not None and first.released_at > first.created_at
    assert first.input is not None and first.input.tobytes() == sent.tobytes()
    again = store.release(id_, note="second click")
    assert (again.status, again.released_at, again.note) == (
        RELEASED,
        first.released_at,
        first.note,
    )
    stored = store.get(id_)
    assert stored is not None and stored.input is not None
    assert stored.input.tobytes() == sent.tobytes()


def test_unknown_ids_are_none_on_get_and_key_error_on_release(
    store: SQLiteQuarantineStore,
) -> None:
    assert store.get("0" * 32) is None
    with pytest.raises(KeyError):
        store.release("0" * 32)


def test_purge_by_status_age_and_ids(store: SQLiteQuarantineStore) -> None:
    old = store.add_many([item(index=0), item(index=1)])
    cutoff = store.list()[0].created_at + 0.5
    new = store.add_many([item(index=0), item(index=1), item(index=2)])
    store.release(new[0])
    store.release(old[0])
    assert store.purge(status=RELEASED, older_than=cutoff) == 1
    assert store.get(old[0]) is None
    assert store.purge(older_than=cutoff) == 1
    assert store.purge(ids=[new[1], "f" * 32]) == 1
    assert store.purge(status=RELEASED) == 1
    assert store.purge(ids=[]) == 0
    assert [r.id for r in store.list()] == [new[2]]


def test_purge_accepts_more_ids_than_sqlite_binds(store: SQLiteQuarantineStore) -> None:
    ids = store.add_many([item(index=i) for i in range(3)])
    assert store.purge(ids=[f"{n:032x}" for n in range(40_000)] + ids[:2]) == 2
    assert store.count() == 1


def test_purge_without_filters_refuses_to_wipe(store: SQLiteQuarantineStore) -> None:
    store.add_many([item()])
    with pytest.raises(ValueError, match="at least one"):
        store.purge()
    assert store.count() == 1


def test_bad_filters_raise_value_error(store: SQLiteQuarantineStore) -> None:
    with pytest.raises(ValueError, match="status"):
        store.list(status="Released")
    with pytest.raises(ValueError, match="status"):
        store.count(status="deleted")
    with pytest.raises(ValueError, match="status"):
        store.purge(status="gone")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=-1)
    with pytest.raises(ValueError, match="offset"):
        store.list(offset=-5)


def test_empty_request_writes_nothing(store: SQLiteQuarantineStore) -> None:
    assert store.add_many([]) == []
    assert store.count() == 0


def test_store_satisfies_the_protocol(store: SQLiteQuarantineStore) -> None:
    assert isinstance(store, QuarantineStore)


def test_reopened_file_shows_records_of_an_earlier_store(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "quarantine.db"
    sent = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    with SQLiteQuarantineStore(path) as writer:
        ids = writer.add_many([item(array=sent), item(index=1)])
        writer.release(ids[1], note="ok")
    with SQLiteQuarantineStore(path) as reader:
        first = reader.get(ids[0])
        assert first is not None and first.input is not None
        assert first.input.tobytes() == sent.tobytes()
        assert [r.id for r in reader.list(status=RELEASED)] == [ids[1]]
        assert reader.pragmas()["user_version"] == SCHEMA_VERSION


def test_file_store_runs_wal_with_synchronous_full(tmp_path: Path) -> None:
    with SQLiteQuarantineStore(tmp_path / "q.db", busy_timeout_s=2.5) as s:
        pragmas = s.pragmas()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2
    assert pragmas["busy_timeout"] == 2500
    assert pragmas["user_version"] == SCHEMA_VERSION


def test_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    SQLiteQuarantineStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteQuarantineStore(path)


WRITER = """
import sys
import numpy as np
from gateway.quarantine import NewItem, SQLiteQuarantineStore

store = SQLiteQuarantineStore(sys.argv[1])
x = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
n = 0
while True:
    items = [NewItem("m", "1", None, str(n), i, x, {"s": 0.9}, {"s": 0.5}, "adv") for i in range(2)]
    print(" ".join(store.add_many(items)), flush=True)
    n += 1
"""


def test_ids_acknowledged_before_sigkill_survive(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    lines = []
    try:
        for _ in range(25):
            line = child.stdout.readline()
            assert line.endswith("\n"), child.stderr.read()
            lines.append(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    lines += [line for line in child.stdout.readlines() if line.endswith("\n")]
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    acknowledged = [id_ for line in lines for id_ in line.split()]
    assert len(acknowledged) >= 50
    with SQLiteQuarantineStore(path) as survivor:
        assert all(survivor.get(id_) is not None for id_ in acknowledged)
        assert survivor.count() in (len(acknowledged), len(acknowledged) + 2)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def add_batches(store: SQLiteQuarantineStore, start: threading.Barrier, n: int) -> list[str]:
    start.wait(timeout=10)
    return [i for k in range(n) for i in store.add_many([item(index=j) for j in range(3)])]


def test_threads_sharing_a_store_lose_nothing(tmp_path: Path) -> None:
    threads = 8
    start = threading.Barrier(threads)
    with SQLiteQuarantineStore(tmp_path / "q.db") as store, ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(add_batches, store, start, 10) for _ in range(threads)]
        ids = [i for f in futures for i in f.result(timeout=30)]
        assert len(set(ids)) == threads * 10 * 3
        assert store.count() == len(ids)
        assert {r.id for r in store.list(limit=len(ids))} == set(ids)


def test_separate_stores_on_one_file_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    stores = [SQLiteQuarantineStore(path) for _ in range(4)]
    start = threading.Barrier(len(stores))
    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            futures = [pool.submit(add_batches, s, start, 5) for s in stores]
            ids = [i for f in futures for i in f.result(timeout=30)]
    finally:
        for s in stores:
            s.close()
    with SQLiteQuarantineStore(path) as reader:
        assert reader.count() == len(ids) == len(stores) * 5 * 3


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


def test_the_per_client_count_reads_only_the_client_index() -> None:
    conn = sqlite3.connect(":memory:")
    for statement in [s for step in MIGRATIONS for s in step]:
        conn.execute(statement)
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM quarantine WHERE client_id IS ?", ("m",)
    ).fetchall()
    assert "COVERING INDEX quarantine_client" in plan[0][3]
    conn.close()


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
        stats = store.stats(top_clients=2)
    assert stats.usage.records == 6
    assert stats.by_status == {QUARANTINED: 5, RELEASED: 1}
    assert stats.by_model == {"resnet": 5, "vit": 1}
    assert stats.top_clients == [("mallory", 3), ("alice", 2)]
    assert stats.oldest is not None and stats.newest is not None
    assert stats.oldest < stats.newest
    assert stats.quota.max_records_per_client == 3
    assert stats.usage.dropped[CLIENT_QUOTA] == 2


def test_stats_of_an_empty_store(store: SQLiteQuarantineStore) -> None:
    stats = store.stats()
    assert stats.usage.records == 0 and stats.usage.bytes == 0
    assert stats.by_status == {QUARANTINED: 0, RELEASED: 0} and stats.by_model == {}
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


def test_quota_and_caps_refuse_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="quota"):
        Quota(max_records=0)
    with pytest.raises(ValueError, match="cap"):
        Caps(note_chars=0)


def test_paging_past_sqlite_integers_is_a_value_error(store: SQLiteQuarantineStore) -> None:
    with pytest.raises(ValueError, match="offset"):
        store.list(offset=2**70)
