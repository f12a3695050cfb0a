"""Schemathesis against a live gateway, with and without the admin token: no 5xx, no hang.

Starts ``bastion serve`` on a free port, fetches the public OpenAPI document (``/openapi.json``)
and the admin one (``/v2/admin/openapi.json``), narrows each ``{model}`` path parameter to the
repository's real model names (so generated requests reach validation instead of a 404), and
runs ``schemathesis run`` on each for half of ``--duration``: anonymously on the public
document, with ``Authorization: Bearer <admin token>`` on the admin one. Checks: no server
error, only documented statuses and content types, every response within
``--max-response-time`` (a hang). The gateway's own ``bastion_request_errors_total`` counts
confirm the 5xx count from the server's side.

Run: ``python -m bastion.benchmarks.fuzz [--duration 600] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bastion.benchmarks import procs
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.workload import REPO_ROOT

TOKEN = "fuzz-admin-token"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance"
# schemathesis 4's coverage phase fails inside its own schema compiler on these documents
# ("Inconsistent results"/"AST constructor recursion"); the other phases run in full.
PHASES = "examples,fuzzing,stateful"


def _get(url: str, token: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def narrowed(document: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """The document with every ``model`` path parameter limited to the served models."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "model":
                    parameter["schema"] = {"type": "string", "enum": models}
    return document


def server_errors(metrics_text: str) -> int:
    """5xx answers the gateway counted (``bastion_request_errors_total{status="5.."}``)."""
    total = 0.0
    for match in re.finditer(
        r'^bastion_request_errors_total\{status="(5\d\d)"\} ([0-9.e+]+)$', metrics_text, re.M
    ):
        total += float(match.group(2))
    return int(total)


def parse_summary(output: str) -> dict[str, Any]:
    """Counts from schemathesis' summary: generated, passed, failures by kind, errors."""
    cases = re.search(r"(\d+) generated, (.*)", output)
    counts = {"generated": int(cases.group(1)) if cases else 0}
    if cases:
        for number, word in re.findall(r"(\d+) (\w+)", cases.group(2)):
            counts[word] = int(number)
    failures = dict(re.findall(r"❌ (.+?): (\d+)\s*$", output, re.M))
    errors = re.findall(r"🚫 (.+?): (\d+)\s*$", output, re.M)
    return {
        "cases": counts,
        "failures": {k: int(v) for k, v in failures.items()},
        "errors": {k: int(v) for k, v in errors},
    }


def run_schemathesis(
    document: Path, url: str, seconds: float, token: str | None, max_response_s: float, log: Path
) -> tuple[dict[str, Any], list[str]]:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        str(document),
        "--url",
        url,
        "--max-time",
        str(int(seconds)),
        "--workers",
        "2",
        "--phases",
        PHASES,
        "--checks",
        CHECKS,
        "--max-response-time",
        str(max_response_s),
        "--exclude-path-regex",
        "/unload$",  # keep the models loaded, so the rest of the run reaches them
    ]
    if token:
        command += ["--header", f"Authorization: Bearer {token}"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 300, check=False
    )
    log.write_text(result.stdout + result.stderr)
    summary = parse_summary(result.stdout)
    summary["exit_code"] = result.returncode
    return summary, command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds in all (two runs)")
    parser.add_argument("--max-response-time", type=float, default=10, help="a hang, in s")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bastion-fuzz-"))
    port = procs.free_port_block(1)
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("bastion")), "serve", "--port", str(port)]
    env = {
        "BASTION_ADMIN_TOKEN": TOKEN,
        "BASTION_TORCH_THREADS": "1",
        **procs.private_state(workdir),  # the admin run may create keys
        "OMP_NUM_THREADS": "1",
    }
    server = procs.start("bastion", command, env, url, workdir / "server.log")
    runs: dict[str, Any] = {}
    try:
        procs.wait_ready(server, lambda: procs.http_ok(f"{url}/v2/health/ready"), 180)
        models = sorted({e["name"] for e in json.loads(_post_index(url))})
        documents = {
            "public": (json.loads(_get(f"{url}/openapi.json")), None),
            "admin": (json.loads(_get(f"{url}/v2/admin/openapi.json", TOKEN)), TOKEN),
        }
        for name, (document, token) in documents.items():
            path = workdir / f"{name}.json"
            path.write_text(json.dumps(narrowed(document, models)))
            before = server_errors(_get(f"{url}/metrics").decode())
            started = time.monotonic()
            summary, cmd = run_schemathesis(
                path,
                url,
                args.duration / 2,
                token,
                args.max_response_time,
                workdir / f"{name}.log",
            )
            summary["wall_s"] = round(time.monotonic() - started, 1)
            summary["server_5xx"] = server_errors(_get(f"{url}/metrics").decode()) - before
            summary["operations"] = sum(len(ops) for ops in document["paths"].values())
            summary["command"] = shlex.join(cmd).replace(TOKEN, "<admin token>")
            runs[name] = summary
        log_text = (workdir / "server.log").read_text(errors="replace")
        tracebacks = log_text.count("Traceback")
    finally:
        procs.stop(server)
    report = {
        "machine": describe_machine(),
        "command": shlex.join(["python", "-m", "bastion.benchmarks.fuzz", *(argv or sys.argv[1:])]),
        "runs": runs,
        "server_tracebacks": tracebacks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "fuzz.md").write_text(text)
    print(text)
    return 0 if passed(report) else 1


def _post_index(url: str) -> bytes:
    request = urllib.request.Request(f"{url}/v2/repository/index", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def passed(report: dict[str, Any]) -> bool:
    return report["server_tracebacks"] == 0 and all(
        run["exit_code"] == 0
        and not run["failures"]
        and not run["errors"]
        and run["server_5xx"] == 0
        and run["cases"]["generated"] > 0
        for run in report["runs"].values()
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| run | operations | wall s | cases | passed | failures | errors | server 5xx |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for name, run in report["runs"].items():
        failures = ", ".join(f"{k} {v}" for k, v in run["failures"].items()) or "0"
        errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "0"
        lines.append(
            f"| {name} | {run['operations']} | {run['wall_s']} | {run['cases']['generated']} | "
            f"{run['cases'].get('passed', 0)} | {failures} | {errors} | {run['server_5xx']} |"
        )
    lines.append("")
    lines.append(f"Server tracebacks in the log: {report['server_tracebacks']}. ")
    lines.append(f"Result: {'PASS' if passed(report) else 'FAIL'}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
