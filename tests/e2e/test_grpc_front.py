"""The gRPC front process beside the gateway: a front that dies is replaced on the same port
while HTTP keeps serving, and a gateway that dies takes its front with it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import tritonclient.grpc as tg

from tests.conftest import ServerProcess, start_server
from tests.e2e.test_grpc import digits, tensor

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path)
    yield server
    server.stop()


def front_of(server: ServerProcess) -> psutil.Process:
    (front,) = [
        child
        for child in psutil.Process(server.process.pid).children()
        if "bastion.gateway.rpc.front" in " ".join(child.cmdline())
    ]
    return front


def grpc_answers(url: str) -> bool:
    client = tg.InferenceServerClient(url)
    try:
        result = client.infer("digits", [tensor(digits(2))], client_timeout=5)
        return result.as_numpy("probabilities").shape == (2, 10)
    except Exception:
        return False
    finally:
        client.close()


def test_a_front_that_dies_is_replaced_on_the_same_port_while_http_serves(
    own_server: ServerProcess,
) -> None:
    assert grpc_answers(own_server.grpc_url)
    first = front_of(own_server)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    http_ok = httpx.get(f"http://{own_server.url}/v2/health/live", timeout=5).status_code == 200
    deadline = time.monotonic() + 30
    while not grpc_answers(own_server.grpc_url):
        assert time.monotonic() < deadline, own_server.log.read_text()[-3000:]
        time.sleep(0.5)
    assert http_ok and front_of(own_server).pid != first.pid
    assert "the gRPC front process exited" in own_server.log.read_text()


def test_a_gateway_killed_outright_leaves_no_front_holding_the_port(
    own_server: ServerProcess,
) -> None:
    front = front_of(own_server)
    own_server.process.send_signal(signal.SIGKILL)
    own_server.process.wait(10)
    front.wait(15)  # raises psutil.TimeoutExpired if the front outlived its gateway
    assert not psutil.pid_exists(front.pid) or front.status() == psutil.STATUS_ZOMBIE


def test_a_terminated_gateway_stops_its_front_in_order(own_server: ServerProcess) -> None:
    front = front_of(own_server)
    own_server.stop()  # SIGTERM: uvicorn's shutdown, then the lifespan's
    front.wait(5)
    log = own_server.log.read_text()
    assert "Application shutdown complete" in log
    assert "the gRPC front process exited" not in log
