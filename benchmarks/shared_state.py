"""What sharing state costs: one replica on SQLite, one on PostgreSQL + Redis, three behind HAProxy.

The same screened gateway (the bundled digits model, screening on with action ``flag`` so every
request is answered, the stateful defence on, a per-client rate limit far above the load so it
admits everything but is checked on every request) is loaded by locust at ``--users`` closed-loop
users, one configuration after another, in one run:

- **sqlite**: one ``bastion serve``, its state in SQLite files and memory (the embedded default);
- **shared**: one replica of ``scripts/cluster.sh`` (PostgreSQL and Redis, the Debian packages),
  loaded directly: keys, incident log and ledger in PostgreSQL; rate limit, defence evidence and
  routes through Redis;
- **cluster**: three replicas of ``scripts/cluster.sh`` behind HAProxy, loaded through it.

Per configuration: requests/s, p50/p99, the ratio to **sqlite** (target: **shared** at least
0.90, the shared state's cost at most 10 %), and Redis round trips per executed batch (from the
gateways' ``bastion_shared_state_round_trips_total``, whose pipelines count one, against
``nv_inference_exec_count``), split into the request path's (the rate limit) and the defence's
stream (sent beside it). On this 2-core machine three replicas share two cores with PostgreSQL,
Redis, HAProxy and locust: the **cluster** row shows that the bed works under load and what
HAProxy adds, not scaling.

The machine is shared and noisy (the same configuration varies by 20 % from run to run here), so
the configurations run in ``--rounds`` interleaved rounds and the table gives each one's medians.

Run: ``python -m bastion.benchmarks.shared_state [--duration 20] [--users 64] [--rounds 3]``
(about 8 minutes);
Markdown and JSON go to ``benchmarks/results/shared_state/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from bastion.benchmarks import procs
from bastion.benchmarks.loadgen import run_locust
from bastion.benchmarks.serving import bastion_repository, infer_probe
from bastion.benchmarks.workload import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "results" / "shared_state"
CLUSTER = REPO_ROOT / "scripts" / "cluster.sh"
METRICS_TOKEN = "bench-metrics"
SETTINGS = {
    "BASTION_DEFENCE": "true",
    "BASTION_RATE_LIMIT": "10000000",  # checked on every request, never refusing
    "BASTION_RATE_LIMIT_BURST": "100000",
    "BASTION_METRICS_TOKEN": METRICS_TOKEN,
    "BASTION_TORCH_THREADS": "1",
}
COUNTER = re.compile(r"^(\w+)\{([^}]*)\} ([0-9.e+]+)$")


def scrape(urls: list[str]) -> dict[str, float]:
    """Executions and Redis round trips (by operation), summed over the gateways."""
    totals: dict[str, float] = {}
    for url in urls:
        request = urllib.request.Request(
            f"http://{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            match = COUNTER.match(line)
            if match is None:
                continue
            name, labels, value = match.groups()
            if name == "nv_inference_exec_count":
                key = "executions"
            elif name == "bastion_shared_state_round_trips_total":
                key = "trips:" + re.search(r'op="(\w+)"', labels).group(1)  # type: ignore[union-attr]
            else:
                continue
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def load(
    name: str, url: str, gateways: list[str], args: argparse.Namespace, pids: dict[str, list[int]]
) -> dict:
    """Warms up, then loads ``url``; ``pids``: the process trees whose CPU is metered, by role
    ("gateway", "services": PostgreSQL, Redis and HAProxy)."""
    probe = infer_probe(f"http://{url}")
    deadline = time.monotonic() + 120
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {url} does not answer")
        time.sleep(0.5)
    run_locust(f"http://{url}", args.users, 5, args.workdir / name / "warmup")
    before = scrape(gateways)
    cpu_before = {role: sum(procs.cpu_seconds(p) for p in roots) for role, roots in pids.items()}
    result = run_locust(f"http://{url}", args.users, args.duration, args.workdir / name)
    cpu = {
        role: sum(procs.cpu_seconds(p) for p in roots) - cpu_before[role]
        for role, roots in pids.items()
    }
    after = scrape(gateways)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    executions = max(delta.get("executions", 0.0), 1.0)
    return {
        "name": name,
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "failures": result.failures,
        "requests": result.all_requests,
        "executions": delta.get("executions", 0.0),
        "mean_batch": result.all_requests / executions,
        "trips_per_batch_request_path": delta.get("trips:rate_limit", 0.0) / executions,
        "trips_per_batch_defence": delta.get("trips:defence_send", 0.0) / executions,
        "gateway_cpu_ms_per_request": cpu.get("gateway", 0.0) * 1e3 / max(result.all_requests, 1),
        "services_cpu_ms_per_request": cpu.get("services", 0.0) * 1e3 / max(result.all_requests, 1),
    }


def run_sqlite(args: argparse.Namespace) -> dict:
    workdir = args.workdir / "sqlite"
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port_block(2)
    repository = bastion_repository(workdir, screening=True)
    command = [str(Path(sys.executable).with_name("bastion")), "serve", "--port", str(port)]
    command += ["--model-repository", str(repository)]
    env = {**SETTINGS, **procs.private_state(workdir), "BASTION_GRPC_PORT": str(port + 1)}
    server = procs.start("sqlite", command, env, f"http://127.0.0.1:{port}", workdir / "log")
    try:
        pids = {"gateway": [server.process.pid], "services": []}
        return load("sqlite", f"127.0.0.1:{port}", [f"127.0.0.1:{port}"], args, pids)
    finally:
        procs.stop(server)


def run_cluster(name: str, replicas: int, args: argparse.Namespace) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"bastion-bench-{name}-", dir="/tmp"))
    os.chmod(state, 0o755)  # PostgreSQL runs as its own user
    repository = bastion_repository(args.workdir / name, screening=True)
    settings = state / "cluster.env"
    values = {**SETTINGS, "BASTION_MODEL_REPOSITORY": str(repository)}
    settings.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env = {
        **os.environ,
        "BASTION_CLUSTER_DIR": str(state / "bed"),
        "BASTION_CLUSTER_REPLICAS": str(replicas),
        "BASTION_PYTHON": sys.executable,
        "BASTION_CLUSTER_ENV": str(settings),
    }
    started = subprocess.run(
        ["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=400
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"cluster.sh start failed:\n{started.stderr[-3000:]}")
        bed = state / "bed"
        gateways = [
            f"127.0.0.1:{(bed / f'replica-{n}' / 'port').read_text().strip()}"
            for n in range(1, replicas + 1)
        ]
        url = gateways[0] if replicas == 1 else (bed / "lb").read_text().strip()
        pids = {
            "gateway": [
                int((bed / f"replica-{n}" / "pid").read_text()) for n in range(1, replicas + 1)
            ],
            "services": [
                int((bed / "postgres" / "data" / "postmaster.pid").read_text().split()[0]),
                int((bed / "redis" / "pid").read_text()),
                int((bed / "haproxy" / "pid").read_text().split()[0]),
            ],
        }
        return load(name, url, gateways, args, pids)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def median_row(name: str, runs: list[dict]) -> dict:
    """A configuration's medians over its rounds (each number on its own)."""
    mine = [run for run in runs if run["name"] == name]
    numbers = [k for k, v in mine[0].items() if isinstance(v, int | float) and k != "round"]
    return {"name": name, "rounds": len(mine)} | {
        key: float(statistics.median(run[key] for run in mine)) for key in numbers
    }


