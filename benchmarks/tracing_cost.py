"""What OpenTelemetry tracing costs: the same gateway without tracing and with it on at a
sampling ratio (default 10 %), exporting over OTLP/HTTP to a receiver in this process.

Each configuration is started afresh, checked, warmed up and held at ``--streams`` requests in
flight by h2load over HTTP/1.1 (one digit per request); the two run in interleaved rounds,
because this 2-core machine's rate moves by 20-40 % between minutes, and the report gives each
round's ratio and their median. The receiver decodes every export (OpenTelemetry's protobuf
messages) and counts the spans, so a run that exported nothing would show.

Run: ``python -m bastion.benchmarks.tracing_cost [--duration 20] [--streams 64] [--rounds 3]
[--ratio 0.1]``. Needs h2load (``apt-get install nghttp2-client``) and the ``otel`` extra.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from bastion.benchmarks import procs
from bastion.benchmarks.h2load import run_h2load
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.serving import COMMON_ENV, MODEL, infer_probe, launch_bastion
from bastion.benchmarks.workload import REPO_ROOT, build_request, digit_images


class SpanSink:
    """An OTLP/HTTP receiver on 127.0.0.1 that decodes each export and counts its spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        sink = self
        self.spans = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                count = sum(
                    len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
                )
                with sink.lock:
                    sink.spans += count
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_config(name: str, env: dict[str, str], args: argparse.Namespace, sink: SpanSink) -> dict:
    procs.wait_quiet(args.quiet_wait)
    port = procs.free_port_block(3)
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    launch = launch_bastion(port, [], workdir)
    url = f"http://127.0.0.1:{port}"
    server = procs.start(
        name, launch.command, {**COMMON_ENV, **launch.env, **env}, url, workdir / "server.log"
    )
    body, headers = build_request(digit_images(1, seed=4)[0][0])
    infer = f"{url}/v2/models/{MODEL}/infer"
    try:
        procs.wait_ready(server, infer_probe(url), args.ready_timeout)
        run_h2load(infer, body, headers, args.streams, args.warmup, workdir, http1=True)
        exporters = exporter_pids(server.process.pid)
        spans_before, cpu_before = sink.spans, procs.cpu_seconds(server.process.pid)
        exporter_before = sum(procs.cpu_seconds(pid) for pid in exporters)
        load = run_h2load(infer, body, headers, args.streams, args.duration, workdir, http1=True)
        cpu_s = procs.cpu_seconds(server.process.pid) - cpu_before
        exporter_s = sum(procs.cpu_seconds(pid) for pid in exporters) - exporter_before
    finally:
        procs.stop(server)  # its tracer exports what it still holds as it stops
    return load.as_dict() | {
        "spans_exported": sink.spans - spans_before,
        "server_cpu_ms_per_request": cpu_s * 1e3 / max(load.completed, 1),
        "exporter_cpu_ms_per_request": exporter_s * 1e3 / max(load.completed, 1),
    }


def exporter_pids(root: int) -> list[int]:
    """The gateway's trace exporter process (``trace_export``), if tracing is on."""
    found = []
    for pid in procs.tree_pids(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"trace_export" in command:
            found.append(pid)
    return found


def markdown(report: dict) -> str:
    lines = [
        "| round | tracing | requests/s | p50 ms | p99 ms | server CPU ms/req "
        "| of it the exporter | spans exported |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for number, runs in enumerate(report["rounds"], 1):
        for name, run in runs.items():
            lines.append(
                f"| {number} | {name} | {run['rps']:,.0f} | {run['p50_ms']:.1f} | "
                f"{run['p99_ms']:.1f} | {run['server_cpu_ms_per_request']:.3f} | "
                f"{run.get('exporter_cpu_ms_per_request', 0.0):.3f} | {run['spans_exported']:,} |"
            )
    values = report["ratios"]
    rounds = ", ".join(f"{v:.3f}" for v in values)
    lines.append(
        f"\ntraced / untraced requests/s at {report['settings']['ratio']:.0%} sampling: median "
        f"**{float(np.median(values)):.3f}** (rounds: {rounds})"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per run")
    parser.add_argument("--streams", type=int, default=64, help="requests in flight")
    parser.add_argument("--ratio", type=float, default=0.1, help="the traced run's sampling")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--quiet-wait", type=float, default=60)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.workdir = args.out / "tmp" / "tracing"
    sink = SpanSink()
    configs = {
        "off": {},
        "on": {
            "BASTION_OTEL_ENDPOINT": sink.url,
            "BASTION_OTEL_SAMPLING_RATIO": str(args.ratio),
        },
    }
    rounds: list[dict[str, dict]] = []
    try:
        for number in range(1, args.rounds + 1):
            runs = {}
            for name, env in configs.items():
                print(f"tracing_cost: round {number}: {name} ...", file=sys.stderr, flush=True)
                runs[name] = run_config(name, env, args, sink)
            rounds.append(runs)
    finally:
        sink.close()
    report = {
        "machine": describe_machine(),
        "command": shlex.join(
            ["python", "-m", "bastion.benchmarks.tracing_cost", *(argv or sys.argv[1:])]
        ),
        "settings": {
            "duration_s": args.duration,
            "streams": args.streams,
            "ratio": args.ratio,
            "rounds": args.rounds,
        },
        "rounds": rounds,
        "ratios": [runs["on"]["rps"] / runs["off"]["rps"] for runs in rounds],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing_cost.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "tracing_cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
