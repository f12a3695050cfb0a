"""Abuse: does the gateway stay live for everyone else while it is attacked?

One real gateway on 127.0.0.1 (a fresh port, a temporary quarantine store, an admin token, one
torch thread, every front-door limit at its default) is watched through three phases:

- **calm**: a health prober (``/v2/health/live`` at 20 Hz over a kept-alive connection, and at
  5 Hz over fresh ones) and one clean client (real test digits at a steady rate);
- **attack**: the same, plus 8 attacker processes, each holding 25 slowloris connections that
  trickle a request head a byte a second, and each sending one kind of hostile request at a
  steady rate: 65 KB PNGs claiming 4096x4096, 64 MB bodies of 16 M empty BYTES elements, gzip
  bodies that inflate past (or just under) the 64 MiB body limit, a 16 MiB header and 20,000
  headers (``benchmarks.hostile``);
- **recovery**: the prober and the clean client alone again;
- then (``--per-kind``, default 15 s) each attack alone, with the same attacker count (and the
  slowloris connections alone, from all eight), each followed by a short recovery, so that a
  failed target can be traced to the attack that breaks it.

The attackers run at nice 10: on a real network they would be other machines, and here they
share two cores with the gateway and the observers. The CPU time of everything else on the
machine is recorded per phase (``other_cpu_cores``), as the serving benchmark does. An opt-in
``json_strings`` attack (a 16 MiB JSON of 5.6 M empty strings) is not in the default mix.

Every attack must be answered 400/408/413/431 or 503, never another 5xx and never a hang
(client timeouts; a slowloris connection still open 5 s past the head timeout is a hang).
Target: health p99 ≤ 50 ms during the attack, no 5xx but 503, no hangs. Bounded in time; the
gateway and every client process are stopped on exit, errors included.

Run: ``python -m bastion.benchmarks.abuse [--duration 30] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bastion.benchmarks import abuse_clients, procs
from bastion.benchmarks.abuse_report import Phase, markdown, summarize
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.workload import REPO_ROOT

HOST = "127.0.0.1"
ADMIN_TOKEN = "abuse-benchmark"
SERVER_ENV = {
    "BASTION_TORCH_THREADS": "1",
    "BASTION_ADMIN_TOKEN": ADMIN_TOKEN,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
HEAD_TIMEOUT_S = 10.0  # the gateway's default http_header_timeout_s
# eight attackers: every request attack twice (gzip bombs and header floods alternate variants)
DEFAULT_ATTACKERS = ",".join(kind for kind in abuse_clients.ATTACKS for _ in range(2))


@contextlib.contextmanager
def gateway(workdir: Path) -> Iterator[procs.Server]:
    """A real ``bastion serve`` on a fresh port; stopped on exit, also on errors."""
    port = procs.free_port_block(1)
    env = {**SERVER_ENV, **procs.private_state(workdir)}
    command = [
        sys.executable,
        "-m",
        "bastion.gateway",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    url = f"http://{HOST}:{port}"
    server = procs.start("bastion", command, env, url, workdir / "server.log")
    try:
        procs.wait_ready(server, lambda: procs.http_ok(f"{url}/v2/health/ready"), 120)
        yield server
    finally:
        procs.stop(server)


@contextlib.contextmanager
def processes(ctx: Any, targets: list[tuple[Any, tuple[Any, ...]]]) -> Iterator[list[Any]]:
    """Started client processes; any still alive on exit are terminated, then killed."""
    started = [ctx.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    try:
        for process in started:
            process.start()
        yield started
    finally:
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def collect(queue: Any, count: int, timeout_s: float) -> list[tuple[str, Any]]:
    """``count`` results from the client processes (fewer if some never report)."""
    results, deadline = [], time.monotonic() + timeout_s
    while len(results) < count and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            results.append(queue.get(timeout=max(deadline - time.monotonic(), 0.1)))
    return results


def rejected_counts(url: str) -> dict[str, float]:
    """``bastion_http_rejected_total`` by reason: the gateway's own count of refusals."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    counts = {}
    for line in text.splitlines():
        if line.startswith("bastion_http_rejected_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """Attack phases: (name, one attack kind per attacker, slowloris connections each)."""
    phases = [("attack", args.attackers, args.slowloris)]
    if args.per_kind > 0:
        for kind in dict.fromkeys(k for k in args.attackers if k != "slowloris"):
            phases.append((f"{kind} alone", [kind] * args.attackers.count(kind), 0))
        if args.slowloris:
            phases.append(("slowloris alone", ["slowloris"] * len(args.attackers), args.slowloris))
    return phases


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Calm, the mixed attack, recovery, then (``--per-kind``) each attack alone; returns the
    samples, the phase windows, the attack outcomes and the gateway's refusal counters."""
    ctx = mp.get_context("spawn")
    results, stop_watch = ctx.Queue(), ctx.Event()
    phases: list[Phase] = []
    cpu: dict[str, float] = {}
    other_cpu: dict[str, float] = {}
    attacks: dict[str, list[dict[str, Any]]] = {}
    background = procs.wait_quiet(args.quiet_wait)
    own = os.getpid()
    with gateway(workdir) as server:
        port, root = int(server.url.rsplit(":", 1)[1]), server.process.pid

        def phase(name: str, seconds: float) -> None:
            server_before, ours_before = procs.cpu_seconds(root), procs.cpu_seconds(own)
            busy_before, started = procs.system_busy_seconds(), time.monotonic()
            time.sleep(seconds)
            ended = time.monotonic()
            phases.append(Phase(name, started, ended))
            server_s = procs.cpu_seconds(root) - server_before
            ours_s = procs.cpu_seconds(own) - ours_before - server_s  # the gateway is ours too
            others_s = procs.system_busy_seconds() - busy_before - server_s - ours_s
            cpu[name] = server_s / (ended - started)
            other_cpu[name] = max(others_s, 0.0) / (ended - started)

        def attack(name: str, kinds: list[str], slowloris: int, seconds: float) -> None:
            settings = {
                "rate_hz": args.attack_rate,
                "timeout_s": args.attack_timeout,
                "slowloris": slowloris,
                "trickle_s": 1.0,
                "slowloris_hang_s": HEAD_TIMEOUT_S + 5.0,
                "nice": args.attacker_nice,
            }
            ready, go, stop, reports = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
            targets = [
                (abuse_clients.attacker, (kind, HOST, port, settings, ready, go, stop, reports))
                for kind in kinds
            ]
            with processes(ctx, targets):
                if len(collect(ready, len(targets), 180)) < len(targets):
                    raise RuntimeError(f"{name}: attackers not ready in 180 s")
                go.set()
                time.sleep(1.0)  # connections opened, first requests under way
                phase(name, seconds)
                stop.set()
                wait_s = args.attack_timeout + settings["slowloris_hang_s"] + 10
                attacks[name] = [report for _, report in collect(reports, len(targets), wait_s)]

        watching = ctx.Queue()
        watchers = [
            (fn, (HOST, port, rate, timeout_s, watching, stop_watch, results))
            for fn, rate, timeout_s in (
                (abuse_clients.probe_health, args.health_hz, 5.0),
                (abuse_clients.clean_client, args.clean_rate, 10.0),
            )
        ]
        with processes(ctx, watchers):
            if len(collect(watching, len(watchers), 120)) < len(watchers):
                raise RuntimeError("the prober and the clean client did not start in 120 s")
            time.sleep(args.warmup)
            phase("calm", args.duration)
            for index, (name, kinds, slowloris) in enumerate(plan(args)):
                seconds = args.duration if index == 0 else args.per_kind
                attack(name, kinds, slowloris, seconds)
                time.sleep(1.0)
                if index == 0:
                    phase("recovery", args.recovery)
                else:
                    phase(f"after {name}", min(args.recovery, 5.0))
            stop_watch.set()
            reports = collect(results, len(watchers), 60)
        rejected = rejected_counts(server.url)
    return {
        "phases": phases,
        "server_cpu_cores": cpu,
        "other_cpu_cores": other_cpu,
        "background_cores_at_start": background,
        "reports": reports,
        "attacks": attacks,
        "rejected_total": rejected,
    }


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (gateway/ modified in the working tree)" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30, help="seconds of calm and attack")
    parser.add_argument("--recovery", type=float, default=10, help="seconds after each attack")
    parser.add_argument(
        "--per-kind",
        type=float,
        default=15,
        help="seconds of each attack alone after the mix (0: none)",
    )
    parser.add_argument("--warmup", type=float, default=3, help="unrecorded seconds first")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--health-hz", type=float, default=20, help="kept-alive probes per s")
    parser.add_argument("--clean-rate", type=float, default=20, help="clean requests per s")
    parser.add_argument(
        "--attackers",
        default=DEFAULT_ATTACKERS,
        help="one attack kind per attacker process, comma-separated; kinds: "
        + ", ".join(abuse_clients.ATTACKS + abuse_clients.EXTRA_ATTACKS),
    )
    parser.add_argument("--attack-rate", type=float, default=4, help="requests/s per attacker")
    parser.add_argument("--attack-timeout", type=float, default=20, help="client timeout, s")
    parser.add_argument("--slowloris", type=int, default=25, help="connections per attacker")
    parser.add_argument(
        "--attacker-nice", type=int, default=10, help="CPU niceness of the attacker processes"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60, help="seconds to wait for other load to pass"
    )
    parser.add_argument("--health-p99-ms", type=float, default=50, help="the target")
    args = parser.parse_args(argv)
    args.attackers = [kind.strip() for kind in args.attackers.split(",") if kind.strip()]
    known = set(abuse_clients.ATTACKS + abuse_clients.EXTRA_ATTACKS)
    if unknown := set(args.attackers) - known:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {sorted(known)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bastion-abuse-") as tmp:
        raw = run(args, Path(tmp))
    summary = summarize(raw, args.health_p99_ms)
    report = {
        "command": shlex.join(
            ["python", "-m", "bastion.benchmarks.abuse", *(argv or sys.argv[1:])]
        ),
        "commit": commit(),
        "machine": describe_machine(),
        "settings": {
            "duration_s": args.duration,
            "recovery_s": args.recovery,
            "per_kind_s": args.per_kind,
            "health_hz": args.health_hz,
            "clean_rate_hz": args.clean_rate,
            "attackers": args.attackers,
            "attack_rate_hz_per_attacker": args.attack_rate,
            "attack_timeout_s": args.attack_timeout,
            "slowloris_per_attacker": args.slowloris,
            "attacker_nice": args.attacker_nice,
            "server_env": SERVER_ENV | {"BASTION_ADMIN_TOKEN": "(set)"},
        },
        "background_cores_at_start": raw["background_cores_at_start"],
        **summary,
        "rejected_total": raw["rejected_total"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "abuse.md").write_text(text)
    print(text)
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
