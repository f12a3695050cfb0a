"""One bounded, headless locust run against one server, read back into numbers.

Locust's CSV gives the request rate and failures; the locustfile's own JSON gives exact latency
percentiles (the CSV rounds to whole milliseconds, too coarse at these latencies). The locust
process's CPU time comes from ``RUSAGE_CHILDREN``, to show what the load generator itself cost.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bastion.benchmarks.workload import REPO_ROOT

LOCUSTFILE = REPO_ROOT / "benchmarks" / "locustfile.py"
STOP_TIMEOUT_S = 3


@dataclass
class LoadResult:
    """What one run at a fixed user count measured, client side."""

    users: int
    duration_s: float
    requests: int
    all_requests: int
    failures: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    csv_p50_ms: float
    csv_p99_ms: float
    client_cpu_s: float
    wall_s: float
    command: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def locust_command(url: str, users: int, duration_s: float, csv_prefix: Path) -> list[str]:
    """The locust invocation: all users at once, bounded run time, summary only."""
    locust = Path(sys.executable).with_name("locust")
    return [
        str(locust),
        "-f",
        str(LOCUSTFILE.relative_to(REPO_ROOT)),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        f"{int(duration_s)}s",
        "--host",
        url,
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--reset-stats",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--loglevel",
        "WARNING",
    ]


def _aggregated_row(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                return row
    raise RuntimeError(f"no Aggregated row in {stats_csv}")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_locust(url: str, users: int, duration_s: float, workdir: Path) -> LoadResult:
    """Runs locust for ``duration_s`` at ``users`` closed-loop users and reads its results."""
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / f"u{users}"
    latency_json = workdir / f"u{users}_latency.json"
    latency_json.unlink(missing_ok=True)
    command = locust_command(url, users, duration_s, prefix)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BENCH_LATENCY_OUT": str(latency_json),
        "OMP_NUM_THREADS": "1",
    }
    cpu_before, started = _children_cpu_s(), time.monotonic()
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=duration_s + STOP_TIMEOUT_S + 90,
        check=False,
    )
    wall_s, client_cpu_s = time.monotonic() - started, _children_cpu_s() - cpu_before
    stats_csv = Path(f"{prefix}_stats.csv")
    if done.returncode not in (0, 1) or not stats_csv.exists() or not latency_json.exists():
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"locust failed ({done.returncode}):\n{tail}")
    row = _aggregated_row(stats_csv)
    if int(row["Request Count"]) == 0:
        raise RuntimeError(f"locust recorded no requests in {duration_s} s against {url}")
    exact = json.loads(latency_json.read_text())
    return LoadResult(
        users=users,
        duration_s=duration_s,
        requests=int(row["Request Count"]),
        all_requests=int(exact["all_requests"]),
        failures=int(row["Failure Count"]),
        rps=float(row["Requests/s"]),
        p50_ms=exact["p50_ms"],
        p90_ms=exact["p90_ms"],
        p99_ms=exact["p99_ms"],
        csv_p50_ms=float(row["50%"]),
        csv_p99_ms=float(row["99%"]),
        client_cpu_s=client_cpu_s,
        wall_s=wall_s,
        command=shlex.join(command).replace(f"{REPO_ROOT}/", ""),
    )
