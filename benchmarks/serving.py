"""Bastion, a plain FastAPI endpoint and PyTriton under the same locust load, one after another.

Each server gets the same weights, one torch thread and a fresh port on 127.0.0.1; it is checked
with the real ``tritonclient`` (answers must match the bare model), warmed up, then loaded by
closed-loop users at each user count for a bounded time while the CPU time of its whole process
tree is metered. Servers run in turn, never together, so each has the machine to itself (bar the
load generator, whose CPU cost is reported too). Everything started is stopped, also on errors.

Run: ``python -m bastion.benchmarks.serving [--duration 20] [--users 16,64]
[--servers bastion,plain,pytriton] [--out benchmarks/results]``. ``--servers
bastion,bastion-baseline --baseline-ref REF`` also serves Bastion as it was at git REF (from a
worktree), to measure a change against the code before it in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bastion.benchmarks import procs
from bastion.benchmarks.loadgen import run_locust
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.peers import ensure_pytriton_venv, installed_version, pytriton_env
from bastion.benchmarks.report import markdown_report, summarize
from bastion.benchmarks.workload import REPO_ROOT, build_request, digit_images, load_served

SERVERS = ("bastion", "bastion-screened", "plain", "pytriton")
MODEL = "digits"
COMMON_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Launch:
    """How to start one server, and where its Triton-style metrics are (if it has any)."""

    command: list[str]
    env: dict[str, str]
    metrics_url: str | None
    version: str


def _sibling(executable: str) -> str:
    return str(Path(sys.executable).with_name(executable))


def bastion_repository(workdir: Path, screening: bool) -> Path:
    """A copy of the bundled repository with digits screening off, or on with action ``flag``.

    ``flag`` pays for every detector in the batch yet answers every request with its prediction,
    so screened and unscreened runs serve the same responses and only the screening cost differs.
    """
    target = workdir / "repository"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(REPO_ROOT / "models" / "repository", target)
    config = target / MODEL / "config.pbtxt"
    text = config.read_text().replace('string_value: "block"', 'string_value: "flag"')
    if not screening:
        text = text.replace(
            'key: "screening" value: { string_value: "on" }',
            'key: "screening" value: { string_value: "off" }',
        )
    config.write_text(text)
    return target


def launch_bastion(
    port: int,
    layout_flags: list[str],
    workdir: Path,
    screening: bool = False,
    drift: bool = True,
    ledger: bool = True,
) -> Launch:
    """Bastion picks its own layout (channels_last); ``layout_flags`` are for the peers."""
    repository = bastion_repository(workdir, screening)
    command = [_sibling("bastion"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-repository", str(repository)]
    env = {"BASTION_TORCH_THREADS": "1", **procs.private_state(workdir)}
    env["BASTION_GRPC_PORT"] = str(port + 1)  # Triton's layout: HTTP, gRPC, metrics
    env["BASTION_DRIFT"] = "true" if drift else "false"
    env["BASTION_LEDGER"] = "true" if ledger else "false"
    return Launch(command, env, f"http://127.0.0.1:{port}/metrics", "checkout")


def launch_bastion_without_drift(port: int, layout_flags: list[str], workdir: Path) -> Launch:
    """The cost of drift monitoring: the same server with its monitor off."""
    return launch_bastion(port, layout_flags, workdir, drift=False)


def launch_bastion_without_ledger(port: int, layout_flags: list[str], workdir: Path) -> Launch:
    """The cost of the served-prediction ledger: the same server writing none."""
    return launch_bastion(port, layout_flags, workdir, ledger=False)


def launch_bastion_at(port: int, layout_flags: list[str], workdir: Path, ref: str) -> Launch:
    """Bastion as it was at git ``ref``, from a worktree of this checkout (same settings)."""
    source = workdir / "source"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(source)],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(source), ref],
        capture_output=True,
        check=True,
    )
    launch = launch_bastion(port, layout_flags, workdir)
    command = [sys.executable, "-m", "bastion.gateway", *launch.command[1:]]
    env = {**launch.env, "PYTHONPATH": f"{source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Launch(command, env, launch.metrics_url, f"bastion at {commit}")


def launch_bastion_screened(port: int, layout_flags: list[str], workdir: Path) -> Launch:
    return launch_bastion(port, layout_flags, workdir, screening=True)


def launch_plain(port: int, layout_flags: list[str], workdir: Path) -> Launch:
    command = [
        sys.executable,
        "-m",
        "bastion.benchmarks.plain_server",
        "--port",
        str(port),
        *layout_flags,
    ]
    return Launch(command, {}, None, "benchmarks/plain_server.py")


def launch_pytriton(port: int, layout_flags: list[str], workdir: Path) -> Launch:
    python = ensure_pytriton_venv()
    command = [str(python), "benchmarks/pytriton_server.py", "--http-port", str(port)]
    command += layout_flags
    version = f"nvidia-pytriton {installed_version(python, 'nvidia-pytriton')}"
    return Launch(command, pytriton_env(python), f"http://127.0.0.1:{port + 2}/metrics", version)


LAUNCHERS: dict[str, Callable[[int, list[str], Path], Launch]] = {
    "bastion": launch_bastion,
    "bastion-screened": launch_bastion_screened,
    "plain": launch_plain,
    "pytriton": launch_pytriton,
    "bastion-nodrift": launch_bastion_without_drift,
    "bastion-noledger": launch_bastion_without_ledger,
}


def infer_probe(url: str) -> Callable[[], bool]:
    """Ready means ready *and* answering an inference (Triton reports ready before its model)."""
    images, _ = digit_images(1)
    body, headers = build_request(images[0])
    infer_url = f"{url}/v2/models/{MODEL}/infer"

    def probe() -> bool:
        return procs.http_ok(f"{url}/v2/health/ready") and procs.http_ok(
            infer_url, 5, body, headers
        )

    return probe


def check_answers(url: str, count: int = 100) -> dict[str, float | int | None]:
    """Sends test digits one by one through ``tritonclient`` and compares with the bare model."""
    import torch
    import tritonclient.http as triton_http

    images, labels = digit_images(count, seed=2)
    model, _ = load_served()
    with torch.inference_mode():
        expected = model(torch.from_numpy(images))[1].numpy()
    client = triton_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=10)
    try:
        answers = []
        for image in images:
            tensor = triton_http.InferInput("images", [1, *image.shape], "FP32")
            tensor.set_data_from_numpy(image[np.newaxis])
            answers.append(client.infer(MODEL, [tensor]).as_numpy("probabilities")[0])
    finally:
        client.close()
    got = np.stack(answers)
    return {
        "requests": count,
        "max_abs_diff_vs_bare_model": float(np.abs(got - expected).max()),
        "agreement_with_bare_model": float(np.mean(got.argmax(1) == expected.argmax(1))),
        "accuracy": None if labels is None else float(np.mean(got.argmax(1) == labels)),
    }


METRIC_LINE = re.compile(
    r'^(nv_inference_count|nv_inference_exec_count)\{[^}]*model="digits"[^}]*\}'
)


def scrape_batching(metrics_url: str | None) -> dict[str, float] | None:
    """Triton's inference and execution counters, whose ratio is the mean batch size."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if match := METRIC_LINE.match(line):
            counters[match.group(1)] = counters.get(match.group(1), 0.0) + float(line.split()[-1])
    return counters if len(counters) == 2 else None


