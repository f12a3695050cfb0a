"""Fixtures of the hostile-input suite."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def digits_loaded() -> None:
    """Loads the test digits before any attack: the first load holds this process's GIL for
    about half a second, which the health probes of ``harness.under_attack`` (threads of this
    same process) would otherwise count as the gateway's stall."""
    from bastion.models.data import load_split

    load_split("test")
