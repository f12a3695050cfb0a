"""Fixtures of the unit tier: a throwaway quarantine store on an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.gateway.quarantine import SQLiteQuarantineStore
from tests.unit.quarantine_helpers import Clock


@pytest.fixture
def store() -> Iterator[SQLiteQuarantineStore]:
    with SQLiteQuarantineStore(":memory:", clock=Clock()) as s:
        yield s


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"
