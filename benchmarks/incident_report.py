"""Numbers and tables of the incident benchmark (``benchmarks.incident``), from its raw rows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bastion.benchmarks.incident_clients import AGAIN, CONTAINED, OK, THROTTLED, HonestRecord

ADAPTIVE = "adaptive"
REFUSALS_TARGET = 0.99  # share of queries after detection refused or repeated
ADAPTIVE_TARGET = 0.05  # adaptive attacker's success rate


def transitions(log: Path) -> dict[str, dict[str, int]]:
    """Rung changes the gateway logged, by rung, for honest identities and for the rest."""
    counts: dict[str, dict[str, int]] = {"honest": {}, "attacker": {}}
    text = log.read_text(errors="replace") if log.is_file() else ""
    for client, rung in re.findall(r"client (\S+) now (\w+)\b", text):
        side = counts["honest" if client.startswith("honest-") else "attacker"]
        side[rung] = side.get(rung, 0) + 1
    return counts


PROBE_LINE = re.compile(
    r"probe: client (\S+) request '([^']*)' image \d+: "
    r"(repeated|refused again|refused on a line|answered)"
)
# a near-duplicate that was no probe, answered with the earlier answer all the same (``repeat``
# mode, or a suspect's): a repeat, even where it equals the fresh answer within 1e-4
ONE_OFF_LINE = re.compile(r"one-off: client (\S+) request '([^']*)' image \d+: (repeated)")
DEFENDED = frozenset("rRPTC")  # repeat, refused as a repeat or a probe, 429, 403 contained


TRANSITION_LINE = re.compile(r"client (\S+) now (throttle|strict|refuse) at request '([^']*)'")


def probe_actions(log: Path) -> dict[str, str]:
    """What the gateway's log says it did with each probe, by request id, and which requests
    moved their client up the ladder (``"rung"``, unless the probe's own action says more: a
    probe that was repeated and moved its client is a repeat, not a fresh answer)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    actions = {request: action for _, request, action in ONE_OFF_LINE.findall(text)}
    actions |= {request: action for _, request, action in PROBE_LINE.findall(text)}
    for _, _, request in TRANSITION_LINE.findall(text):
        if actions.get(request, "answered") == "answered":  # a repeat stays a repeat
            actions[request] = "rung"
    return actions


