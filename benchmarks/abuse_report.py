"""The abuse benchmark's report: latency statistics per phase, attack outcomes, the verdict
against the targets, and the markdown table (``benchmarks/abuse.py`` runs the phases)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from bastion.benchmarks.abuse_clients import HANG, NO_ANSWER, NO_RESPONSE, TIMED_OUT, Sample

ALLOWED_REFUSALS = {"400", "408", "413", "431", "503"}


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # time.monotonic(), shared by every process
    end: float


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100): an observed value, never an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def _status_name(status: int) -> str:
    return {TIMED_OUT: HANG, NO_RESPONSE: NO_ANSWER}.get(status, str(status))


def latency_stats(samples: list[Sample], phase: Phase, ok: set[int]) -> dict[str, Any]:
    """Latency percentiles (ms) and statuses of the samples scheduled inside ``phase``: from the
    scheduled time (the headline) and from the actual send; and the five slowest, with when
    they were scheduled (seconds into the phase)."""
    inside = [s for s in samples if phase.start <= s[0] < phase.end]
    ms = [latency * 1e3 for _, latency, _, _ in inside]
    sent_ms = [service * 1e3 for _, _, service, _ in inside]
    statuses = Counter(_status_name(status) for *_, status in inside)
    slowest = sorted(inside, key=lambda s: s[1], reverse=True)[:5]
    return {
        "requests": len(inside),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=None),
        "from_send_p50_ms": percentile(sent_ms, 50),
        "from_send_p99_ms": percentile(sent_ms, 99),
        "failures": sum(1 for *_, status in inside if status not in ok),
        "statuses": dict(sorted(statuses.items())),
        "slowest": [
            {"at_s": round(s[0] - phase.start, 3), "ms": round(s[1] * 1e3, 1)} for s in slowest
        ],
    }


def summarize(raw: dict[str, Any], target_p99_ms: float) -> dict[str, Any]:
    """Per-phase health and clean numbers, attack outcomes by kind, and the verdict."""
    health = next((r for kind, r in raw["reports"] if kind == "health"), None)
    clean = next((r for kind, r in raw["reports"] if kind == "clean"), None)
    if health is None or clean is None:
        raise RuntimeError("the health prober or the clean client did not report")
    phases = {}
    for phase in raw["phases"]:
        phases[phase.name] = {
            "seconds": phase.end - phase.start,
            "health_kept_alive": latency_stats(health["kept_alive"], phase, {200}),
            "health_fresh": latency_stats(health["fresh"], phase, {200}),
            "clean": latency_stats(clean, phase, {200, 403}),  # 403: screening withheld it
            "server_cpu_cores": raw["server_cpu_cores"][phase.name],
            "other_cpu_cores": raw["other_cpu_cores"][phase.name],
        }
    attacks = {name: attack_outcomes(reports) for name, reports in raw["attacks"].items()}
    return {
        "phases": phases,
        "attackers_reported": {name: len(reports) for name, reports in raw["attacks"].items()},
        "attacks": attacks,
        "verdict": verdict(phases, attacks, target_p99_ms),
    }


def attack_outcomes(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One attack phase's answers by kind and outcome, and the median time to an answer."""
    outcomes: dict[str, Counter[str]] = {}
    seconds: dict[str, list[float]] = {}
    for report in reports:
        for key, count in report["outcomes"].items():
            kind, outcome = key.split(":", 1)
            outcomes.setdefault(kind, Counter())[outcome] += count
        seconds.setdefault(report["kind"], []).extend(report["seconds"])
    return {
        kind: {
            "outcomes": dict(sorted(counts.items())),
            "answered_ms_p50": percentile([s * 1e3 for s in seconds.get(kind, [])], 50),
        }
        for kind, counts in sorted(outcomes.items())
    }


def verdict(
    phases: dict[str, Any], attacks: dict[str, dict[str, Any]], target_p99_ms: float
) -> dict[str, Any]:
    """The targets: health p99 in the mixed attack, no 5xx but 503 anywhere, no hang anywhere,
    every attack answered with one of the refusals it was designed to get."""
    statuses: Counter[str] = Counter()
    for numbers in phases.values():
        for series in ("health_kept_alive", "health_fresh", "clean"):
            statuses.update(numbers[series]["statuses"])
    unexpected: dict[str, dict[str, int]] = {}
    for name, kinds in attacks.items():
        for kind, row in kinds.items():
            statuses.update(row["outcomes"])
            odd = {
                o: n for o, n in row["outcomes"].items() if o not in ALLOWED_REFUSALS | {NO_ANSWER}
            }
            if odd:
                unexpected[f"{name}: {kind}"] = odd
    p99 = phases.get("attack", {}).get("health_kept_alive", {}).get("p99_ms")
    checks = {
        "health_p99_under_attack": p99 is not None and p99 <= target_p99_ms,
        "no_5xx_but_503": all(not (s.isdigit() and int(s) >= 500 and s != "503") for s in statuses),
        "no_hangs": statuses[HANG] == 0,
        "attacks_refused_as_designed": not unexpected,
    }
    return {
        "target_health_p99_ms": target_p99_ms,
        "health_p99_under_attack_ms": p99,
        "hangs": statuses[HANG],
        "unexpected_attack_outcomes": unexpected,
        "checks": checks,
        "pass": all(checks.values()),
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value:,}" for key, value in counts.items()) or "none"


