"""Bastion's gRPC port beside its HTTP port and beside PyTriton's (a real Triton) gRPC port.

Each server is started alone with the same weights and one torch thread (the launchers of
``benchmarks.serving``), checked through the unchanged ``tritonclient.grpc`` against the bare
model, warmed up, then held at ``--streams`` requests in flight by h2load, first over gRPC
(HTTP/2, 4 connections) and then over HTTP/1.1 (one connection per request in flight). Every
run reports requests/s, p50/p90/p99 latency, the server tree's CPU per request, and whether the
server's own success counter grew by exactly the requests h2load completed (h2load cannot read
gRPC trailers, so this is how a failed answer would show).

This 2-core machine's rate varies by 20-40 % from one minute to the next, so ``--rounds N``
runs the servers in turn N times (each alone, started afresh) and reports every round's ratio
and their median.

Run: ``python -m bastion.benchmarks.serving_grpc [--duration 20] [--streams 64]
[--servers bastion,pytriton] [--rounds 3]``. Needs h2load (``apt-get install nghttp2-client``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import urllib.request
from pathlib import Path

import numpy as np

from bastion.benchmarks import procs
from bastion.benchmarks.h2load import grpc_infer_body, run_h2load
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.rounds import run_rounds, write_report
from bastion.benchmarks.serving import COMMON_ENV, LAUNCHERS, MODEL, Launch, infer_probe
from bastion.benchmarks.workload import REPO_ROOT, build_request, digit_images, load_served

GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
_SUCCESS = re.compile(r'^nv_inference_request_success\{[^}]*model="digits"[^}]*\}\s+(\S+)')


def successes(metrics_url: str) -> float:
    """The server's count of successful digits requests (Triton's counter)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for line in text.splitlines() if (m := _SUCCESS.match(line)))


def check_grpc_answers(grpc_url: str, count: int = 50) -> dict[str, float]:
    """Digits one by one through ``tritonclient.grpc``, compared with the bare model."""
    import torch
    import tritonclient.grpc as tg

    images, _ = digit_images(count, seed=3)
    model, _ = load_served()
    with torch.inference_mode():
        expected = model(torch.from_numpy(images))[1].numpy()
    client = tg.InferenceServerClient(grpc_url)
    try:
        got = []
        for image in images:
            tensor = tg.InferInput("images", [1, *image.shape], "FP32")
            tensor.set_data_from_numpy(image[np.newaxis])
            got.append(client.infer(MODEL, [tensor]).as_numpy("probabilities")[0])
    finally:
        client.close()
    answers = np.stack(got)
    return {
        "requests": count,
        "max_abs_diff_vs_bare_model": float(np.abs(answers - expected).max()),
        "agreement_with_bare_model": float(np.mean(answers.argmax(1) == expected.argmax(1))),
    }


def measure(
    server: procs.Server,
    launch: Launch,
    port: int,
    streams: int,
    http1: bool,
    args: argparse.Namespace,
) -> dict:
    image = digit_images(1, seed=4)[0][0]
    if http1:
        body, headers = build_request(image)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
    else:
        body, headers = grpc_infer_body(image, MODEL), GRPC_HEADERS
        url = f"http://127.0.0.1:{port + 1}/inference.GRPCInferenceService/ModelInfer"
    assert launch.metrics_url is not None
    workdir = args.workdir / server.name / ("http1" if http1 else "grpc")
    ok_before, cpu_before = successes(launch.metrics_url), procs.cpu_seconds(server.process.pid)
    load = run_h2load(url, body, headers, streams, args.duration, workdir, http1)
    cpu_s = procs.cpu_seconds(server.process.pid) - cpu_before
    served = successes(launch.metrics_url) - ok_before
    return load.as_dict() | {
        "server_successes": served,
        # requests still in flight when h2load stops are answered but not counted by it
        "all_answered_ok": load.completed <= served <= load.completed + streams
        and load.non_2xx == 0,
        "server_cpu_ms_per_request": cpu_s * 1e3 / max(load.completed, 1),
        "client_cpu_ms_per_request": load.client_cpu_s * 1e3 / max(load.completed, 1),
    }


