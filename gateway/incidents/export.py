"""Restore: the quarantined and reviewed inputs as a dataset for retraining on sanitised data.

``bastion quarantine export`` reads the quarantine store (offline: the SQLite file, or the
PostgreSQL database the replicas share) and writes the inputs as one
NumPy ``.npz`` (``images``: the exact tensors, stacked; ``ids``) and a CSV manifest, one row
per input in the same order: its id, time, model and version, client and request, the
screening verdict, its status and the label an analyst's review gives it:

- ``released``: an admin marked it a false positive: label ``clean``;
- ``quarantined``: withheld and never released: label ``adversarial``;
- ``review``: a suspicious input that was served, not yet judged: label ``unreviewed``.

The export is an entry of the incident log (its count and the SHA-256 of the files).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from bastion.gateway.progress import Progress
from bastion.gateway.quarantine.store import QUARANTINED, RELEASED, REVIEW, QuarantineStore

LABELS = {RELEASED: "clean", QUARANTINED: "adversarial", REVIEW: "unreviewed"}
PAGE = 1000
FIELDS = ("index", "id", "created_at", "model", "version", "client_id", "request_id",
          "image_index", "verdict", "status", "label", "note", "released_at")  # fmt: skip


def _cell(value: object) -> object:
    """A string a spreadsheet would run as a formula (a client chooses request ids) is quoted
    with a leading apostrophe (OWASP's CSV injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def export(
    store: QuarantineStore,
    out: Path,
    model: str | None = None,
    status: str | None = None,
    limit: int = 1_000_000,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Writes ``quarantine-export.npz`` and ``quarantine-export.csv`` into ``out``; returns
    what the log records; ``progress`` advances by the records read. Raises ValueError when
    the inputs differ in shape or dtype (export one ``model`` at a time) or there is nothing
    to export."""
    records = []
    while len(records) < limit:
        page = store.list(model, status, min(PAGE, limit - len(records)), len(records), True)
        records += page
        if progress is not None:
            progress.advance(len(page))
        if len(page) < PAGE:
            break
    if not records:
        raise ValueError("no quarantine record matches")
    kinds = {(r.input.shape, r.input.dtype.str) for r in records if r.input is not None}
    if len(kinds) != 1:
        raise ValueError(f"inputs of {len(kinds)} shapes or dtypes: export one --model at a time")
    out.mkdir(parents=True, exist_ok=True)
    arrays, manifest = out / "quarantine-export.npz", out / "quarantine-export.csv"
    images = np.stack([r.input for r in records if r.input is not None])
    ids = np.array([r.id for r in records])
    np.savez_compressed(arrays, images=images, ids=ids)
    with manifest.open("w", newline="") as sink:
        writer = csv.writer(sink)
        writer.writerow(FIELDS)
        for i, r in enumerate(records):
            writer.writerow(
                [_cell(v) for v in
                [i, r.id, r.created_at, r.model, r.version, r.client_id or "", r.request_id or "",
                 r.image_index, r.verdict, r.status, LABELS.get(r.status, r.status), r.note or "",
                 r.released_at or ""]]
            )  # fmt: skip
    labels: dict[str, int] = {}
    for r in records:
        labels[LABELS.get(r.status, r.status)] = labels.get(LABELS.get(r.status, r.status), 0) + 1
    return {
        "count": len(records),
        "labels": labels,
        "model": model,
        "status": status,
        "npz": str(arrays),
        "npz_sha256": hashlib.sha256(arrays.read_bytes()).hexdigest(),
        "csv_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }
