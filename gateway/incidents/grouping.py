"""Which log entries open an incident, and which join one (the timeline).

Opening: a client or campaign reaching the refuse rung (containment), a drift alarm, a
flag-rate alarm, or an admin. Joining: any entry about a subject an open incident concerns (a
client, its campaign, a model) joins that incident, and its own subjects join with it: so a
rotating attacker's new identities, the campaign links that name them, their rung changes, the
admin's release and a rollback of the model all land on one timeline. When an incident opens,
the entries of the hour before about its subjects (the throttle and strict steps, the links
that built the campaign) are put on its timeline too.
"""

from __future__ import annotations

import logging
from typing import Any

from bastion.gateway.incidents.log import Entry, IncidentLog
from bastion.gateway.incidents.store import IncidentStore

log = logging.getLogger(__name__)
LOOKBACK_S = 3600.0
OWN_KINDS = frozenset({"incident_opened", "incident_closed"})


def subjects_of(entry: Entry) -> list[str]:
    """The clients, campaigns and models an entry is about."""
    body: dict[str, Any] = entry.body
    found = [entry.subject]
    # the model a client's queries went to is an attribute, not a subject: an attack must not
    # join (or hide in) an incident about the model; a rollback joins through its cause
    keys = ("campaign", "joined", "via", "cause")
    if entry.kind not in ("containment", "campaign"):
        keys += ("model",)
    for key in keys:
        value = body.get(key)
        if isinstance(value, str):
            found.append(value)
    for value in list(found):  # "digits:2" concerns the model "digits" (its routes) too
        name, colon, version = value.rpartition(":")
        if colon and version.isdigit() and name:
            found.append(name)
    for key in ("released", "members"):
        named = body.get(key)
        if isinstance(named, list):
            found += [r for r in named[:100] if isinstance(r, str)]
    return list(dict.fromkeys(s for s in found if s))


def opens(entry: Entry) -> bool:
    if entry.kind == "containment":
        return entry.body.get("rung") == "refuse"
    return entry.kind in ("drift_alarm", "flag_rate_alarm") and entry.body.get("event") == "raised"


def title_of(entry: Entry) -> str:
    if entry.kind == "containment":
        campaign = entry.body.get("campaign_size", 1)
        return f"query attack: {entry.subject} contained (campaign of {campaign})"
    return f"{entry.kind.replace('_', ' ')}: {entry.subject}"


class Grouper:
    """Called with every appended entry (``IncidentLog``'s ``on_append``)."""

    def __init__(self, store: IncidentStore, incident_log: IncidentLog) -> None:
        self.store, self.log = store, incident_log

    def on_entry(self, entry: Entry) -> None:
        if entry.kind in OWN_KINDS:
            return
        subjects = subjects_of(entry)
        cause = entry.body.get("cause")  # a rollback joins the incident of its cause first
        incident = self.store.find_open([cause]) if isinstance(cause, str) else None
        incident = incident or self.store.find_open(subjects)
        if incident is not None:
            self.store.attach(incident, subjects, [entry.seq])
        elif opens(entry):
            self.open(title_of(entry), entry.kind, subjects, entry, "gateway")

    def open(
        self, title: str, trigger: str, subjects: list[str], entry: Entry | None, actor: str
    ) -> int:
        """Opens an incident (with the hour's earlier entries about its subjects) and logs it."""
        seqs = [] if entry is None else [entry.seq]
        since = (entry.time if entry is not None else self.log.clock()) - LOOKBACK_S
        named = list(subjects)
        for subject in subjects[:100]:  # the story so far: how the campaign formed, who was in it
            for earlier in self.log.entries(subject=subject, limit=1000, since=since):
                seqs.append(earlier.seq)
                named += subjects_of(earlier)
        incident = self.store.open(title, trigger, list(dict.fromkeys(named)), seqs)
        body = {"incident": incident, "title": title, "trigger": trigger}
        body |= {"subjects": [s[:64] for s in subjects[:20]], "subject_count": len(subjects)}
        try:
            opened = self.log.append("incident_opened", f"incident-{incident}", body, actor)
        except BaseException:  # no incident that the log does not record
            self.store.discard(incident)
            raise
        self.store.attach(incident, [], [opened.seq])
        log.warning("incident %d opened: %s", incident, title)
        return incident

    def close(self, incident: int, actor: str, note: str | None) -> None:
        """Closes an open incident and logs it. Raises KeyError or ValueError (closed)."""
        self.store.close_incident(incident, actor, note)
        closed = self.log.append(
            "incident_closed", f"incident-{incident}", {"incident": incident, "note": note}, actor
        )
        self.store.attach(incident, [], [closed.seq])
