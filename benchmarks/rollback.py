"""The incident played to the rollback: from the first probe to containment, to the incident,
to 100 % of traffic on the safe version (target ≤ 1 s), and no request failed on the way.

One gateway serves the digits model as versions 1 (safe) and 2 (a canary), half the traffic
each. Honest clients send fresh digits throughout, four threads, each request under a new
client id so both versions answer. An attacker then walks one digit in small sparse steps, a
new identity every three queries, until the gateway rolls the model back by rule (a contained
campaign). Times come from the gateway itself: its debug log's first probe line, and the
incident log's entries (containment at the refuse rung, the incident opened, the rollback).
Prints a table and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from bastion.benchmarks.adversarial.through_gateway import running_gateway
from bastion.benchmarks.incident_clients import OK, WITHHELD, GatewayClient
from bastion.benchmarks.workload import REPO_ROOT
from bastion.gateway.settings import DEFAULT_REPOSITORY

RESULTS = REPO_ROOT / "benchmarks" / "results" / "rollback.json"
TOKEN = "rollback-bench"


def two_versions(folder: Path) -> Path:
    repository = folder / "repository"
    shutil.copytree(DEFAULT_REPOSITORY, repository)
    shutil.copytree(repository / "digits" / "1", repository / "digits" / "2")
    config = repository / "digits" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("latest { num_versions: 1 }", "all { }")
    )  # fmt: skip
    return repository


def honest(url: str, digits: np.ndarray, stop: threading.Event, out: list, worker: int) -> None:
    client, n = GatewayClient(url), 0
    while not stop.is_set():
        started = time.time()
        reply = client.infer(digits[(worker * 997 + n) % len(digits)], f"h{worker}-{n}")
        out.append((started, reply.outcome, reply.version))
        n += 1


def attack(url: str, image: np.ndarray, steps: int, seed: int) -> float:
    """A decision-based walk: tiny sparse steps, a new identity every three; returns the time
    of its first query."""
    rng, client, first = np.random.default_rng(seed), GatewayClient(url), time.time()
    probe = image.copy()
    for i in range(steps):
        step = rng.random(probe.shape) < 0.005
        probe = np.where(step, np.clip(probe + rng.choice([-0.1, 0.1], probe.shape), 0, 1), probe)
        client.infer(probe.astype(np.float32), f"sybil-{i // 3}")
    return first


def first_probe_time(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if " probe: client sybil-" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def entry_times(database: Path) -> dict[str, float | None]:
    conn = sqlite3.connect(database)
    try:

        def first(where: str) -> float | None:
            return conn.execute(f"SELECT MIN(time) FROM log_entries WHERE {where}").fetchone()[0]

        return {
            "contained": first("kind = 'containment' AND body LIKE '%\"rung\":\"refuse\"%'"),
            "incident": first("kind = 'incident_opened'"),
            "rollback": first("kind = 'rollback'"),
        }
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest-seconds", type=float, default=5.0, help="before the attack")
    parser.add_argument("--after-seconds", type=float, default=3.0, help="after the rollback")
    parser.add_argument("--steps", type=int, default=60, help="attacker queries")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from bastion.models.data import load_split, to_float

    digits = to_float(load_split("test")[0][:500])
    with tempfile.TemporaryDirectory(prefix="bastion-rollback-") as tmp:
        folder = Path(tmp)
        env = {"BASTION_ADMIN_TOKEN": TOKEN, "BASTION_LOG_LEVEL": "debug"}
        with running_gateway(two_versions(folder), folder, env=env) as url:
            put = httpx.put(
                f"http://{url}/v2/admin/routes/digits",
                json={"weights": {"1": 0.5, "2": 0.5}, "safe": 1},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            )
            put.raise_for_status()
            stop, records = threading.Event(), []
            threads = [
                threading.Thread(target=honest, args=(url, digits[100:], stop, records, i))
                for i in range(4)
            ]
            for thread in threads:
                thread.start()
            time.sleep(args.honest_seconds)
            attack_started = attack(url, digits[7], args.steps, 0)
            time.sleep(args.after_seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        times = entry_times(folder / "incidents.db")
        probe = first_probe_time(folder / "bastion.log")
    rollback = times["rollback"]
    failed = [r for r in records if r[1] not in (OK, WITHHELD)]
    canary_after = [r for r in records if rollback and r[0] > rollback and r[2] == "2"]
    after = [r for r in records if rollback and r[0] > rollback and r[1] == OK]

    def since(t: float | None) -> float | None:
        return None if t is None or probe is None else round(t - probe, 3)

    result = {
        "command": "python -m bastion.benchmarks.rollback",
        "attack_started_to_first_probe_s": None
        if probe is None
        else round(probe - attack_started, 3),
        "probe_to_containment_s": since(times["contained"]),
        "probe_to_incident_s": since(times["incident"]),
        "probe_to_rollback_s": since(rollback),
        "honest_requests": len(records),
        "honest_failed": len(failed),
        "answered_after_rollback": len(after),
        "canary_answers_after_rollback": len(canary_after),
    }
    print("| first probe → containment s | → incident s | → 100 % on the safe version s "
          "| honest requests | failed | answered after the rollback | by the canary |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|--:|--:|")
    print(
        f"| {result['probe_to_containment_s']} | {result['probe_to_incident_s']} "
        f"| {result['probe_to_rollback_s']} | {len(records)} | {len(failed)} | {len(after)} "
        f"| {len(canary_after)} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
