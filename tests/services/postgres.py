"""A real PostgreSQL server for the tests: the Debian package's binaries, a throwaway cluster.

``initdb`` into a fresh directory, ``pg_ctl start`` on a free port on 127.0.0.1 (its socket in
the same directory), trust authentication for the one local user, ``pg_ctl stop -m fast`` at the
end. PostgreSQL refuses to run as root, so under root the cluster is owned and run by the
``postgres`` user the Debian package creates (``runuser``). ``scripts/system-packages.sh``
installs the package.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def binaries() -> Path:
    """The newest installed PostgreSQL's bin directory. Raises ``FileNotFoundError``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if not found:
        raise FileNotFoundError("PostgreSQL is not installed: bash scripts/system-packages.sh")
    return Path(found[-1]).parent


def _major(path: str) -> int:
    return int(Path(path).parent.parent.name.split(".")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a cluster; yields its URL (``postgresql://bastion@127.0.0.1:PORT/postgres``)."""
    bin_dir, port = binaries(), _free_port()
    root = Path(tempfile.mkdtemp(prefix="bastion-pg-", dir="/tmp"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    run = [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "bastion", "-A", "trust"]
    subprocess.run([*run, "--no-sync"], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=on"
    start = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log")]
    subprocess.run([*start, "-o", options, "-w", "-t", "60", "start"], check=True, timeout=90)
    try:
        yield f"postgresql://bastion@127.0.0.1:{port}/postgres"
    finally:
        stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(stop, check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
