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


class PostgresCluster:
    """One throwaway cluster: ``initdb`` once, then ``start``/``stop`` again on the same port and
    data directory (an outage the tests can cause); ``remove`` deletes it."""

    def __init__(self) -> None:
        self.bin_dir, self.port = binaries(), _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bastion-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        initdb = [*self.as_user, str(self.bin_dir / "initdb"), "-D", str(self.data)]
        run = [*initdb, "-U", "bastion", "-A", "trust", "--no-sync"]
        subprocess.run(run, check=True, capture_output=True, timeout=120)
        self.url = f"postgresql://bastion@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self) -> list[str]:
        return [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data)]

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        start = [*self._pg_ctl(), "-l", str(self.root / "log"), "-o", options]
        subprocess.run([*start, "-w", "-t", "60", "start"], check=True, timeout=90)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are cut off, as when the server goes away."""
        stop = [*self._pg_ctl(), "-m", "fast", "-w", "stop"]
        subprocess.run(stop, check=False, capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Starts a cluster; yields it (``.url``, ``.stop()``, ``.start()``); removes it at the end."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a cluster; yields its URL (``postgresql://bastion@127.0.0.1:PORT/postgres``)."""
    with postgres_cluster() as cluster:
        yield cluster.url
