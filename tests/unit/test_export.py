"""Restore: the quarantine exported as a labelled dataset, and the export logged."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bastion.gateway.incidents.export import export
from bastion.gateway.quarantine.sqlite import SQLiteQuarantineStore
from bastion.gateway.quarantine.store import REVIEW, NewItem


def item(i: int, status: str = "quarantined", shape: tuple[int, ...] = (1, 28, 28)) -> NewItem:
    image = np.full(shape, i / 10, np.float32)
    return NewItem("digits", "1", f"client-{i}", f"r{i}", 0, image, {"fs": 1.0}, {"fs": 0.5},
                   "adversarial" if status != REVIEW else "suspicious", status)  # fmt: skip


def test_the_export_holds_every_input_with_its_verdict_and_label(tmp_path: Path) -> None:
    with SQLiteQuarantineStore(tmp_path / "q.db") as store:
        ids = store.add_many([item(i) for i in range(3)] + [item(3, REVIEW)])
        store.release(ids[1], "a seven, not an attack")
        done = export(store, tmp_path / "out")
    assert done["count"] == 4
    assert done["labels"] == {"adversarial": 2, "clean": 1, "unreviewed": 1}
    with np.load(tmp_path / "out" / "quarantine-export.npz") as loaded:
        data = {key: loaded[key] for key in loaded.files}
    with (tmp_path / "out" / "quarantine-export.csv").open() as manifest:
        rows = list(csv.DictReader(manifest))
    assert data["images"].shape == (4, 1, 28, 28) and list(data["ids"]) == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in rows}
    assert by_id[ids[1]]["label"] == "clean" and by_id[ids[1]]["note"] == "a seven, not an attack"
    for r in rows:  # the exact tensor, in the manifest's order
        i = int(r["client_id"].split("-")[1])
        assert np.array_equal(
            data["images"][int(r["index"])], np.full((1, 28, 28), i / 10, np.float32)
        )


def test_mixed_shapes_or_nothing_to_export_is_a_clear_error(tmp_path: Path) -> None:
    with SQLiteQuarantineStore(tmp_path / "q.db") as store:
        with pytest.raises(ValueError, match="no quarantine record"):
            export(store, tmp_path / "out")
        store.add_many([item(0), item(1, shape=(3, 32, 32))])
        with pytest.raises(ValueError, match="one --model at a time"):
            export(store, tmp_path / "out")


def test_a_client_chosen_string_is_no_spreadsheet_formula(tmp_path: Path) -> None:
    with SQLiteQuarantineStore(tmp_path / "q.db") as store:
        evil = replace(item(0), request_id='=HYPERLINK("http://x","y")')
        store.add_many([evil])
        export(store, tmp_path / "out")
    with (tmp_path / "out" / "quarantine-export.csv").open() as manifest:
        (row,) = list(csv.DictReader(manifest))
    assert row["request_id"].startswith("'=")
