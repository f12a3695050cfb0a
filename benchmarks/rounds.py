"""Interleaved rounds for benchmarks that compare servers on this noisy 2-core machine.

Each round runs every arm in turn, each started afresh and alone; a ratio is taken within a
round, where the machine's rate has moved least. One arm that fails is recorded with its error
and does not cost the others their runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def run_rounds(
    label: str, arms: Sequence[str], rounds: int, bench: Callable[[str], dict]
) -> list[dict[str, dict]]:
    """``rounds`` times, ``bench(arm)`` for each arm in turn (an exception: ``{"error": ...}``)."""
    results: list[dict[str, dict]] = []
    for number in range(1, rounds + 1):
        round_results: dict[str, dict] = {}
        for name in arms:
            print(f"{label}: round {number}: {name} ...", file=sys.stderr, flush=True)
            try:
                round_results[name] = bench(name)
            except Exception as error:  # one broken arm must not cost the others theirs
                round_results[name] = {"error": f"{type(error).__name__}: {error}"[:4000]}
                print(f"{label}: {name} failed: {round_results[name]['error']}", file=sys.stderr)
        results.append(round_results)
    return results


def write_report(out: Path, stem: str, report: dict, markdown: Callable[[dict], str]) -> int:
    """Writes ``<stem>.json`` and ``<stem>.md`` under ``out`` and prints the table; returns
    the exit status (1 when any arm of any round failed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(text)
    failed = any("error" in r for results in report["rounds"] for r in results.values())
    return 1 if failed else 0
