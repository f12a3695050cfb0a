"""Server processes for benchmarks: start in their own group, poll readiness, meter CPU, stop.

A server is measured as its whole process tree (Triton forks a server, a backend stub and helper
processes), found through both the process group and parent links, because CPU time per request
is the number that survives a noisy neighbour (PEERS.md). Stopping is SIGTERM to the leader, then
SIGKILL to the whole group and every process seen in the tree, so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def private_state(workdir: Path) -> dict[str, str]:
    """A benchmark gateway's durable state in ``workdir``: never the machine's own quarantine,
    client keys, incident log or signing key."""
    return {
        "BASTION_QUARANTINE_PATH": str(workdir / "q.db"),
        "BASTION_KEYS_PATH": str(workdir / "keys.db"),
        "BASTION_INCIDENT_LOG_PATH": str(workdir / "incidents.db"),
        "BASTION_INCIDENT_KEY_PATH": str(workdir / "incident.key"),
        "BASTION_INCIDENT_CHECKPOINT_PATH": str(workdir / "incident-checkpoint.json"),
        "BASTION_LEDGER_PATH": str(workdir / "ledger.db"),
    }


def free_port_block(size: int = 3, attempts: int = 50) -> int:
    """A port P on 127.0.0.1 with P .. P+size-1 all free (PyTriton takes http, grpc, metrics)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size < 65536 and all(_is_free(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no block of {size} free ports on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree_pids(root: int) -> set[int]:
    """The root, its process group and all their descendants."""
    parents: dict[int, int] = {}
    members = {root}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (fields := _stat_fields(int(entry))) is None:
            continue
        parents[int(entry)] = int(fields[1])
        if int(fields[2]) == root:
            members.add(int(entry))
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in members} - members
        members |= found
        grew = bool(found)
    return members


def cpu_seconds(root: int) -> float:
    """user + system time of the live tree, plus what it reaped (so exits between samples count)."""
    total = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU time all processes have spent in user and system mode since boot, on every core.

    Less the server's and the load generator's own time, it measures the noisy neighbours.
    """
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system = values[:3]
    return (user + nice + system) / CLOCK_TICKS  # guest is inside user; irq time is nobody's


def background_cores(window_s: float = 1.0) -> float:
    """Cores kept busy by everyone else over a short window (this process excluded)."""
    own = time.process_time()
    busy, started = system_busy_seconds(), time.monotonic()
    time.sleep(window_s)
    others = system_busy_seconds() - busy - (time.process_time() - own)
    return max(others, 0.0) / (time.monotonic() - started)


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.25) -> float:
    """Waits (bounded) until other processes leave the CPUs alone; returns the last reading.

    On a shared 2-core box a neighbour's test run halves any server's throughput, so a benchmark
    waits for a lull rather than report a neighbour's load as a server's speed.
    """
    deadline = time.monotonic() + max_wait_s
    reading = background_cores()
    while reading > threshold_cores and time.monotonic() < deadline:
        reading = background_cores(2.0)
    return reading


@dataclass
class Server:
    """A running server: its process (group leader), base URL and log file."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start(name: str, command: Sequence[str], env: dict[str, str], url: str, log: Path) -> Server:
    """Starts ``command`` as the leader of a new session, its output going to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(name=name, process=process, url=url, log=log)


def http_ok(
    url: str,
    timeout_s: float = 2.0,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bool:
    """Whether a GET (or POST with ``body``) answers 200."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(server: Server, probe: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``probe`` passes, polling with backoff; raises if the server dies or stalls."""
    started = time.monotonic()
    delay = 0.1
    while not probe():
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{server.name} not ready after {timeout_s} s:\n{server.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    return time.monotonic() - started


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) of a live process: a bare pid may be reused once ours exits."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else (pid, fields[19])


def _alive(members: set[tuple[int, str]]) -> set[tuple[int, str]]:
    return {member for member in members if _identity(member[0]) == member}


def _kill_all(pgid: int, members: set[tuple[int, str]]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for pid, _ in _alive(members):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stop(server: Server, grace_s: float = 20.0) -> None:
    """SIGTERM to the leader, which stops its children in order; SIGKILL after ``grace_s``."""
    leader = server.process
    members = {ident for pid in tree_pids(leader.pid) if (ident := _identity(pid)) is not None}
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        leader.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=grace_s)
    while _alive(members) and time.monotonic() < deadline:
        time.sleep(0.2)
    if leader.poll() is None or _alive(members):
        _kill_all(leader.pid, members)
        leader.wait(timeout=10)