def bench_server(name: str, args: argparse.Namespace) -> dict:
    procs.wait_quiet(args.quiet_wait)
    port = procs.free_port_block(3)
    (args.workdir / name).mkdir(parents=True, exist_ok=True)
    launch = LAUNCHERS[name](port, [], args.workdir / name)
    url = f"http://127.0.0.1:{port}"
    env = {**COMMON_ENV, **launch.env}
    record: dict = {"command": shlex.join(launch.command), "version": launch.version}
    server = procs.start(name, launch.command, env, url, args.workdir / name / "server.log")
    try:
        record["startup_s"] = procs.wait_ready(server, infer_probe(url), args.ready_timeout)
        record["check"] = check_grpc_answers(f"127.0.0.1:{port + 1}")
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
        measure(server, launch, port, max(args.streams), False, warm)
        record["runs"] = {
            f"{'http1' if http1 else 'grpc'}-{streams}": measure(
                server, launch, port, streams, http1, args
            )
            for streams in args.streams
            for http1 in (False, True)
        }
    finally:
        procs.stop(server)
    return record


def markdown(report: dict) -> str:
    lines = [
        "| round | server | protocol | in flight | requests/s | p50 ms | p99 ms "
        "| server CPU ms/req | all answered OK |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for number, servers in enumerate(report["rounds"], 1):
        for name, record in servers.items():
            if "error" in record:
                lines.append(f"| {number} | {name} | error: {record['error'][:200]} |||||||")
                continue
            for run in record["runs"].values():
                lines.append(
                    f"| {number} | {name} | {run['protocol']} | {run['streams']} | "
                    f"{run['rps']:,.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                    f"{run['server_cpu_ms_per_request']:.3f} | {run['all_answered_ok']} |"
                )
    for key, values in (report.get("ratios") or {}).items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"\n{key}: median **{float(np.median(values)):.2f}** (rounds: {rounds})")
    return "\n".join(lines) + "\n"


def ratios(rounds: list[dict], streams: list[int]) -> dict[str, list[float]]:
    """Bastion's gRPC over PyTriton's, per round (each round's servers ran minutes apart)."""
    out: dict[str, list[float]] = {}
    for results in rounds:
        bastion, triton = results.get("bastion", {}), results.get("pytriton", {})
        for n in streams:
            key = f"grpc-{n}"
            if key in bastion.get("runs", {}) and key in triton.get("runs", {}):
                b, t = bastion["runs"][key], triton["runs"][key]
                rate = f"Bastion gRPC / PyTriton gRPC requests/s at {n} in flight"
                tail = f"Bastion gRPC / PyTriton gRPC p99 at {n} in flight"
                out.setdefault(rate, []).append(b["rps"] / t["rps"])
                out.setdefault(tail, []).append(b["p99_ms"] / t["p99_ms"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per run")
    parser.add_argument("--streams", default="64", help="comma-separated requests in flight")
    parser.add_argument("--servers", default="bastion,pytriton")
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--quiet-wait", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=1, help="the servers in turn, N times")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.out = args.out.resolve()
    args.workdir = args.out / "tmp" / "grpc"
    rounds = run_rounds(
        "serving_grpc", args.servers.split(","), args.rounds, lambda n: bench_server(n, args)
    )
    report = {
        "machine": describe_machine(),
        "command": shlex.join(
            ["python", "-m", "bastion.benchmarks.serving_grpc", *(argv or sys.argv[1:])]
        ),
        "settings": {"duration_s": args.duration, "streams": args.streams, "rounds": args.rounds},
        "rounds": rounds,
        "ratios": ratios(rounds, args.streams),
    }
    return write_report(args.out, "serving_grpc", report, markdown)


if __name__ == "__main__":
    sys.exit(main())
