"""One bounded h2load run (nghttp2's HTTP/2 and HTTP/1.1 load generator), read back into numbers.

h2load is C and costs a few percent of a core where a Python gRPC client would take most of one
(benchmarks/RESULTS.md, PEERS.md), so the servers, not the client, set the rate. It sends one
prepared body over and over: for gRPC a length-prefixed ``ModelInferRequest`` (gRPC over HTTP/2,
``application/grpc``), for HTTP/1.1 tritonclient's binary-tensor body. h2load cannot read gRPC
trailers, so a run's answers are checked on the server (its success counter must grow by the
requests h2load completed). Latencies come from h2load's per-request log (microseconds).

Install: ``apt-get install nghttp2-client``.
"""

from __future__ import annotations

import resource
import shlex
import shutil
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class H2Result:
    protocol: str
    streams: int
    duration_s: float
    completed: int
    non_2xx: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu_s: float
    wall_s: float
    command: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), 4-byte big-endian length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_infer_body(image: np.ndarray, model: str) -> bytes:
    """One batch-1 ``ModelInferRequest`` as tritonclient.grpc sends it (raw contents)."""
    from tritonclient.grpc import service_pb2 as pb

    batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float32)
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="images", datatype="FP32", shape=batch.shape)
    message.raw_input_contents.append(batch.tobytes())
    return grpc_frame(message.SerializeToString())


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_h2load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    streams: int,
    duration_s: float,
    workdir: Path,
    http1: bool = False,
) -> H2Result:
    """``streams`` requests kept in flight for ``duration_s``: over HTTP/2, 4 connections of
    ``streams / 4`` streams each (one channel per client thread, as tritonclient users run);
    over HTTP/1.1 one connection per request in flight."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load is not installed: apt-get install nghttp2-client")
    workdir.mkdir(parents=True, exist_ok=True)
    body_file, log_file = workdir / "body.bin", workdir / f"requests-{streams}.tsv"
    body_file.write_bytes(body)
    log_file.unlink(missing_ok=True)
    connections = streams if http1 else max(1, min(4, streams))
    command = [h2load, "-D", str(max(1, round(duration_s))), "-c", str(connections)]
    command += ["-m", "1" if http1 else str(max(1, streams // connections))]
    command += ["-t", "1", "-d", str(body_file), "--log-file", str(log_file)]
    command += ["--h1"] if http1 else []
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(url)
    cpu_before, started = _children_cpu_s(), time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + 120, check=False
    )
    wall_s, cpu_s = time.monotonic() - started, _children_cpu_s() - cpu_before
    if done.returncode != 0 or not log_file.exists():
        raise RuntimeError(
            f"h2load failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr}"
        )
    rows = np.loadtxt(log_file, dtype=np.int64, ndmin=2)
    if rows.size == 0:
        raise RuntimeError(f"h2load completed no request against {url}")
    status, latency_ms = rows[:, 1], rows[:, 2] / 1e3
    span_s = max((rows[:, 0].max() - rows[:, 0].min()) / 1e6, 1e-9)
    p50, p90, p99 = np.percentile(latency_ms, [50, 90, 99])
    return H2Result(
        protocol="http/1.1" if http1 else "grpc",
        streams=streams,
        duration_s=duration_s,
        completed=len(rows),
        non_2xx=int(((status < 200) | (status >= 300)).sum()),
        rps=len(rows) / span_s,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        client_cpu_s=cpu_s,
        wall_s=wall_s,
        command=shlex.join(command),
    )
