"""Schemathesis over the live gateway's OpenAPI documents, bounded in time: no 5xx, no hang."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.benchmarks import fuzz

pytestmark = pytest.mark.e2e


def test_schemathesis_finds_no_server_error_with_or_without_the_admin_token(
    tmp_path: Path,
) -> None:
    status = fuzz.main(["--duration", "60", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "fuzz.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"public", "admin"}
    for name, run in runs.items():
        assert run["cases"]["generated"] >= 100, (name, run)
        assert run["server_5xx"] == 0 and not run["failures"] and not run["errors"], (name, run)
    assert report["server_tracebacks"] == 0
    assert status == 0
