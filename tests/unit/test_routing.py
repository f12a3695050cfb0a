"""The route table: weights honoured, rollback at once, rules on security and drift signals."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from bastion.gateway.incidents.log import Entry
from bastion.gateway.routing import RouteTable, make_route


def entry(kind: str, subject: str, **body: object) -> Entry:
    return Entry(1, 0.0, kind, "gateway", subject, dict(body))


def test_weights_are_honoured_within_a_percent_and_a_client_stays_on_its_version() -> None:
    table = RouteTable()
    table.set("digits", make_route({1: 9, 2: 1}, safe=1))
    counts = Counter(table.version("digits", f"client-{i}") for i in range(100_000))
    assert abs(counts[2] / 100_000 - 0.1) < 0.01
    assert len({table.version("digits", "alice") for _ in range(50)}) == 1  # sticky
    anonymous = Counter(table.version("digits", None) for _ in range(20_000))
    assert abs(anonymous[2] / 20_000 - 0.1) < 0.015
    assert table.version("other", "alice") is None  # no route: the latest answers


def test_a_rollback_sends_everything_to_the_safe_version_until_rolled_forward() -> None:
    logged: list[tuple[str, str]] = []
    table = RouteTable(audit=lambda kind, model, body, actor: logged.append((kind, actor)))
    table.set("digits", make_route({1: 1, 2: 1}, safe=1))
    assert table.rollback("digits", "canary misbehaves", "rule") is not None
    assert {table.version("digits", f"c{i}") for i in range(1000)} == {1}
    assert table.strict("digits") and table.rollback("digits", "again", "rule") is None
    forward = replace(table.routes()["digits"], rolled_back=None, strict=False)
    table.set("digits", forward, audit=False)  # an admin's change, logged by its route
    assert {table.version("digits", f"c{i}") for i in range(1000)} == {1, 2}
    assert not table.strict("digits")
    assert logged == [("route_change", "admin"), ("rollback", "rule")]


def test_a_restart_rebuilds_the_table_from_the_logged_route_entries() -> None:
    logged: list[Entry] = []

    def audit(kind: str, model: str, body: dict, actor: str) -> None:
        logged.append(Entry(len(logged) + 1, 0.0, kind, actor, model, body))

    table = RouteTable(audit=audit)
    table.set("digits", make_route({1: 3, 2: 1}, safe=1))
    table.set("letters", make_route({5: 1}, safe=None))
    table.rollback("digits", "contained: mallory", "rule")
    table.set("letters", None)  # deleted
    restarted = RouteTable()
    assert restarted.restore(logged) == 1
    assert restarted.routes() == table.routes()
    assert restarted.routes()["digits"].rolled_back == "contained: mallory"


def test_security_and_drift_signals_roll_back_by_rule() -> None:
    table = RouteTable()
    table.set("digits", make_route({1: 0.5, 2: 0.5}, safe=1))
    table.set("letters", make_route({3: 1.0}, safe=None))  # nothing to roll back to
    table.on_entry(entry("containment", "mallory", rung="throttle"))
    assert table.routes()["digits"].rolled_back is None  # throttling is no rollback
    table.on_entry(entry("drift_alarm", "digits:1", event="raised"))
    assert table.routes()["digits"].rolled_back is None  # drift of the safe version itself
    table.on_entry(entry("drift_alarm", "digits:2", event="raised"))
    assert table.routes()["digits"].rolled_back == "drift_alarm on version 2"
    table = RouteTable()  # (a roll forward would hold the rules off for a while)
    table.set("digits", make_route({1: 0.5, 2: 0.5}, safe=1))
    table.set("letters", make_route({3: 1.0}, safe=None))
    table.on_entry(entry("containment", "sybil-0", rung="refuse", scope="campaign"))
    assert table.routes()["digits"].rolled_back == "contained: sybil-0"
    assert table.routes()["letters"].rolled_back is None


@pytest.mark.parametrize(
    ("weights", "safe"), [({}, None), ({0: 1.0}, None), ({1: -1.0}, None), ({1: 0.0}, None),
                          ({1: 1.0}, 0), ({i: 1.0 for i in range(1, 18)}, None)]
)  # fmt: skip
def test_bad_routes_are_refused(weights: dict[int, float], safe: int | None) -> None:
    with pytest.raises(ValueError):
        make_route(weights, safe)


def test_a_containment_rolls_back_only_the_model_its_queries_went_to() -> None:
    table = RouteTable()
    table.set("digits", make_route({1: 0.5, 2: 0.5}, safe=1))
    table.set("letters", make_route({1: 0.5, 2: 0.5}, safe=1))
    table.on_entry(entry("containment", "sybil-0", rung="refuse", model="letters:2"))
    assert table.routes()["letters"].rolled_back == "contained: sybil-0"
    assert table.routes()["digits"].rolled_back is None


def test_after_an_admin_rolls_forward_the_rules_wait_and_huge_weights_stay_sane() -> None:
    table = RouteTable()
    table.set("digits", make_route({1: 1e308, 2: 1e308}, safe=1))
    assert table.routes()["digits"].weights == {1: 0.5, 2: 0.5}
    table.on_entry(entry("containment", "sybil-0", rung="refuse", model="digits:2"))
    rolled = table.routes()["digits"]
    table.set("digits", replace(rolled, rolled_back=None, strict=False), audit=False)  # forward
    table.on_entry(entry("containment", "sybil-9", rung="refuse", model="digits:2"))
    assert table.routes()["digits"].rolled_back is None  # an attacker cannot undo the admin
