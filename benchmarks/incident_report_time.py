"""How long the impact report takes over a ledger of 1,000,000 rows (target: within 60 s).

Builds a ledger of ``--rows`` rows over ``--hours`` hours: honest clients with random
fingerprint sketches, and a campaign of ``--attackers`` identities during the last hour whose
queries share sketch hashes with each other; ``--planted`` honest rows in the window are
near-duplicates of attack queries (what the report must find). An incident log holds the
campaign's containment entries. Then times ``bastion incidents report``'s build and write, and
checks what it found against what was planted. Prints a table and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from bastion.benchmarks.workload import REPO_ROOT
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.ledger import SKETCH, SKETCH_MATCH, Ledger
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.report import build, write
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.store import IncidentStore

RESULTS = REPO_ROOT / "benchmarks" / "results" / "incident_report_time.json"


def fill(path: Path, args: argparse.Namespace, now: float) -> tuple[int, int]:
    """Writes the ledger; returns (attack rows served, honest rows planted as linked)."""
    rng = np.random.default_rng(0)
    Ledger(path, 1e9, 10**9).close()  # the schema
    n, start = args.rows, now - args.hours * 3600.0
    times = np.sort(rng.uniform(start, now - 60.0, n))
    sketches = np.sort(rng.integers(-(2**62), 2**62, size=(n, SKETCH)), axis=1)
    clients = np.array([f"honest-{i}" for i in range(200)])[rng.integers(0, 200, n)].astype(object)
    outcomes = np.full(n, "served", dtype=object)
    window = np.flatnonzero(times >= now - 3000.0)  # well inside the report's hour
    attack = rng.choice(window, size=args.attack_rows, replace=False)
    base = rng.integers(-(2**62), 2**62, size=SKETCH)  # the point the attack circles
    for i in attack:  # each attack query shares all but two of its hashes with the base
        sketches[i, : SKETCH - 2] = base[: SKETCH - 2]
        clients[i] = f"sybil-{rng.integers(args.attackers)}"
        outcomes[i] = "served" if rng.random() < 0.02 else "refused"
    honest = np.setdiff1d(window, attack)
    planted = rng.choice(honest, size=args.planted, replace=False)
    # an honest picture the attack probed around: just enough in common with its queries
    sketches[planted, : SKETCH_MATCH + 1] = base[: SKETCH_MATCH + 1]
    rows = [
        (float(times[i]), str(clients[i]), "digits", "1", None, str(outcomes[i]), int(i),
         np.sort(sketches[i]).astype("<i8").tobytes(), int(i % 10), 0.9, "clean")
        for i in range(n)
    ]  # fmt: skip
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO served (time, client, model, version, request_id, outcome, input_hash, "
            "sketch, predicted, confidence, tier) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()
    return int((outcomes[attack] == "served").sum()), args.planted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--attackers", type=int, default=50)
    parser.add_argument("--attack-rows", type=int, default=5_000)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="bastion-report-") as tmp:
        folder = Path(tmp)
        filled = time.perf_counter()
        attack_served, planted = fill(folder / "ledger.db", args, now)
        fill_s = time.perf_counter() - filled
        log = IncidentLog(folder / "incidents.db", Signer.from_file(folder / "key.pem"))
        grouper = Grouper(IncidentStore(folder / "incidents.db"), log)
        log.listeners.append(grouper.on_entry)
        for i in range(args.attackers):
            body = {"rung": "refuse", "campaign": "sybil-0", "campaign_size": args.attackers}
            log.append("containment", f"sybil-{i}", body)
        (incident,) = grouper.store.list()
        started = time.perf_counter()
        report = build(incident.id, folder / "incidents.db", folder / "ledger.db")
        built = time.perf_counter() - started
        write(report, folder / "out")
        total = time.perf_counter() - started
        grouper.store.close()
        log.close()
    linked_honest = sum(r["client"].startswith("honest-") for r in report["linked_served"])
    result = {
        "command": "python -m bastion.benchmarks.incident_report_time",
        "rows": args.rows,
        "fill_s": round(fill_s, 1),
        "build_s": round(built, 2),
        "build_and_write_s": round(total, 2),
        "attacker_served": report["attacker_served_count"],
        "attacker_served_planted": attack_served,
        "linked_honest_found": linked_honest,
        "linked_honest_planted": planted,
    }
    print("| ledger rows | report build s | build + write s | attacker served found / true "
          "| linked honest found / planted |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|")
    print(
        f"| {args.rows:,} | {result['build_s']} | {result['build_and_write_s']} "
        f"| {report['attacker_served_count']} / {attack_served} | {linked_honest} / {planted} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
