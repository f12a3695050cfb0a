"""The incident benchmark reads the gateway's own log for what it did with each query."""

from __future__ import annotations

from pathlib import Path

from bastion.benchmarks.incident_report import gateway_view, probe_actions

LOG = """\
DEBUG probe: client u1 request 'attack-1' image 0: repeated (campaign of u1)
DEBUG probe: client u1 request 'attack-2' image 0: repeated (campaign of u1)
WARNING client u1 now throttle at request 'attack-2': statistic 19.0 (campaign 0.0 over 1 clients)
WARNING client u1 now strict at request 'attack-3': statistic 25.0 (campaign 0.0 over 1 clients)
"""


def test_a_repeated_probe_that_moved_its_client_stays_a_repeat(tmp_path: Path) -> None:
    log = tmp_path / "bastion.log"
    log.write_text(LOG)
    acted = probe_actions(log)
    assert acted == {"attack-1": "repeated", "attack-2": "repeated", "attack-3": "rung"}
    row = {"trace": "..." + ".", "detection": None}
    gateway_view(row, ["attack-0", "attack-1", "attack-2", "attack-3"], acted)
    # detected at the first repeat; the rung move at attack-3 was answered fresh (a ".")
    assert row["detection"] == 2 and row["after_answered"] == 1


def test_a_suspects_one_off_answered_with_the_earlier_answer_is_a_repeat(tmp_path: Path) -> None:
    """After its first probe a client's one-offs get the remembered answer; the benchmark
    cannot tell it from a fresh one when the two agree within 1e-4, the gateway's log can."""
    log = tmp_path / "bastion.log"
    log.write_text(
        "DEBUG probe: client u1 request 'attack-1' image 0: repeated (campaign of u1)\n"
        "DEBUG one-off: client u1 request 'attack-2' image 0: repeated (campaign of u1)\n"
    )
    acted = probe_actions(log)
    assert acted == {"attack-1": "repeated", "attack-2": "repeated"}
    row = {"trace": "....", "detection": None}
    gateway_view(row, ["attack-0", "attack-1", "attack-2", "attack-3"], acted)
    assert row["detection"] == 2 and row["after_answered"] == 1  # attack-3 alone was fresh
