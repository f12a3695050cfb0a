"""The SQLite quarantine store: exact tensors, newest-first listing, release, purge, durability.
Its bounds (caps, quotas, expiry, stats) are in test_quarantine_bounds.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bastion.gateway.quarantine import (
    QUARANTINED,
    RELEASED,
    REVIEW,
    NewItem,
    QuarantineStore,
    SQLiteQuarantineStore,
)
from bastion.gateway.quarantine.sqlite import SCHEMA_VERSION
from tests.unit.quarantine_helpers import item

ROOT = Path(__file__).resolve().parents[2]


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


def test_review_records_keep_their_status_and_are_never_released(
    store: SQLiteQuarantineStore,
) -> None:
    suspicious = replace(item(), verdict="suspicious", status=REVIEW)
    review_id, _ = store.add_many([suspicious, item()])
    assert [r.id for r in store.list(status=REVIEW)] == [review_id]
    assert store.count(status=QUARANTINED) == 1
    unchanged = store.release(review_id, note="nothing to release")
    assert (unchanged.status, unchanged.released_at, unchanged.note) == (REVIEW, None, None)


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
from bastion.gateway.quarantine import NewItem, SQLiteQuarantineStore

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
