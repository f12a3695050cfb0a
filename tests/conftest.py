"""Shared fixtures: the bundled repository, a real gateway process for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.gateway.settings import DEFAULT_REPOSITORY


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A private copy of the bundled model repository that a test may change."""
    target = tmp_path / "repository"
    shutil.copytree(DEFAULT_REPOSITORY, target)
    return target


PRIVATE_PATHS = (
    "KEYS_PATH",
    "INCIDENT_LOG_PATH",
    "INCIDENT_KEY_PATH",
    "INCIDENT_CHECKPOINT_PATH",
    "LEDGER_PATH",
)


@pytest.fixture(autouse=True, scope="session")
def _private_key_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads the machine's own client keys (a developer's keys would turn every
    unkeyed request into a 401) nor writes to its incident log or signing key: files of the
    session's own unless a test names its own."""
    folder = tmp_path_factory.mktemp("private")
    previous = {name: os.environ.get(f"BASTION_{name}") for name in PRIVATE_PATHS}
    for name in PRIVATE_PATHS:
        os.environ[f"BASTION_{name}"] = str(folder / name.lower())
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(f"BASTION_{name}", None)
        else:
            os.environ[f"BASTION_{name}"] = value


def flag_every_image(repository: Path, model: str = "digits", version: str = "1") -> Path:
    """Rewrites a copied version's calibration so every image is adversarial: the combined
    score's clean tail starts below any statistic with a vanishing scale, so every score gets
    the maximum surprise. The detectors still run; only the verdict is forced."""
    path = repository / model / version / "calibration.json"
    data = json.loads(path.read_text())
    n = len(data["combined"]["reference"])
    data["combined"] |= {"reference": [-1e9] * n, "start": -1e9, "scale": 1e-9, "shape": 0.0}
    path.write_text(json.dumps(data))
    return repository


ARTIFACTS = Path(
    os.environ.get("BASTION_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1900",
    "--virtual-time-budget=6000",
]


def tool(name: str) -> str:
    """The path of a Debian tool the e2e tests drive (chromium, promtool ...)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs it (apt-get install)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    grpc_port: int = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def incident_env(self) -> dict[str, str]:
        """Where ``start_server`` put this server's incident log, signing key, witness and
        ledger."""
        folder = self.log.parent
        return {
            "BASTION_INCIDENT_LOG_PATH": str(folder / f"incidents-{self.port}.db"),
            "BASTION_INCIDENT_KEY_PATH": str(folder / f"incident-{self.port}.key"),
            "BASTION_INCIDENT_CHECKPOINT_PATH": str(
                folder / f"incident-checkpoint-{self.port}.json"
            ),
            "BASTION_LEDGER_PATH": str(folder / f"ledger-{self.port}.db"),
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/v2/health/ready",
) -> ServerProcess:
    """Starts ``bastion serve`` on a free port and polls ``ready_path`` (readiness; liveness
    for a server with a model meant not to be ready) with backoff."""
    port, grpc_port = free_port(), free_port()
    log = log_dir / f"server-{port}.log"
    full_env = {
        **os.environ,
        "BASTION_TORCH_THREADS": "1",
        "BASTION_GRPC_PORT": str(grpc_port),
        "BASTION_QUARANTINE_PATH": str(log_dir / f"quarantine-{port}.db"),
        "BASTION_KEYS_PATH": str(log_dir / f"keys-{port}.db"),
        "BASTION_INCIDENT_LOG_PATH": str(log_dir / f"incidents-{port}.db"),
        "BASTION_INCIDENT_KEY_PATH": str(log_dir / f"incident-{port}.key"),
        "BASTION_INCIDENT_CHECKPOINT_PATH": str(log_dir / f"incident-checkpoint-{port}.json"),
        "BASTION_LEDGER_PATH": str(log_dir / f"ledger-{port}.db"),
        **(env or {}),
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "bastion.gateway", "serve", "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = ServerProcess(process, port, log, int(full_env["BASTION_GRPC_PORT"]))
    delay, deadline = 0.05, time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"http://{server.url}{ready_path}", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    server.stop()
    raise RuntimeError(f"server not ready in time:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real gateway process serving the bundled repository, shared by the e2e tests."""
    proc = start_server(tmp_path_factory.mktemp("server"), env={"BASTION_ADMIN_TOKEN": "s3cret"})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL cluster for the session (``tests/services/postgres.py``)."""
    from tests.services.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real Redis server for one test (``tests/services/redis.py``): ``.url``, ``.stop()``
    and ``.start()`` again on the same port."""
    from tests.services.redis import redis_server as start

    with start() as server:
        yield server


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """A fresh, empty database in the session's cluster, for one test."""
    import secrets

    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name
