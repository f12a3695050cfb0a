"""Incidents: opened by a containment, an alarm or an admin; related entries on one timeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.store import CLOSED, OPEN, IncidentStore


@pytest.fixture
def grouper(tmp_path: Path) -> Iterator[Grouper]:
    clock = iter(float(t) for t in range(1_000_000)).__next__
    log = IncidentLog(
        tmp_path / "incidents.db", Signer.from_file(tmp_path / "key.pem"), None, clock
    )
    grouper = Grouper(IncidentStore(tmp_path / "incidents.db"), log)
    log.listeners.append(grouper.on_entry)
    yield grouper
    grouper.store.close()
    log.close()


def rung(grouper: Grouper, client: str, to: str, campaign: str) -> None:
    grouper.log.append(
        "containment", client, {"rung": to, "campaign": campaign, "campaign_size": 3}
    )


def test_a_contained_campaign_opens_one_incident_that_gathers_its_whole_story(
    grouper: Grouper,
) -> None:
    log = grouper.log
    log.append("campaign", "mallory-0", {"joined": "mallory-1", "via": "mallory-0", "size": 2})
    rung(grouper, "mallory-1", "throttle", "mallory-0")
    assert grouper.store.list() == []  # throttling opens nothing
    rung(grouper, "mallory-1", "refuse", "mallory-0")
    (incident,) = grouper.store.list()
    assert incident.state == OPEN and "mallory-1 contained" in incident.title
    log.append("campaign", "mallory-0", {"joined": "mallory-2", "via": "mallory-1", "size": 3})
    rung(grouper, "mallory-2", "refuse", "mallory-0")  # the next identity: same incident
    log.append("release", "mallory-2", {"released": ["mallory-0", "mallory-1", "mallory-2"]})
    log.append("campaign", "alice", {"joined": "bob", "via": "alice", "size": 2})  # unrelated
    assert len(grouper.store.list()) == 1
    kinds = [(e.kind, e.subject) for e in grouper.store.timeline(incident.id)]
    assert kinds == [
        ("campaign", "mallory-0"),  # from before it opened: how the campaign formed
        ("containment", "mallory-1"),
        ("containment", "mallory-1"),
        ("incident_opened", f"incident-{incident.id}"),
        ("campaign", "mallory-0"),
        ("containment", "mallory-2"),
        ("release", "mallory-2"),
    ]
    assert set(grouper.store.subjects(incident.id)) == {"mallory-0", "mallory-1", "mallory-2"}


def test_a_closed_incident_stays_closed_and_the_next_attack_opens_another(
    grouper: Grouper,
) -> None:
    rung(grouper, "mallory", "refuse", "mallory")
    (first,) = grouper.store.list()
    grouper.close(first.id, "admin", "contained; model unaffected")
    with pytest.raises(ValueError, match="closed already"):
        grouper.close(first.id, "admin", None)
    with pytest.raises(KeyError):
        grouper.close(999, "admin", None)
    rung(grouper, "mallory", "refuse", "mallory")
    second, closed = grouper.store.list()
    assert closed.state == CLOSED and closed.note == "contained; model unaffected"
    assert second.state == OPEN and second.id != closed.id
    assert grouper.store.timeline(closed.id)[-1].kind == "incident_closed"


def test_alarms_and_admins_open_incidents_and_related_entries_join(grouper: Grouper) -> None:
    grouper.log.append("drift_alarm", "digits:1", {"event": "raised", "statistic": "mmd"})
    by_hand = grouper.open("suspected scraping", "admin", ["crawler-7"], None, "admin")
    grouper.log.append("containment", "crawler-7", {"rung": "throttle", "campaign": "crawler-7"})
    grouper.log.append("rollback", "digits", {"model": "digits:1", "to": 2})
    drift, manual = sorted(grouper.store.list(), key=lambda i: i.id)
    assert drift.trigger == "drift_alarm" and manual.id == by_hand
    assert [e.kind for e in grouper.store.timeline(by_hand)][-1] == "containment"
    assert [e.kind for e in grouper.store.timeline(drift.id)][-1] == "rollback"


def test_an_attack_on_a_model_does_not_join_an_incident_about_that_model(grouper: Grouper) -> None:
    grouper.log.append("drift_alarm", "digits:2", {"event": "raised", "model": "digits"})
    body = {"rung": "refuse", "campaign": "sybil-0", "model": "digits:2"}
    grouper.log.append("containment", "sybil-0", body)
    drift, attack = sorted(grouper.store.list(), key=lambda i: i.id)
    assert drift.trigger == "drift_alarm" and attack.trigger == "containment"
    grouper.log.append("rollback", "digits", {"model": "digits", "cause": "sybil-0"})
    assert grouper.store.timeline(attack.id)[-1].kind == "rollback"  # joined through its cause
