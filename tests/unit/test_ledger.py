"""The served-prediction ledger: rows in batches off the hot path, bounded by age and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.gateway.defence.fingerprint import FingerprintSpec, fingerprints
from bastion.gateway.incidents.ledger import (
    SKETCH_MATCH,
    Ledger,
    Row,
    ledger_rows,
    shared,
    sketches,
)
from bastion.models.data import load_split, to_float


def rows_for(n: int, client: str = "lab", t: float = 0.0) -> list[Row]:
    images = np.zeros((n, 1, 28, 28), np.float32)
    images[:, 0, 0, 0] = np.arange(n)  # distinct bytes
    probabilities = np.eye(10, dtype=np.float32)[np.arange(n) % 10] * 0.9 + 0.01
    rows = ledger_rows(
        ("digits", "1"),
        (client, "r1"),
        images,
        {"logits": np.zeros((n, 10), np.float32), "probabilities": probabilities},
        None,
        ["clean"] * n,
        "served",
    )
    return [r._replace(time=t) for r in rows]


def test_rows_carry_the_class_confidence_and_hash_of_what_was_answered() -> None:
    images = to_float(load_split("test")[0][:3])
    logits = np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    rows = ledger_rows(
        ("m", "2"), (None, None), images, {"out": logits}, None, ["a"] * 3, "withheld"
    )
    assert [r.predicted for r in rows] == [1, 0, 2]
    assert rows[0].confidence > 0.98 and rows[2].confidence < 0.6  # softmax of the logits
    assert rows[0].client == "(anonymous)" and rows[0].outcome == "withheld"
    assert len({r.input_hash for r in rows}) == 3 and rows[0].sketch == b""


def test_near_duplicates_share_their_sketch_and_other_digits_do_not() -> None:
    spec = FingerprintSpec(salt=3)
    digits = to_float(load_split("test")[0][:40])
    step = digits.copy()
    step[:, 0, 14, 10:14] += 0.01  # an attack's next step: new bytes, same picture
    marks = sketches(fingerprints(torch.from_numpy(np.concatenate([digits, step])), spec).numpy())
    near = [shared(marks[i], marks[40 + i]) for i in range(40)]
    others = [shared(marks[i], marks[j]) for i in range(40) for j in range(40) if i != j]
    assert min(near) >= SKETCH_MATCH, near
    assert np.mean(np.array(others) >= SKETCH_MATCH) < 0.01


def test_the_ledger_writes_in_batches_and_keeps_within_age_and_size(tmp_path: Path) -> None:
    now = [1000.0]
    ledger = Ledger(tmp_path / "ledger.db", retention_s=100, max_rows=1000, clock=lambda: now[0])
    for t in range(30):
        assert ledger.submit(rows_for(64, t=800.0 + 10 * t))  # 1,920 rows, t = 800 .. 1090
    ledger.flush()
    assert ledger.written == 1920 and ledger.count() == 1920
    removed = ledger.sweep()  # older than 900 s, then the oldest beyond 1,000 rows
    assert removed == 1920 - 1000 and ledger.count() == 1000
    ledger.close()


def test_a_full_backlog_drops_rows_and_counts_them(tmp_path: Path) -> None:
    dropped: list[int] = []
    ledger = Ledger(tmp_path / "l.db", 100, 1000, backlog=1, on_drop=dropped.append)
    results = [ledger.submit(rows_for(4)) for _ in range(200)]
    ledger.close()
    assert not all(results) and sum(dropped) == 4 * results.count(False)


def test_rows_are_built_on_the_writer_thread_and_a_bad_request_stops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(tmp_path / "l.db", 100, 1000)
    images = np.zeros((2, 1, 28, 28), np.float32)
    probabilities = np.full((2, 10), 0.1, np.float32)
    ok = (("digits", "1"), ("lab", "r"), images, {"probabilities": probabilities}, None)
    assert ledger.submit_request(*ok, ["clean", "clean"], "served", 5.0)
    assert ledger.submit_request(("digits", "1"), ("lab", "r"), images, {}, None, [], "served", 6.0)
    assert ledger.submit_request(*ok, ["clean", "suspicious"], "withheld", 7.0)
    ledger.flush()
    assert ledger.count() == 4  # the malformed request (no outputs) was skipped and logged
    assert "could not build the rows" in caplog.text
    ledger.close()


def test_a_non_finite_output_is_recorded_not_a_lost_batch(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db", 100, 1000)
    images = np.zeros((2, 1, 28, 28), np.float32)
    logits = np.array([[np.inf] * 10, [np.nan] * 10], np.float32)
    ledger.submit_request(("m", "1"), ("c", "r"), images, {"logits": logits}, None, ["a", "a"],
                          "served", 1.0)  # fmt: skip
    ledger.submit(rows_for(3))
    ledger.flush()
    assert ledger.count() == 5
    ledger.close()


def test_rows_carry_the_drift_monitors_statistics_and_an_embedding_summary() -> None:
    from bastion.gateway.incidents.ledger import EMBEDDING_SUMMARY
    from bastion.gateway.monitoring.reference import scalar_statistics

    images = to_float(load_split("test")[0][:5])
    probabilities = np.random.default_rng(1).dirichlet(np.ones(10), 5).astype(np.float32)
    embeddings = np.random.default_rng(2).normal(size=(5, 128)).astype(np.float32)
    rows = ledger_rows(
        ("m", "1"), ("c", None), images, {"probabilities": probabilities}, None,
        ["clean"] * 5, "served", 1.0, embeddings,
    )  # fmt: skip
    expected = scalar_statistics(torch.from_numpy(images), torch.from_numpy(probabilities))
    got = np.array([[r.confidence, r.margin, r.pixel_mean, r.pixel_std] for r in rows]).T
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    summaries = [np.frombuffer(r.embedding, "<f4") for r in rows]
    assert all(s.shape == (EMBEDDING_SUMMARY,) for s in summaries)
    # the projection keeps distances in expectation: farther embeddings, farther summaries
    far = embeddings.copy()
    far[0] += 10.0
    moved = ledger_rows(("m", "1"), ("c", None), images, {"probabilities": probabilities},
                        None, ["clean"] * 5, "served", 1.0, far)  # fmt: skip
    shift = np.linalg.norm(np.frombuffer(moved[0].embedding, "<f4") - summaries[0])
    assert shift > 10.0 and moved[1].embedding == rows[1].embedding


def test_a_ledger_file_from_before_the_drift_columns_gains_them(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE served (id INTEGER PRIMARY KEY, time REAL NOT NULL, client TEXT NOT "
            "NULL, model TEXT NOT NULL, version TEXT NOT NULL, request_id TEXT, outcome TEXT NOT "
            "NULL, input_hash INTEGER NOT NULL, sketch BLOB NOT NULL, predicted INTEGER NOT "
            "NULL, confidence REAL NOT NULL, tier TEXT NOT NULL)"
        )
        old.execute("INSERT INTO served VALUES (1, 0, 'c', 'm', '1', NULL, 'served', 1, x'', 3, "
                    "0.9, 'clean')")  # fmt: skip
    ledger = Ledger(path, 3600.0, 1000)
    ledger.submit(rows_for(2, t=1.0))
    ledger.flush()
    ledger.close()
    with sqlite3.connect(path) as db:
        margins = [row[0] for row in db.execute("SELECT margin FROM served ORDER BY id")]
    assert margins[0] is None and margins[1] == pytest.approx(0.9, abs=1e-6)
