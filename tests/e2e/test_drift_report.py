"""``bastion drift report``: a ledger window of real digits (clean, then darkened) against the
bundled reference profile, through the CLI; the verdicts of Evidently and of the in-path
monitor's rules agree on what the statistics share, and the page renders in headless Chromium
(a screenshot is kept)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.benchmarks.workload import load_served
from bastion.gateway.incidents.ledger import Ledger, ledger_rows
from bastion.models.data import load_split, to_float
from tests.conftest import ARTIFACTS, CHROMIUM_FLAGS, tool

REPOSITORY = Path(__file__).parents[2] / "models" / "repository"
CLEAN_AT, DARK_AT = 1_000_000.0, 2_000_000.0  # the two windows' times (Unix seconds)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 clean test digits at one time, then the same digits at half brightness, recorded
    by the ledger as the gateway records them (its own probabilities and embeddings)."""
    model, _ = load_served()
    images = to_float(load_split("test")[0])
    images = images[np.random.default_rng(0).permutation(len(images))[:500]]
    path = tmp_path_factory.mktemp("drift") / "ledger.db"
    written = Ledger(path, 1e12, 10**7)
    for at, batch in ((CLEAN_AT, images), (DARK_AT, images * 0.5)):
        with torch.inference_mode():
            _, probabilities, embeddings = model.forward_embedded(torch.from_numpy(batch))
        rows = ledger_rows(
            ("digits", "1"), ("lab", None), batch, {"probabilities": probabilities.numpy()},
            None, ["clean"] * len(batch), "served", at, embeddings.numpy(),
        )  # fmt: skip
        written.submit(rows)
    written.flush()
    written.close()
    return path


def report(ledger: Path, out: Path, *window: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bastion.gateway", "drift", "report", "digits", "--ledger",
         str(ledger), "--repository", str(REPOSITORY), "--out", str(out), *window],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DO_NOT_TRACK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def drifted(stdout: str, judge: str) -> set[str]:
    found = re.search(rf"by {judge}: ([^;(]*)", stdout)
    assert found is not None, stdout
    names = found.group(1).strip()
    return set() if names == "none" else set(names.split(", "))


def test_a_clean_window_shows_no_drift_to_either_judge(ledger: Path, tmp_path: Path) -> None:
    out = report(ledger, tmp_path / "clean.html", "--from", "1970-01-12", "--to", str(1.5e6))
    assert "500 images of digits version 1" in out
    assert drifted(out, "the monitor") == set() and drifted(out, "Evidently") == set()
    assert "differs:" not in out


def test_a_darkened_window_drifts_for_both_and_the_page_renders(
    ledger: Path, tmp_path: Path
) -> None:
    page = tmp_path / "dark.html"
    out = report(ledger, page, "--window", "last")  # the last 500: the darkened ones
    for judge in ("the monitor", "Evidently"):
        assert {"pixel_mean", "pixel_std", "confidence"} <= drifted(out, judge), out
    assert any(name.startswith("embedding_") for name in drifted(out, "Evidently")), out
    # where they differ, the CLI says why (each line names the reason)
    for line in out.splitlines():
        if line.startswith("differs:"):
            assert "Evidently's PSI bins" in line or "Jensen-Shannon" in line, line
    html = page.read_text()
    assert 'id="bastion-drift"' in html and "Bastion's in-path monitor" in html
    chromium = tool("chromium")
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "pixel_mean" in dom and "bastion-drift" in dom, dom[-2000:]
    assert re.search(r"[Dd]rift", dom)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "drift-report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'shot'}",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000


def test_bad_windows_get_a_clear_error(ledger: Path, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "bastion.gateway", "drift", "report", "digits", "--ledger",
            str(ledger), "--repository", str(REPOSITORY), "--out", str(tmp_path / "x.html")]
    for extra, said in (
        (["--window", "yesterday"], "--window is 'last'"),
        (["--from", "not a time"], "--from/--to"),
        (["--from", "1", "--to", "2"], "no recorded images"),
        (["--version", "9"], "no reference profile"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and said in done.stderr, (extra, done.stderr)
    missing = [*base[:5], "nosuchmodel", *base[6:]]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no model" in done.stderr


def test_rows_no_gateway_writes_are_left_out_not_a_traceback(
    ledger: Path, tmp_path: Path
) -> None:
    """A ledger edited by hand: text in a number column, a short or huge embedding, a
    negative class. Those rows are left out (or their embedding is), the report is written."""
    import shutil
    import sqlite3

    crafted = tmp_path / "crafted.db"
    shutil.copy(ledger, crafted)
    with sqlite3.connect(crafted) as db:
        first = db.execute("SELECT MAX(id) FROM served").fetchone()[0] - 3
        db.execute("UPDATE served SET confidence = 'high' WHERE id = ?", (first,))
        db.execute("UPDATE served SET embedding = x'616263' WHERE id = ?", (first + 1,))
        huge = np.full(8, 3e38, "<f4").tobytes()
        db.execute("UPDATE served SET embedding = ? WHERE id = ?", (huge, first + 2))
        db.execute("UPDATE served SET predicted = -3 WHERE id = ?", (first + 3,))
    out = report(crafted, tmp_path / "crafted.html", "--window", "last")
    assert "498 images of digits version 1" in out  # the text and the negative class dropped
    bad = [sys.executable, "-m", "bastion.gateway", "drift", "report", "digits", "--ledger",
           str(crafted), "--repository", str(REPOSITORY), "--out", str(tmp_path / "x.html")]
    for value in ("inf", "nan", "1e20", "-5"):
        done = subprocess.run([*bad, "--from", value], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 2 and "--from/--to" in done.stderr, done.stderr
