"""Routing and rollback without a redeploy: a canary under load rolled back by an admin, with
no request failed and every request after the rollback on the safe version."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models import samples
from bastion.models.data import load_split, to_float
from tests.conftest import start_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"


def two_versions(tmp_path: Path) -> Path:
    """The bundled digits model as versions 1 and 2, both served."""
    repository = tmp_path / "repository"
    shutil.copytree(DEFAULT_REPOSITORY, repository)
    model = repository / "digits"
    shutil.copytree(model / "1", model / "2")
    config = model / "config.pbtxt"
    text = config.read_text().replace(
        "version_policy { latest { num_versions: 1 } }", "version_policy { all { } }"
    )
    config.write_text(text)
    return repository


def test_a_rollback_under_load_fails_no_request_and_moves_all_traffic_at_once(
    tmp_path: Path,
) -> None:
    repository = two_versions(tmp_path)
    server = start_server(
        tmp_path, "--model-repository", str(repository), env={"BASTION_ADMIN_TOKEN": TOKEN}
    )
    admin = {"Authorization": f"Bearer {TOKEN}"}
    try:
        base = f"http://{server.url}/v2/admin/routes/digits"
        route = {"weights": {"1": 0.5, "2": 0.5}, "safe": 1}
        assert httpx.put(base, json=route, headers=admin, timeout=10).status_code == 200
        images = to_float(load_split("test")[0][:64])
        seen: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            client = th.InferenceServerClient(server.url)
            n = 0
            while not stop.is_set():
                tensor = th.InferInput("images", [1, 1, 28, 28], "FP32")
                tensor.set_data_from_numpy(images[n % 64][None].astype(np.float32))
                started = time.monotonic()
                try:  # a new client id each time: spread over both versions
                    result = client.infer(
                        "digits", [tensor], headers={"X-Client-ID": f"w{worker}-{n}"}
                    )
                    seen.append((started, result.get_response()["model_version"]))
                except InferenceServerException as exc:  # the screening's 403 is an answer
                    if not (exc.status() == "403" and "withheld" in exc.message()):
                        failures.append(str(exc))
                except Exception as exc:  # anything else is a failed request
                    failures.append(repr(exc))
                n += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        rolled = httpx.post(f"{base}/rollback", json={"reason": "canary under review"},
                            headers=admin, timeout=10)  # fmt: skip
        done = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert rolled.status_code == 200 and rolled.json()["rolled_back"] == "canary under review"
        assert not failures, failures[:3]
        before = {v for t, v in seen if t < done - 0.5}
        after = [v for t, v in seen if t > done]
        assert before == {"1", "2"} and len(after) > 20
        assert set(after) == {"1"}, "a request that started after the rollback reached version 2"
        named = th.InferenceServerClient(server.url)
        tensor = th.InferInput("images", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[:1].astype(np.float32))
        answer = named.infer("digits", [tensor], model_version="2")  # asks for the canary
        assert answer.get_response()["model_version"] == "1"  # a rollback takes it out of service
        again = httpx.put(base, json=route, headers=admin, timeout=10)  # a deploy script re-PUTs
        assert again.json()["rolled_back"] == "canary under review"  # it does not undo it
        forward = httpx.post(f"{base}/forward", headers=admin, timeout=10)
        assert forward.status_code == 200 and forward.json()["rolled_back"] is None
        conn = sqlite3.connect(server.incident_env()["BASTION_INCIDENT_LOG_PATH"])
        kinds = [
            k for (k,) in conn.execute("SELECT kind FROM log_entries WHERE subject = 'digits'")
        ]
        conn.close()
        assert kinds[:4] == ["route_change", "rollback", "route_change", "route_change"]
        bad = httpx.put(base, json={"weights": {"0": 1}}, headers=admin, timeout=10)
        assert bad.status_code == 400 and "error" in bad.json()
        unloaded = httpx.put(base, json={"weights": {"1": 1}, "safe": 3}, headers=admin)
        assert unloaded.status_code == 400 and "no loaded version [3]" in unloaded.json()["error"]
        nosuch = httpx.put(f"{base}x", json={"weights": {"1": 1}}, headers=admin)
        assert nosuch.status_code == 404
        assert httpx.post(f"{base}/forward", headers=admin).status_code == 400  # not rolled back
        assert httpx.delete(base, headers=admin).status_code == 200
        assert httpx.get(base, headers=admin).status_code == 404
        assert httpx.get(f"http://{server.url}/v2/admin/routes", timeout=10).status_code == 403
    finally:
        server.stop()


def cli(server_url: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bastion.gateway", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def test_the_whole_incident_attack_contained_rolled_back_reported_restored_verified(
    tmp_path: Path,
) -> None:
    repository = two_versions(tmp_path)
    server = start_server(
        tmp_path, "--model-repository", str(repository), env={"BASTION_ADMIN_TOKEN": TOKEN}
    )
    env = {**os.environ, **server.incident_env(), "BASTION_URL": server.url}
    env |= {"BASTION_ADMIN_TOKEN": TOKEN, "BASTION_QUARANTINE_PATH": str(
        tmp_path / f"quarantine-{server.port}.db")}  # fmt: skip
    admin = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://{server.url}/v2/admin"
    try:
        route = {"weights": {"1": 0.5, "2": 0.5}, "safe": 1}
        assert httpx.put(f"{base}/routes/digits", json=route, headers=admin).status_code == 200
        client = th.InferenceServerClient(server.url)

        def send(image: np.ndarray, who: str) -> str:
            tensor = th.InferInput("images", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(image[None].astype(np.float32))
            try:
                client.infer("digits", [tensor], headers={"X-Client-ID": who})
            except InferenceServerException as exc:
                return "contained" if "contained" in exc.message() else "refused"
            return "served"

        adversarial, _ = samples.load("adversarial")
        assert send(adversarial[0], "mallory-0") == "refused"  # withheld by the screening
        rng, probe = np.random.default_rng(0), to_float(load_split("test")[0])[7].copy()
        answers = []
        for i in range(60):  # the walk of test_containment: tiny sparse steps, new names
            step = rng.random(probe.shape) < 0.005
            probe = np.where(
                step, np.clip(probe + rng.choice([-0.1, 0.1], probe.shape), 0, 1), probe
            )
            answers.append(send(probe, f"sybil-{i // 3}"))
        assert "contained" in answers
        # contained -> an incident opened -> the model rolled back to its safe version, by rule
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            routes = httpx.get(f"{base}/routes", headers=admin).json()["routes"]
            if routes["digits"]["rolled_back"]:
                break
            time.sleep(0.1)
        assert routes["digits"]["rolled_back"].startswith("contained")
        assert routes["digits"]["strict"] is True
        listed = httpx.get(f"{base}/incidents", headers=admin).json()["incidents"]
        (incident,) = [i for i in listed if "contained" in i["title"]]
        # the report: exactly what the walk's identities were served
        cli(server.url, env, "incidents", "report", str(incident["id"]), "--out", str(tmp_path))
        report = json.loads((tmp_path / f"incident-{incident['id']}.json").read_text())
        assert report["attacker_served_count"] == answers.count("served")
        over_api = httpx.get(f"{base}/incidents/{incident['id']}/report", headers=admin, timeout=60)
        assert over_api.json()["attacker_served_count"] == report["attacker_served_count"]
        as_page = httpx.get(
            f"{base}/incidents/{incident['id']}/report?format=html", headers=admin, timeout=60
        )
        assert as_page.headers["content-type"].startswith("text/html") and "uPlot" in as_page.text
        assert httpx.get(f"{base}/incidents/{incident['id']}/report").status_code == 403
        assert {r["version"] for r in report["versions"]} <= {"1", "2"}
        # restore: lift containment, roll forward, export the quarantine, close the incident
        last = f"sybil-{(len(answers) - 1) // 3}"
        assert "released" in cli(server.url, env, "clients", "release", last)
        forward = httpx.post(f"{base}/routes/digits/forward", headers=admin)
        assert forward.status_code == 200 and forward.json()["strict"] is False
        exported = cli(server.url, env, "quarantine", "export", "--out", str(tmp_path / "export"))
        # the review copies the tiers kept, labelled (the walk's late identities mostly get
        # 429 at the door, so as little as one input may have been kept)
        assert re.search(r"\b[1-9][0-9]* inputs? ", exported), exported
        assert (tmp_path / "export" / "quarantine-export.npz").exists()
        cli(server.url, env, "incidents", "close", str(incident["id"]), "--note", "restored")
        verified = json.loads(cli(server.url, env, "incidents", "verify", "--json"))
        assert verified["ok"], verified["problems"]
        conn = sqlite3.connect(server.incident_env()["BASTION_INCIDENT_LOG_PATH"])
        kinds = {k for (k,) in conn.execute("SELECT kind FROM log_entries")}
        conn.close()
        assert {"containment", "incident_opened", "rollback", "release", "route_change",
                "export", "incident_closed"} <= kinds  # fmt: skip
    finally:
        server.stop()
