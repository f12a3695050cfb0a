"""Every decision of the ladder, once: a client's or a campaign's change of rung, logged with
its evidence (a warning line the incident benchmark reads by request id), counted in the
metrics, and sent to the incident log. The caller holds the defence's lock."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from bastion.gateway.defence.evidence import OBSERVE, Ladder
from bastion.gateway.monitoring.metrics import Metrics

log = logging.getLogger("bastion.gateway.defence.service")  # one logger for the defence's lines


class Decisions:
    """The last rung logged per client and per campaign (bounded like the ladder's clients)."""

    def __init__(
        self,
        ladder: Ladder,
        metrics: Metrics,
        audit: Callable[[str, str, dict[str, Any]], object] | None = None,
    ) -> None:
        self.ladder, self.metrics, self.audit = ladder, metrics, audit
        self._rungs: dict[str, str] = {}  # the last rung logged per client (transitions only)
        self._campaign_rungs: OrderedDict[str, str] = OrderedDict()  # per campaign root

    def forget(self, root: str, members: list[str]) -> None:
        """A released campaign and its members start again from ``observe``."""
        self._campaign_rungs.pop(root, None)
        for member in members:
            self._count(self._rungs.pop(member, OBSERVE), -1)

    def _count(self, rung: str, step: int) -> None:
        if rung != OBSERVE:
            self.metrics.defence_clients.labels(rung).inc(step)

    def campaign(self, client: str, rung: str, request_id: str | None, model: str | None) -> None:
        """A campaign's own rise up the ladder is a decision too (its one-query identities may
        never reach a rung of their own): logged once per rung."""
        root = self.ladder.root(client)
        if self._campaign_rungs.get(root) == rung:
            return
        self._campaign_rungs[root] = rung
        if len(self._campaign_rungs) > self.ladder.max_clients:
            self._campaign_rungs.popitem(last=False)
        log.warning("campaign %s now %s%s", root, rung, _at(request_id))
        if self.audit is not None:
            members = self.ladder.campaign(client)
            self.audit(
                "containment",
                root,
                {
                    "scope": "campaign",
                    "rung": rung,
                    "campaign": root,
                    "campaign_size": len(members),
                    "campaign_statistic": round(self.ladder.campaign_statistic(client), 3),
                    "members": members[:50],
                    "request": request_id,
                    "model": model,
                },
            )

    def client(
        self, client: str, rung: str, request_id: str | None = None, model: str | None = None
    ) -> None:
        """Every change of rung is logged with its evidence and counted."""
        before = self._rungs.get(client, OBSERVE)
        if before == rung:
            return
        self._count(before, -1)
        self._count(rung, +1)
        self._rungs[client] = rung
        if len(self._rungs) > self.ladder.max_clients:
            self._count(self._rungs.pop(next(iter(self._rungs))), -1)
        account = self.ladder.account(client)
        campaign = self.ladder.campaign(client)
        self.metrics.defence_transitions.labels(rung).inc()
        if self.audit is not None:
            self.audit(
                "containment",
                client,
                {
                    "from": before,
                    "rung": rung,
                    "request": request_id,
                    "model": model,
                    "statistic": round(account.statistic, 3) if account else 0.0,
                    "campaign": self.ladder.root(client),
                    "campaign_size": len(campaign),
                    "campaign_statistic": round(self.ladder.campaign_statistic(client), 3),
                    "images": account.images if account else 0,
                    "flagged": account.flagged if account else 0,
                    "probes": account.probes if account else 0,
                },
            )
        log.warning(
            "client %s now %s%s: statistic %.1f (campaign %.1f over %d clients), "
            "%d images, %d flagged, %d probes",
            client,
            rung,
            _at(request_id),
            account.statistic if account else 0.0,
            self.ladder.campaign_statistic(client),
            len(campaign),
            account.images if account else 0,
            account.flagged if account else 0,
            account.probes if account else 0,
        )


def _at(request_id: str | None) -> str:
    """Where a log line names the request, when it had an id."""
    return f" at request {request_id!r}" if request_id else ""
