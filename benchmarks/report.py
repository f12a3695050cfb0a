"""Ratios, targets and the Markdown tables of a serving run.

The issues' targets are relative, so they are computed from one invocation's numbers only: at 64
users Bastion (unscreened) must reach 1.5x the plain endpoint's and 1.0x PyTriton's requests/s,
each at a lower p99, and screened Bastion 0.6x unscreened Bastion's requests/s. Ratios of PyTriton
to the plain endpoint are shown too, as a yardstick for what batching buys.
"""

from __future__ import annotations

from typing import Any

PAIRS = (
    ("bastion", "plain"),
    ("bastion", "pytriton"),
    ("pytriton", "plain"),
    ("bastion-screened", "bastion"),
    ("bastion-screened", "plain"),
    ("bastion", "bastion-baseline"),
)
# (subject, baseline): (least rps ratio, whether the subject's p99 must also be lower)
TARGETS = {
    ("bastion", "plain"): (1.5, True),
    ("bastion", "pytriton"): (1.0, True),
    ("bastion-screened", "bastion"): (0.6, False),
    ("bastion", "bastion-baseline"): (0.95, False),  # a change costs at most 5 % of rps
}
TARGET_USERS = 64
NOISY_CORES = 0.25


def _run(results: dict[str, dict], server: str, users: int) -> dict[str, Any] | None:
    return results.get(server, {}).get("runs", {}).get(str(users))


def ratios(results: dict[str, dict], users: list[int]) -> list[dict[str, Any]]:
    """Subject / baseline for rps, p99 and server CPU per request, where both were measured."""
    rows = []
    for subject, baseline in PAIRS:
        for count in users:
            mine, theirs = _run(results, subject, count), _run(results, baseline, count)
            if mine is None or theirs is None:
                continue
            rows.append(
                {
                    "subject": subject,
                    "baseline": baseline,
                    "users": count,
                    "rps_ratio": mine["rps"] / theirs["rps"],
                    "p99_ratio": mine["p99_ms"] / theirs["p99_ms"],
                    "cpu_per_request_ratio": mine["server_cpu_ms_per_request"]
                    / theirs["server_cpu_ms_per_request"],
                }
            )
    return rows


def targets(ratio_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance targets at 64 users: met, not met, or not measured."""
    found = {(r["subject"], r["baseline"], r["users"]): r for r in ratio_rows}
    verdicts = []
    for (subject, baseline), (needed, lower_p99) in TARGETS.items():
        row = found.get((subject, baseline, TARGET_USERS))
        verdict = {
            "subject": subject,
            "baseline": baseline,
            "needed_rps_ratio": needed,
            "needs_lower_p99": lower_p99,
        }
        if row is None:
            verdict["status"] = "not measured"
        else:
            met = row["rps_ratio"] >= needed and (row["p99_ratio"] < 1.0 or not lower_p99)
            verdict |= {"rps_ratio": row["rps_ratio"], "p99_ratio": row["p99_ratio"]}
            verdict["status"] = "met" if met else "not met"
        verdicts.append(verdict)
    return verdicts


def summarize(results: dict[str, dict], users: list[int]) -> dict[str, list[dict[str, Any]]]:
    rows = ratios(results, users)
    return {"ratios": rows, "targets": targets(rows)}


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _noisy(run: dict[str, Any]) -> bool:
    """Other processes took a quarter core or more: this run's rps understates the server."""
    return run["other_cpu_cores"] >= NOISY_CORES


def runs_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| server | users | requests/s | p50 ms | p99 ms | failures | server CPU ms/req "
        "| locust CPU ms/req | mean batch | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, record in results.items():
        for users, run in record.get("runs", {}).items():
            lines.append(
                f"| {name} | {users} | {run['rps']:,.0f} | {run['p50_ms']:.2f} "
                f"| {run['p99_ms']:.2f} | {run['failures']} "
                f"| {run['server_cpu_ms_per_request']:.3f} "
                f"| {run['client_cpu_ms_per_request']:.3f} | {_number(run['mean_batch'], '.1f')} "
                f"| {run['other_cpu_cores']:.2f}{' (noisy)' if _noisy(run) else ''} |"
            )
    return lines


def checks_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| server | version | ready after s | max abs diff vs bare model | test accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for name, record in results.items():
        if "check" not in record:
            continue
        check = record["check"]
        lines.append(
            f"| {name} | {record['version']} | {record['startup_s']:.1f} "
            f"| {check['max_abs_diff_vs_bare_model']:.2e} | {_number(check['accuracy'], '.3f')} |"
        )
    return lines


def ratio_tables(summary: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| subject / baseline | users | rps ratio | p99 ratio | server CPU/req ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["ratios"]:
        lines.append(
            f"| {row['subject']} / {row['baseline']} | {row['users']} | {row['rps_ratio']:.2f} "
            f"| {row['p99_ratio']:.2f} | {row['cpu_per_request_ratio']:.2f} |"
        )
    lines += ["", f"Targets at {TARGET_USERS} users:", ""]
    for verdict in summary["targets"]:
        detail = ""
        if "rps_ratio" in verdict:
            detail = f" (rps x{verdict['rps_ratio']:.2f}, p99 x{verdict['p99_ratio']:.2f})"
        p99 = " at a lower p99" if verdict.get("needs_lower_p99", True) else ""
        lines.append(
            f"- {verdict['subject']} >= {verdict['needed_rps_ratio']}x {verdict['baseline']} rps"
            f"{p99}: **{verdict['status']}**{detail}"
        )
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """The whole run as Markdown: machine, command, checks, load results, ratios, errors."""
    machine, settings = report["machine"], report["settings"]
    results = report["servers"]
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, "
        f"{machine['memory_gib']} GiB, {machine['gpus']} GPUs; Python {machine['python']}.",
        f"Load: locust, closed-loop users, {settings['duration_s']:g} s per user count after "
        f"{settings['warmup_s']:g} s of warm-up; one 1x1x28x28 FP32 image per request. "
        f"Peers (plain, PyTriton) serve the model in {settings.get('peer_layout', 'nchw')} layout.",
        "",
        *checks_table(results),
        "",
        *runs_table(results),
        "",
        *ratio_tables(report["summary"]),
    ]
    for name, record in results.items():
        if "error" in record:
            lines += ["", f"Error from {name}:", "", "```", record["error"][-1500:].strip(), "```"]
    return "\n".join(lines) + "\n"