def honest_probes(log: Path) -> dict[str, int]:
    """Honest clients' queries the gateway took for probes, by what they were given."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts: dict[str, int] = {}
    for client, _, action in PROBE_LINE.findall(text):
        if client.startswith("honest-"):
            counts[action] = counts.get(action, 0) + 1
    return counts


def gateway_view(row: dict[str, Any], request_ids: list[str | None], acted: dict[str, str]) -> None:
    """Detection as the gateway saw it: the first of the seed's queries it acted on (a repeat,
    even one equal to the fresh answer, which the attacker cannot tell; a refusal as a repeat;
    429; 403 contained; a query that moved its identity up the ladder, whatever it was
    answered), and how many later queries it answered fresh. Updates ``row``."""
    trace = row["trace"]
    actions = [acted.get(str(request), "answered") for request in request_ids]
    defended = [
        mark in DEFENDED or action != "answered"
        for mark, action in zip(trace, actions, strict=True)
    ]
    # a fresh 200 (the ledger's "."), unless the gateway's log says it repeated the answer
    pairs = zip(trace, actions, strict=True)
    fresh = [mark == "." and action != "repeated" for mark, action in pairs]
    first = defended.index(True) + 1 if any(defended) else None
    row["attacker_detection"] = row["detection"]
    row["detection"] = first
    row["after_detection"] = len(trace) - first if first is not None else 0
    row["after_answered"] = sum(fresh[first:]) if first is not None else 0
    row["probes_repeated"] = sum(acted.get(str(r)) == "repeated" for r in request_ids)


def summarise_attacks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attack, over its seeds: detection, what the attacker got after it, what it won."""
    table = []
    for key in dict.fromkeys(r["attack"] for r in rows):
        part = [r for r in rows if r["attack"] == key]
        detected = [r["detection"] for r in part if r["detection"] is not None]
        contained = [r["contained_at"] for r in part if r.get("contained_at") is not None]
        after = sum(r["after_detection"] for r in part)
        answered = sum(r["after_answered"] for r in part)
        queries = sum(r["queries"] for r in part)
        outcomes: dict[str, int] = {}
        for r in part:
            for outcome, n in r["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + n
        table.append(
            {
                "attack": key,
                **{k: part[0][k] for k in ("name", "library", "threat")},
                "seeds": len(part),
                "detected": len(detected),
                # foolbox asks for its start first; refused (a young identity's suspicious
                # picture during an alert), the attack never begins and sends nothing else
                "start_refused": sum(
                    r["queries"] <= 1 and r["ended"].startswith("error") for r in part
                ),
                "detection_median": float(np.median(detected)) if detected else None,
                "detection_max": max(detected) if detected else None,
                "contained_median": float(np.median(contained)) if contained else None,
                "after_detection": after,
                "after_answered": answered,
                "after_refused_or_repeated": (after - answered) / after if after else None,
                "obtained": sum(r["obtained_distance"] is not None for r in part),
                "obtained_before_detection": sum(
                    r["obtained_at"] is not None
                    and (r["detection"] is None or r["obtained_at"] < r["detection"])
                    for r in part
                ),
                "final_adversarial": sum(r["final_adversarial"] for r in part),
                "queries": queries,
                "outcomes": outcomes,
                "refused_share": 1
                - (outcomes.get(OK, 0) + outcomes.get("repeat", 0) + outcomes.get(AGAIN, 0))
                / queries
                if queries
                else None,
                "withheld_by_screening_alone": sum(r["withheld_by_screening_alone"] for r in part),
                "identities": sum(r["identities"] for r in part),
                "retries": sum(r["retries"] for r in part),
                "ended": sorted({r["ended"] for r in part}),
                "seconds": sum(r["seconds"] for r in part),
            }
        )
    return table


def summarise_honest(
    records: list[HonestRecord], phases: dict[str, float], alone: np.ndarray
) -> dict[str, Any]:
    """Honest replies per phase (refusal: anything but 200), for the established clients and
    the newcomers (fresh identities), and who was ever contained.

    ``alone`` (bool, one per record) says whether the per-image screening withholds that
    picture by itself (scored offline). A phase's refusals less those is what the defence
    refused on top of the screening: the attack can only reach honest clients through it,
    while the screening's own share moves with which pictures a phase happened to draw
    (about ±0.35 points at 2,400 requests and a 3 % rate). The before/during comparison is
    made on the defence's share, with the raw rates beside it."""
    newcomer = np.array([r[2].startswith("newcomer-") for r in records], dtype=bool)
    groups = {
        "established": _phases(records, alone, phases, ~newcomer),
        "newcomers": _phases(records, alone, phases, newcomer),
    }
    contained = sorted({r[2] for r in records if r[4] in (THROTTLED, CONTAINED)})
    change = {}
    for group, by_phase in groups.items():
        rates = (by_phase["before"]["defence_rate"], by_phase["during"]["defence_rate"])
        change[group] = rates[1] - rates[0] if None not in rates else None
    return {
        "phases": groups["established"],
        "newcomers": groups["newcomers"],
        "clients": len({r[2] for r in records}),
        "contained_clients": contained,
        "defence_rate_change": change["established"],
        "newcomer_defence_rate_change": change["newcomers"],
    }


def _phases(
    records: list[HonestRecord], alone: np.ndarray, phases: dict[str, float], keep: np.ndarray
) -> dict[str, Any]:
    by_phase: dict[str, Any] = {}
    for phase in ("before", "during"):
        picked = [i for i, r in enumerate(records) if r[1] == phase and keep[i]]
        part = [records[i] for i in picked]
        outcomes: dict[str, int] = {}
        refused_kinds: dict[str, int] = {}
        for r in part:
            outcomes[r[4]] = outcomes.get(r[4], 0) + 1
            if r[4] != OK:
                refused_kinds[r[3]] = refused_kinds.get(r[3], 0) + 1
        refused = np.array([r[4] != OK for r in part], dtype=bool)
        screened = alone[picked] if picked else np.zeros(0, dtype=bool)
        latencies = np.array([r[5] for r in part]) * 1000 if part else np.zeros(1)
        end = phases["during"] if phase == "before" else phases["end"]
        n = max(len(part), 1)
        by_phase[phase] = {
            "requests": len(part),
            "refused": int(refused.sum()),
            "refusal_rate": float(refused.sum()) / n if part else None,
            "screening_alone": int(screened.sum()),
            "screening_alone_rate": float(screened.sum()) / n if part else None,
            "defence_refused": int((refused & ~screened).sum()),
            "defence_rate": float((refused & ~screened).sum()) / n if part else None,
            "served_though_screened": int((~refused & screened).sum()),
            "outcomes": outcomes,
            "refused_by_kind": refused_kinds,
            "seconds": end - phases[phase],
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p99_ms": float(np.percentile(latencies, 99)),
        }
    return by_phase


def summarise_volume(workers: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    sent = sum(w["sent"] for w in workers)
    outcomes: dict[str, int] = {}
    for w in workers:
        for outcome, n in w["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
    return {
        "requests": sent,
        "clients": len(workers),
        "contained_clients": [w["client"] for w in workers if w["first_throttled_or_contained"]],
        "refused": sent - outcomes.get(OK, 0),
        "refusal_rate": (sent - outcomes.get(OK, 0)) / sent if sent else None,
        "outcomes": outcomes,
        "throughput_rps": sent / wall_s if wall_s else None,
        "sending_s": max(w["seconds"] for w in workers),
        "wall_s": wall_s,
        "workers": workers,
    }


def _num(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    attacks = [r for r in result["table"] if r["attack"] != ADAPTIVE]
    adaptive = [r for r in result["table"] if r["attack"] == ADAPTIVE]
    lines = [
        "# Incident: a coordinated query-based attack against the stateful defence",
        "",
        f"`{result['command']}` at {_commit(result)}, {result['timestamp']}; probes answered "
        f"`{s['response']}`; budget {s['budget']} queries per seed, stopped "
        f"{s['after_detection']} queries after detection; attacker identity rotated every "
        f"{s['rotate']} queries; {s['parallel']} queries in flight. Detection: the first query "
        "the gateway acted on, from its debug log (a probe answered with the earlier answer, "
        "even when equal to the fresh one; a 403 repeating a refusal; 429; 403 contained); "
        "beside it the first 429 or 403 contained the attacker saw. "
        f"Run took {result['elapsed_s']:.0f} s.",
        "",
        "| attack | library | threat | seeds | detected | queries to detection (median / max) "
        "| first 429 or contained (median) | answered after detection "
        "| refused or repeated after detection "
        "| adversarial obtained (before detection) | final image adversarial | queries "
        "| plain 403 (screening alone) | identities | s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r['name']} | {r['library']} | {r['threat']} | {r['seeds']} | {_detected(r)} "
        f"| {_num(r['detection_median'])} / {_num(r['detection_max'])} "
        f"| {_num(r['contained_median'])} | {r['after_answered']} of {r['after_detection']} "
        f"| {_pct(r['after_refused_or_repeated'])} "
        f"| {r['obtained']} / {r['seeds']} ({r['obtained_before_detection']}) "
        f"| {r['final_adversarial']} / {r['seeds']} | {r['queries']} | {_withheld(r)} "
        f"| {r['identities']} "
        f"| {r['seconds']:.0f} |"
        for r in attacks
    ]
    if adaptive:
        r = adaptive[0]
        lines += [
            "",
            "Adaptive attacker (OARS-style: fresh noise on every query, waits out 429, new "
            "identity on a refusal, one resend):",
            "",
            "| attack | seeds | successes | success rate | requests | refused | outcomes "
            "| plain 403 (screening alone) | detection (median) | identities | resends | s |",
            "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|",
            f"| {r['name']} | {r['seeds']} | {r['obtained']} | {r['obtained'] / r['seeds']:.0%} "
            f"| {r['queries']} | {_pct(r['refused_share'])} | {_outcomes(r['outcomes'])} "
            f"| {_withheld(r)} "
            f"| {_num(r['detection_median'])} | {r['identities']} | {r['retries']} "
            f"| {r['seconds']:.0f} |",
        ]
    honest = result["honest"]
    lines += [
        "",
        f"Honest clients ({honest['clients']} identities, about {s['honest_rate']:g} requests/s "
        "each; refused: anything but 200):",
        "",
        "| phase | s | requests | refused | refusal rate | screening alone | refused by the "
        "defence | outcomes | p50 / p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    groups = {"": honest["phases"], "newcomers, ": honest.get("newcomers", {})}
    lines += [
        f"| {label}{phase} | {p['seconds']:.0f} | {p['requests']} | {p['refused']} "
        f"| {_pct(p['refusal_rate'])} | {p['screening_alone']} ({_pct(p['screening_alone_rate'])}) "
        f"| {p['defence_refused']} ({_pct(p['defence_rate'], 2)}) | {_outcomes(p['outcomes'])} "
        f"| {p['latency_p50_ms']:.1f} / {p['latency_p99_ms']:.1f} |"
        for label, by_phase in groups.items()
        for phase, p in by_phase.items()
        if p["requests"]
    ]
    change = honest.get("defence_rate_change")
    newcomers = honest.get("newcomer_defence_rate_change")
    lines += [
        "",
        "Screening alone: the honest pictures the per-image screening withholds by itself, "
        "scored offline; refused by the defence: refused pictures the screening alone passes "
        "(throttled, contained, withheld under the strict rung, a probe refused). The attack "
        "reaches honest clients only through the defence, so the before/during comparison is "
        "made on that share [within 0.2 points]: "
        + (f"{change * 100:+.2f} points" if change is not None else "n/a")
        + "; for the newcomers (a fresh identity every "
        f"{s['newcomer_rotate']} requests, whose suspicious images an alert withholds): "
        + (f"{newcomers * 100:+.2f} points." if newcomers is not None else "n/a."),
    ]
    contained = honest["contained_clients"]
    lines += [
        "",
        f"Honest clients ever throttled or contained: {len(contained)}"
        + (f" ({', '.join(contained)})" if contained else "")
        + f". Rung changes the gateway logged: {result['transitions_logged']}. Honest queries "
        f"the gateway took for probes, by what they got: {honest.get('probes', {})}.",
        "",
        "A plain 403 is the per-image screening's (reason adversarial); in brackets, how "
        "many of those images the screening withholds by itself, scored offline: the rest were "
        "withheld because the defence's strict rung withholds suspicious images too (or an "
        "alert: a young identity's suspicious images are withheld while a campaign is "
        "contained). A start refused: foolbox asks for its start first and stops when it is "
        "refused, so that seed's attack never began (no detection to count).",
        "",
        f"Targets: refused or repeated after detection >= {REFUSALS_TARGET:.0%}; adaptive "
        f"success <= {ADAPTIVE_TARGET:.0%}; no honest client contained.",
        "",
    ]
    return "\n".join(lines)


def _detected(row: dict[str, Any]) -> str:
    refused = row.get("start_refused", 0)
    return f"{row['detected']}" + (f" (+{refused} start refused)" if refused else "")


def _withheld(row: dict[str, Any]) -> str:
    return f"{row['outcomes'].get('withheld', 0)} ({row['withheld_by_screening_alone']})"


def _commit(result: dict[str, Any]) -> str:
    changed = len(result["uncommitted"])
    return result["commit"] + (
        f" (+{changed} uncommitted files in gateway/, models/)" if changed else ""
    )


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))


def volume_markdown(result: dict[str, Any]) -> str:
    v = result["volume"]
    return "\n".join(
        [
            "# Incident: honest volume check (no attacker)",
            "",
            f"`{result['command']}` at {_commit(result)}, {result['timestamp']}; "
            f"{v['clients']} honest processes as fast as they go (throughput counts from the "
            f"start of the pool; the clients sent for {v['sending_s']:.0f} s).",
            "",
            "| requests | clients throttled or contained | refused | refusal rate | outcomes "
            "| throughput (req/s) | wall s |",
            "|--:|--:|--:|--:|---|--:|--:|",
            f"| {v['requests']} | {len(v['contained_clients'])} | {v['refused']} "
            f"| {_pct(v['refusal_rate'])} | {_outcomes(v['outcomes'])} "
            f"| {_num(v['throughput_rps'])} | {v['wall_s']:.0f} |",
            "",
            f"Rung changes the gateway logged: {result['transitions_logged']}.",
            "",
        ]
    )