def markdown(report: dict[str, Any]) -> str:
    """The tables RESULTS.md quotes, and the verdict."""
    machine, settings = report["machine"], report["settings"]
    lines = [
        "# Abuse: health under attack",
        "",
        f"Command: `{report['command']}` at commit `{report['commit']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, "
        f"{machine['memory_gib']} GiB, {machine['gpus']} GPUs; Python {machine['python']}.",
        f"Health: `/v2/health/live` at {settings['health_hz']:g} Hz over one kept-alive "
        f"connection and at {settings['health_hz'] / 4:g} Hz over fresh connections; clean: one "
        f"test digit per request at {settings['clean_rate_hz']:g} requests/s, open loop over up "
        "to 8 kept-alive connections (403: screening withheld a clean digit, as calibrated). "
        "Latency is from each request's scheduled send time unless it says *from send*. Attack: "
        f"{len(settings['attackers'])} attacker processes ({', '.join(settings['attackers'])}) "
        f"at {settings['attack_rate_hz_per_attacker']:g} requests/s each, each also holding "
        f"{settings['slowloris_per_attacker']} slowloris connections, at nice "
        f"{settings['attacker_nice']}.",
        "",
        "| phase | s | health p50 ms | p99 ms | max ms | failures | fresh-connection p50 ms "
        "| p99 ms | max ms | failures | server CPU cores | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, phase in report["phases"].items():
        kept, fresh = phase["health_kept_alive"], phase["health_fresh"]
        lines.append(
            f"| {name} | {phase['seconds']:.0f} | {_ms(kept['p50_ms'])} | {_ms(kept['p99_ms'])} "
            f"| {_ms(kept['max_ms'])} | {kept['failures']} / {kept['requests']} "
            f"| {_ms(fresh['p50_ms'])} | {_ms(fresh['p99_ms'])} | {_ms(fresh['max_ms'])} "
            f"| {fresh['failures']} / {fresh['requests']} | {phase['server_cpu_cores']:.2f} "
            f"| {phase['other_cpu_cores']:.2f} |"
        )
    lines += [
        "",
        "| phase | clean requests | p50 ms | p99 ms | p50 ms from send | p99 ms from send "
        "| statuses |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, phase in report["phases"].items():
        clean = phase["clean"]
        lines.append(
            f"| {name} | {clean['requests']} | {_ms(clean['p50_ms'])} | {_ms(clean['p99_ms'])} "
            f"| {_ms(clean['from_send_p50_ms'])} | {_ms(clean['from_send_p99_ms'])} "
            f"| {_counts(clean['statuses'])} |"
        )
    lines += [
        "",
        "| phase | attack | answers and outcomes | median time to answer ms |",
        "|---|---|---|---:|",
    ]
    for name, kinds in report["attacks"].items():
        for kind, row in kinds.items():
            lines.append(
                f"| {name} | {kind} | {_counts(row['outcomes'])} | {_ms(row['answered_ms_p50'])} |"
            )
    verdict_ = report["verdict"]
    checks = verdict_["checks"]
    lines += [
        "",
        f"Gateway's own refusal counts (`bastion_http_rejected_total`): "
        f"{_counts({k: int(v) for k, v in report['rejected_total'].items()})}.",
        "",
        f"- health p99 under attack ≤ {verdict_['target_health_p99_ms']:g} ms: "
        f"{_ms(verdict_['health_p99_under_attack_ms'])} ms — "
        f"{'PASS' if checks['health_p99_under_attack'] else 'FAIL'}",
        f"- no 5xx other than 503: {'PASS' if checks['no_5xx_but_503'] else 'FAIL'}",
        f"- no hangs: {verdict_['hangs']} — {'PASS' if checks['no_hangs'] else 'FAIL'}",
        f"- every attack answered 400/408/413/431/503 (or closed): "
        f"{'PASS' if checks['attacks_refused_as_designed'] else 'FAIL'}"
        + (
            f" {verdict_['unexpected_attack_outcomes']}"
            if verdict_["unexpected_attack_outcomes"]
            else ""
        ),
        "",
        f"**{'PASS' if verdict_['pass'] else 'FAIL'}**",
        "",
    ]
    return "\n".join(lines)
