"""The incident log survives kill -9 mid-write and two processes appending at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.verify import verify

APPENDER = """
import sys
from pathlib import Path
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.signing import Signer
db, key, witness, name = sys.argv[1:5]
log = IncidentLog(Path(db), Signer.from_file(Path(key)), Path(witness))
for i in range(int(sys.argv[5])):
    entry = log.append("campaign", f"{name}-{i}", {"i": i})
    print(entry.seq, flush=True)  # acknowledged: the append returned
"""


def appender(
    tmp: Path, name: str, count: int, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    args = [str(tmp / "incidents.db"), str(tmp / "key.pem"), str(tmp / "checkpoint.json")]
    return subprocess.Popen(
        [sys.executable, "-c", APPENDER, *args, name, str(count)],
        stdout=stdout,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )


def test_kill_9_mid_write_loses_no_acknowledged_entry_and_the_log_verifies(tmp_path: Path) -> None:
    Signer.from_file(tmp_path / "key.pem")  # one key for the writer and the checks
    proc = appender(tmp_path, "killed", 100_000)
    assert proc.stdout is not None
    acknowledged = [int(proc.stdout.readline()) for _ in range(200)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    acknowledged += [int(line) for line in proc.stdout.read().split()]  # acked before the kill
    proc.stdout.close()
    key = Signer.from_file(tmp_path / "key.pem", create=False).public_key
    verdict = verify(tmp_path / "incidents.db", key, tmp_path / "checkpoint.json")
    assert verdict.ok, verdict.problems
    assert verdict.entries >= max(acknowledged) == len(acknowledged)
    log = IncidentLog(tmp_path / "incidents.db", Signer.from_file(tmp_path / "key.pem"))
    subjects = {e.subject for e in log.entries(limit=10_000)}
    assert {f"killed-{seq - 1}" for seq in acknowledged} <= subjects
    log.append("release", "after-the-crash", {})  # it carries on where it stopped
    log.close()
    assert verify(tmp_path / "incidents.db", key, tmp_path / "checkpoint.json").ok


def test_two_processes_appending_at_once_keep_one_consistent_log(tmp_path: Path) -> None:
    Signer.from_file(tmp_path / "key.pem")
    procs = [appender(tmp_path, name, 150, subprocess.DEVNULL) for name in ("gateway", "cli")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    key = Signer.from_file(tmp_path / "key.pem", create=False).public_key
    verdict = verify(tmp_path / "incidents.db", key, tmp_path / "checkpoint.json")
    assert verdict.ok, verdict.problems
    assert verdict.entries == verdict.witnessed == 300