def markdown(rows: list[dict], args: argparse.Namespace, commit: str) -> str:
    base = rows[0]["rps"]
    sets = "".join(f" --set {item}" for item in args.set)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# What sharing state costs",
        "",
        f"`python -m bastion.benchmarks.shared_state --duration {args.duration:g} --users "
        f"{args.users} --rounds {args.rounds}{sets}` at {commit}, {when}; medians of "
        f"{args.rounds} interleaved rounds; "
        "screening on (action flag), defence on, a rate limit checked on every request.",
        "",
        "| configuration | requests/s | vs sqlite [shared ≥ 0.90] | p50 ms | p99 ms | failures "
        "| mean batch | Redis round trips per batch: request path | defence stream "
        "| gateway CPU ms/request | PostgreSQL, Redis, HAProxy CPU ms/request |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['rps']:.0f} | {row['rps'] / base:.2f} | {row['p50_ms']:.1f} "
            f"| {row['p99_ms']:.1f} | {row['failures']:.0f} | {row['mean_batch']:.1f} "
            f"| {row['trips_per_batch_request_path']:.2f} | {row['trips_per_batch_defence']:.2f} "
            f"| {row['gateway_cpu_ms_per_request']:.2f} "
            f"| {row['services_cpu_ms_per_request']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--configurations", default="sqlite,shared,cluster")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs; medians")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="BASTION_NAME=VALUE",
        help="a setting for every configuration (repeatable), e.g. BASTION_LEDGER=false",
    )
    args = parser.parse_args()
    for item in args.set:
        name, _, value = item.partition("=")
        if not name.startswith("BASTION_"):
            parser.error(f"--set takes BASTION_NAME=VALUE, got {item!r}")
        SETTINGS[name] = value
    args.workdir = Path(tempfile.mkdtemp(prefix="bastion-shared-state-"))
    runners = {
        "sqlite": run_sqlite,
        "shared": lambda a: run_cluster("shared", 1, a),
        "cluster": lambda a: run_cluster("cluster", 3, a),
    }
    runs: list[dict] = []
    try:
        for round_ in range(args.rounds):  # interleaved: a noisy machine drifts between runs
            for name in args.configurations.split(","):
                runs.append(runners[name](args) | {"round": round_})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    rows = [median_row(name, runs) for name in args.configurations.split(",")]
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    text = markdown(rows, args, commit)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_state.md").write_text(text)
    (args.out / "shared_state.json").write_text(
        json.dumps({"commit": commit, "rows": rows, "runs": runs})
    )
    print(text)


if __name__ == "__main__":
    main()
