"""Bastion in front of a real Triton (PyTriton) against the same Triton alone.

Three arms, each started afresh and alone, in turn, ``--rounds`` times (this 2-core machine's
rate drifts by 20-40 % from one minute to the next, so ratios are taken within a round):

- ``pytriton``: PyTriton serving the digits weights, loaded directly;
- ``front``: the same PyTriton behind Bastion, whose ``digits`` is a remote Triton model
  (``backend: "triton"``, gRPC upstream) with screening off: what the gateway itself costs;
- ``front-screened``: the same with screening on (the bundled digits weights and calibration as
  the screening model, action ``flag`` so every request is answered and only the cost differs).

h2load holds ``--streams`` requests in flight over gRPC (HTTP/2, 4 connections) and then over
HTTP/1.1 against whichever server the clients would call. Each run reports requests/s, latency,
and the CPU per request of every server process (Bastion's and PyTriton's trees together for
the front arms), and checks that the server the clients call counted exactly the answers h2load
got. Answers are checked first through ``tritonclient.grpc`` against the bare model.

Run: ``python -m bastion.benchmarks.remote_triton [--duration 15] [--streams 64] [--rounds 3]``.
Needs h2load (``apt-get install nghttp2-client``) and PyTriton's environment
(``python -m bastion.benchmarks.peers`` builds it).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from bastion.benchmarks import procs
from bastion.benchmarks.h2load import grpc_infer_body, run_h2load
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.rounds import run_rounds, write_report
from bastion.benchmarks.serving import (
    COMMON_ENV,
    MODEL,
    bastion_repository,
    infer_probe,
    launch_bastion,
    launch_pytriton,
)
from bastion.benchmarks.serving_grpc import GRPC_HEADERS, check_grpc_answers, successes
from bastion.benchmarks.workload import REPO_ROOT, build_request, digit_images

ARMS = ("pytriton", "front", "front-screened")


def front_repository(workdir: Path, upstream_grpc: str, screened: bool) -> Path:
    """The bundled repository with ``digits`` moved to ``digits_local`` (screening on, action
    flag) and a remote ``digits`` in its place that forwards to the upstream."""
    repository = bastion_repository(workdir, screening=True)
    local = repository / "digits_local"
    shutil.move(repository / MODEL, local)
    config = local / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "digits"', 'name: "digits_local"'))
    remote = repository / MODEL
    (remote / "1").mkdir(parents=True)
    shutil.copy(local / "labels.txt", remote / "labels.txt")
    text = config.read_text()
    head = text[: text.index("instance_group")]  # tensors, batching: the same as the local
    head = head.replace('name: "digits_local"', 'name: "digits"')
    head = head.replace('backend: "pytorch"', 'backend: "triton"')
    params = {"upstream_url": f"grpc://{upstream_grpc}", "upstream_model": MODEL}
    if screened:
        params |= {"screening": "on", "screening_model": "digits_local"}
    lines = [
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    ]
    (remote / "config.pbtxt").write_text(head + "\n".join(lines) + "\n")
    return repository


def measure(
    servers: list[procs.Server],
    metrics_url: str,
    port: int,
    streams: int,
    http1: bool,
    args: argparse.Namespace,
    workdir: Path,
) -> dict:
    image = digit_images(1, seed=4)[0][0]
    if http1:
        body, headers = build_request(image)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
    else:
        body, headers = grpc_infer_body(image, MODEL), GRPC_HEADERS
        url = f"http://127.0.0.1:{port + 1}/inference.GRPCInferenceService/ModelInfer"
    ok_before = successes(metrics_url)
    cpu_before = {s.name: procs.cpu_seconds(s.process.pid) for s in servers}
    load = run_h2load(url, body, headers, streams, args.duration, workdir, http1)
    cpu = {s.name: procs.cpu_seconds(s.process.pid) - cpu_before[s.name] for s in servers}
    served = successes(metrics_url) - ok_before
    done = max(load.completed, 1)
    return load.as_dict() | {
        "server_successes": served,
        "all_answered_ok": load.completed <= served <= load.completed + streams
        and load.non_2xx == 0,
        "server_cpu_ms_per_request": sum(cpu.values()) * 1e3 / done,
        "cpu_ms_per_request_by_process": {k: v * 1e3 / done for k, v in cpu.items()},
        "client_cpu_ms_per_request": load.client_cpu_s * 1e3 / done,
    }


def bench_arm(name: str, args: argparse.Namespace) -> dict:
    procs.wait_quiet(args.quiet_wait)
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    up_port = procs.free_port_block(3)
    # the layout Bastion's own model runs in, so the answers are the same bits
    upstream = launch_pytriton(up_port, ["--channels-last"], workdir)
    record: dict = {"upstream_command": shlex.join(upstream.command), "version": upstream.version}
    running: list[procs.Server] = []
    try:
        up_url = f"http://127.0.0.1:{up_port}"
        server = procs.start(
            "pytriton",
            upstream.command,
            {**COMMON_ENV, **upstream.env},
            up_url,
            workdir / "pytriton.log",
        )
        running.append(server)
        record["upstream_startup_s"] = procs.wait_ready(
            server, infer_probe(up_url), args.ready_timeout
        )
        port, metrics_url = up_port, upstream.metrics_url
        if name != "pytriton":
            port = procs.free_port_block(3)
            launch = launch_bastion(port, [], workdir)
            repository = front_repository(
                workdir, f"127.0.0.1:{up_port + 1}", name == "front-screened"
            )
            command = [*launch.command[:-1], str(repository)]
            record["command"] = shlex.join(command)
            url = f"http://127.0.0.1:{port}"
            env = {**COMMON_ENV, **launch.env}
            if args.upstream_inflight:
                env["BASTION_UPSTREAM_MAX_INFLIGHT_BATCHES"] = str(args.upstream_inflight)
            bastion = procs.start("bastion", command, env, url, workdir / "bastion.log")
            running.append(bastion)
            record["startup_s"] = procs.wait_ready(bastion, infer_probe(url), args.ready_timeout)
            metrics_url = launch.metrics_url
        assert metrics_url is not None
        record["check"] = check_grpc_answers(f"127.0.0.1:{port + 1}")
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
        measure(running, metrics_url, port, max(args.streams), False, warm, workdir / "warm")
        record["runs"] = {
            f"{'http1' if http1 else 'grpc'}-{n}": measure(
                running,
                metrics_url,
                port,
                n,
                http1,
                args,
                workdir / f"{'http1' if http1 else 'grpc'}-{n}",
            )
            for n in args.streams
            for http1 in (False, True)
        }
    finally:
        for server in reversed(running):
            procs.stop(server)
    return record


def ratios(rounds: list[dict]) -> dict[str, list[float]]:
    """Each front arm's requests/s over PyTriton alone's, per round and protocol."""
    out: dict[str, list[float]] = {}
    for results in rounds:
        alone = results.get("pytriton", {}).get("runs", {})
        for arm in ARMS[1:]:
            for key, run in results.get(arm, {}).get("runs", {}).items():
                if key in alone:
                    label = f"{arm} / pytriton requests/s, {key.replace('-', ' at ')} in flight"
                    out.setdefault(label, []).append(run["rps"] / alone[key]["rps"])
    return out


def markdown(report: dict) -> str:
    lines = [
        "| round | arm | protocol | in flight | requests/s | p50 ms | p99 ms "
        "| CPU ms/req (all servers) | of it PyTriton | all answered OK |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, arms in enumerate(report["rounds"], 1):
        for name, record in arms.items():
            if "error" in record:
                lines.append(f"| {number} | {name} | error: {record['error'][:200]} ||||||||")
                continue
            for run in record["runs"].values():
                upstream_ms = run["cpu_ms_per_request_by_process"].get("pytriton", 0.0)
                lines.append(
                    f"| {number} | {name} | {run['protocol']} | {run['streams']} | "
                    f"{run['rps']:,.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                    f"{run['server_cpu_ms_per_request']:.3f} | {upstream_ms:.3f} | "
                    f"{run['all_answered_ok']} |"
                )
    for key, values in (report.get("ratios") or {}).items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"\n{key}: median **{float(np.median(values)):.2f}** (rounds: {rounds})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per run")
    parser.add_argument("--streams", default="64", help="comma-separated requests in flight")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--quiet-wait", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--upstream-inflight", type=int, default=0, help="batches in flight upstream (0: default)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.out = args.out.resolve()
    args.workdir = args.out / "tmp" / "remote_triton"
    rounds = run_rounds(
        "remote_triton", args.arms.split(","), args.rounds, lambda name: bench_arm(name, args)
    )
    report = {
        "machine": describe_machine(),
        "command": shlex.join(
            ["python", "-m", "bastion.benchmarks.remote_triton", *(argv or sys.argv[1:])]
        ),
        "settings": {"duration_s": args.duration, "streams": args.streams, "rounds": args.rounds},
        "rounds": rounds,
        "ratios": ratios(rounds),
    }
    return write_report(args.out, "remote_triton", report, markdown)


if __name__ == "__main__":
    sys.exit(main())