def mean_batch(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    if before is None or after is None:
        return None
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    return inferences / executions if executions > 0 else None


def measure(server: procs.Server, launch: Launch, users: int, args: argparse.Namespace) -> dict:
    """One load level: client-side numbers plus the server tree's CPU and its mean batch."""
    root = server.process.pid
    batch_before = scrape_batching(launch.metrics_url)
    busy_before, cpu_before = procs.system_busy_seconds(), procs.cpu_seconds(root)
    load = run_locust(server.url, users, args.duration, args.workdir / server.name)
    busy_after, cpu_after = procs.system_busy_seconds(), procs.cpu_seconds(root)
    batch_after = scrape_batching(launch.metrics_url)
    server_cpu_s = cpu_after - cpu_before
    others_s = busy_after - busy_before - server_cpu_s - load.client_cpu_s
    served = max(load.all_requests, 1)
    return load.as_dict() | {
        "server_cpu_ms_per_request": server_cpu_s * 1e3 / served,
        "client_cpu_ms_per_request": load.client_cpu_s * 1e3 / served,
        "server_cpu_cores": server_cpu_s / load.wall_s,
        "other_cpu_cores": max(others_s, 0.0) / load.wall_s,
        "mean_batch": mean_batch(batch_before, batch_after),
    }


def bench_server(name: str, args: argparse.Namespace) -> dict:
    """Starts one server, checks, warms and loads it at every user count, and always stops it."""
    background = procs.wait_quiet(args.quiet_wait)
    port = procs.free_port_block(3)
    (args.workdir / name).mkdir(parents=True, exist_ok=True)
    launch = LAUNCHERS[name](
        port,
        ["--channels-last"] if args.peer_layout == "channels_last" else [],
        args.workdir / name,
    )
    url = f"http://127.0.0.1:{port}"
    env = {**COMMON_ENV, **launch.env}
    record: dict = {"command": shlex.join(launch.command), "env": env, "version": launch.version}
    record["background_cores_at_start"] = background
    probe = infer_probe(url)
    server = procs.start(name, launch.command, env, url, args.workdir / name / "server.log")
    try:
        record["startup_s"] = procs.wait_ready(server, probe, args.ready_timeout)
        record["check"] = check_answers(url)
        run_locust(url, max(args.users), args.warmup, args.workdir / name / "warmup")
        record["runs"] = {str(users): measure(server, launch, users, args) for users in args.users}
    finally:
        procs.stop(server)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per user count")
    parser.add_argument("--users", default="16,64", help="comma-separated user counts")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated servers")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of unrecorded load")
    parser.add_argument("--ready-timeout", type=float, default=180, help="seconds to get ready")
    parser.add_argument(
        "--peer-layout",
        choices=("nchw", "channels_last"),
        default="nchw",
        help="the peers' memory layout: NCHW as a team would write them, or Bastion's NHWC",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="seconds to wait for other load to pass"
    )
    parser.add_argument(
        "--baseline-ref", help="git ref that server 'bastion-baseline' is served from"
    )
    args = parser.parse_args(argv)
    if args.baseline_ref:
        LAUNCHERS["bastion-baseline"] = lambda port, flags, workdir: launch_bastion_at(
            port, flags, workdir, args.baseline_ref
        )
    args.users = [int(users) for users in args.users.split(",")]
    args.servers = [name.strip() for name in args.servers.split(",")]
    unknown = set(args.servers) - set(LAUNCHERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; known: {list(LAUNCHERS)}")
    args.out = args.out.resolve()
    args.workdir = args.out / "tmp"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict] = {}
    for name in args.servers:
        print(f"serving: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = bench_server(name, args)
        except Exception as error:  # one broken server must not cost the others their numbers
            results[name] = {"error": f"{type(error).__name__}: {error}"[:4000]}
            print(f"serving: {name} failed: {results[name]['error']}", file=sys.stderr)
    report = {
        "machine": describe_machine(),
        "settings": {
            "duration_s": args.duration,
            "users": args.users,
            "warmup_s": args.warmup,
            "peer_layout": args.peer_layout,
        },
        "command": shlex.join(
            ["python", "-m", "bastion.benchmarks.serving", *(argv or sys.argv[1:])]
        ),
        "servers": results,
        "summary": summarize(results, args.users),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serving" if args.peer_layout == "nchw" else f"serving_peers_{args.peer_layout}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown_report(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 1 if any("error" in record for record in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
