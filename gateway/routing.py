"""Traffic routing: which loaded version answers a request that names none, changed at runtime.

A model's route gives its versions weights (a canary: ``{1: 0.9, 2: 0.1}``) and may pin a safe
version. A request is assigned by a hash of its client (a client stays on one version while
the weights stand), else at random. A rollback sends 100 % to the safe version at once, and
``strict`` withholds the model's suspicious images too (the review tier's action raised to the
block tier's), until an admin rolls forward. Every change is an entry of the incident log.

Rules (``on_entry``, a listener of the log) roll back without a redeploy: a contained client or
campaign (the model its queries went to: an attack may have found what it wanted on the
canary; the cost of a needless rollback is the canary's traffic, not an outage), a flag-rate
alarm of a
version other than the safe one, a drift alarm of a canary. The table is runtime state of one
gateway; with Redis, ``gateway.state.route_sync`` shares it between replicas (``on_change``
tells it of every change here, ``apply`` takes another replica's). A request holds the
``LoadedModel`` it started on, so a change never moves a request in flight.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)
MAX_VERSIONS = 16
RULE_COOLDOWN_S = 600.0
Audit = Callable[[str, str, dict[str, Any], str], object]


@dataclass(frozen=True)
class Route:
    weights: dict[int, float]  # version -> share of traffic, summing to 1
    safe: int | None = None
    rolled_back: str | None = None  # why all traffic is on the safe version
    strict: bool = False  # suspicious images withheld too

    def pick(self, point: float) -> int:
        """The version for a point in [0, 1)."""
        if self.rolled_back is not None and self.safe is not None:
            return self.safe
        total = 0.0
        for version, weight in sorted(self.weights.items()):
            total += weight
            if point < total:
                return version
        return max(self.weights)

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": {str(v): w for v, w in sorted(self.weights.items())},
            "safe": self.safe,
            "rolled_back": self.rolled_back,
            "strict": self.strict,
        }


def make_route(weights: dict[int, float], safe: int | None) -> Route:
    """Raises ValueError for no version, too many, a version below 1 or negative weights."""
    if not weights or len(weights) > MAX_VERSIONS:
        raise ValueError(f"a route names 1 to {MAX_VERSIONS} versions")
    if any(v < 1 for v in weights) or any(not 0 <= w < float("inf") for w in weights.values()):
        raise ValueError("versions are at least 1 and weights finite and not negative")
    top = max(weights.values())
    if top <= 0:
        raise ValueError("at least one weight must be above 0")
    weights = {v: w / top for v, w in weights.items()}  # no overflow in the sum below
    total = sum(weights.values())
    if safe is not None and safe < 1:
        raise ValueError("the safe version is at least 1")
    return Route({v: w / total for v, w in weights.items()}, safe)


def point(client: str | None) -> float:
    """A client's place in [0, 1) (a hash of its id: sticky), at random without one."""
    if client is None:
        return random.random()
    digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class RouteTable:
    def __init__(self, audit: Audit | None = None) -> None:
        self._routes: dict[str, Route] = {}
        self._forwarded: dict[str, float] = {}  # model -> when an admin last rolled it forward
        self._lock = threading.Lock()
        self.audit = audit
        self.on_change: Callable[[str, Route | None], None] | None = None  # for replicas

    def version(self, model: str, client: str | None) -> int | None:
        """The version a request to ``model`` naming none goes to; None: no route (latest)."""
        route = self._routes.get(model)
        return None if route is None else route.pick(point(client))

    def strict(self, model: str) -> bool:
        route = self._routes.get(model)
        return route is not None and route.strict

    def routes(self) -> dict[str, Route]:
        return dict(self._routes)

    def set(
        self, model: str, route: Route | None, actor: str = "admin", audit: bool = True
    ) -> None:
        """Puts (``None``: removes) a model's route; ``audit=False`` when the caller has
        written the entry itself (an admin's change is durable before it applies). A roll
        forward (rolled back before, not now) starts the rules' cooldown."""
        self._put(model, route)
        if self.on_change is not None:
            self.on_change(model, route)
        if audit:
            self._record("route_change", model, route, actor)

    def apply(self, model: str, route: Route | None) -> None:
        """Another replica's change (already logged there): applied here as it stands."""
        if self._put(model, route) != route:
            log.warning("model %s: route from another replica: %s", model, route)

    def _put(self, model: str, route: Route | None) -> Route | None:
        """Puts or removes a route (a roll forward starts the cooldown); returns the one
        before."""
        with self._lock:
            before = self._routes.get(model)
            if route is None:
                self._routes.pop(model, None)
            else:
                self._routes[model] = route
            if before is not None and before.rolled_back and not (route and route.rolled_back):
                self._forwarded[model] = time.monotonic()
        return before

    def rolled_back(self, model: str, reason: str, strict: bool = True) -> Route | None:
        """The route a rollback would make (all traffic to the safe version, strict); None
        when the model has no route or no safe version, or is rolled back already."""
        route = self._routes.get(model)
        if route is None or route.safe is None or route.rolled_back is not None:
            return None
        return replace(route, rolled_back=reason[:200], strict=strict)

    def rollback(self, model: str, reason: str, actor: str, cause: str = "") -> Route | None:
        """A rule's rollback: applied, then logged through the writer (``cause``: the client,
        campaign or model version whose signal it was, so it joins that incident). None within
        ``RULE_COOLDOWN_S`` of an admin's roll forward: the admin has judged, and a signal an
        attacker can raise at will must not undo that over and over (it is logged instead)."""
        with self._lock:
            route = self.rolled_back(model, reason)
            if route is None:
                return None
            forwarded = self._forwarded.get(model)
            if forwarded is not None and time.monotonic() - forwarded < RULE_COOLDOWN_S:
                log.warning("model %s: rollback by rule suppressed after a roll forward: %s",
                            model, reason)  # fmt: skip
                return None
            self._routes[model] = route
        if self.on_change is not None:
            self.on_change(model, route)
        log.warning("model %s rolled back to version %s: %s", model, route.safe, reason)
        self._record("rollback", model, route, actor, cause)
        return route

    def restore(self, entries: list[Any]) -> int:
        """Rebuilds the table from the log's route entries, oldest first (at start: a restart
        must not undo a rollback); returns the routes restored."""
        for entry in entries:
            body = entry.body
            if entry.kind not in ("route_change", "rollback") or body.get("model") != entry.subject:
                continue
            if body.get("deleted"):
                self._routes.pop(entry.subject, None)
                continue
            try:
                self._routes[entry.subject] = route_from_json(body)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return len(self._routes)

    def on_entry(self, entry: Any) -> None:
        """The rules: a security or drift signal rolls the models it concerns back."""
        body = entry.body
        if entry.kind == "containment" and body.get("rung") == "refuse":
            probed = str(body.get("model") or "").rpartition(":")[0]
            # the model the contained queries went to; every routed one when it is not known
            for model in [probed] if probed in self._routes else list(self._routes):
                self.rollback(model, f"contained: {entry.subject}", "rule", entry.subject)
        elif entry.kind in ("flag_rate_alarm", "drift_alarm") and body.get("event") == "raised":
            model, _, version = entry.subject.rpartition(":")
            route = self._routes.get(model)
            if route is None or not version.isdigit() or int(version) == route.safe:
                return
            canary = entry.kind == "drift_alarm" and route.weights.get(int(version), 0) > 0
            if entry.kind == "flag_rate_alarm" or canary:
                self.rollback(model, f"{entry.kind} on version {version}", "rule", entry.subject)

    def _record(
        self, kind: str, model: str, route: Route | None, actor: str, cause: str = ""
    ) -> None:
        if self.audit is not None:
            body = entry_body(model, route)
            self.audit(kind, model, {**body, "cause": cause} if cause else body, actor)


def route_from_json(body: dict[str, Any]) -> Route:
    """A route as ``Route.to_json`` wrote it. Raises KeyError, TypeError, ValueError or
    AttributeError for one that is not."""
    route = make_route({int(v): float(w) for v, w in body["weights"].items()}, body["safe"])
    rolled_back = body.get("rolled_back")
    if rolled_back is not None and not isinstance(rolled_back, str):
        raise TypeError("rolled_back is a reason or null")
    return replace(route, rolled_back=rolled_back, strict=bool(body.get("strict")))


def entry_body(model: str, route: Route | None) -> dict[str, Any]:
    """A route change as the incident log records it (and ``restore`` reads it back)."""
    return (
        {"model": model, "deleted": True} if route is None else {"model": model, **route.to_json()}
    )
