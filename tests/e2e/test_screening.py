"""Screening end to end: the real server, ``tritonclient``, real adversarial digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.gateway.quarantine.sqlite import SQLiteQuarantineStore
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@cache
def adversarial_digits() -> np.ndarray:
    """PGD-L-inf (eps 0.3, 40 steps) on test digits, rounded to 8-bit pixels, kept only where the
    attack succeeds: inputs the model now misclassifies."""
    net = load_digits()
    images, labels = load_split("test")
    x, y = torch.from_numpy(to_float(images[200:260])), torch.from_numpy(labels[200:260])
    adv = x.clone()
    for _ in range(40):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(adv), y), adv)
        adv = (adv.detach() + 0.01 * grad.sign()).clamp(x - 0.3, x + 0.3).clamp(0, 1)
    adv = torch.round(adv * 255) / 255
    with torch.no_grad():
        fooled = (net(adv).argmax(1) != y) & (net(x).argmax(1) == y)
    assert fooled.sum() >= 30
    return adv[fooled].numpy()


def clean_digits(n: int) -> np.ndarray:
    return to_float(load_split("test")[0][:n])


def infer(client: th.InferenceServerClient, x: np.ndarray, **kwargs: object) -> th.InferResult:
    tensor = th.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    return client.infer("digits", [tensor], **kwargs)  # type: ignore[arg-type]


def with_action(repository: Path, action: str) -> Path:
    config = repository / "digits" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('string_value: "block"', f'string_value: "{action}"'))
    return repository


@pytest.fixture
def quarantine_server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path,
        "--model-repository",
        str(with_action(repository, "quarantine")),
        env={"BASTION_ADMIN_TOKEN": TOKEN},
    )
    yield proc
    proc.stop()


def quarantine_db(server: ServerProcess) -> Path:
    return server.log.parent / f"quarantine-{server.port}.db"


def test_clean_digits_pass_and_adversarial_digits_are_blocked(server: ServerProcess) -> None:
    client = th.InferenceServerClient(server.url)
    passed = 0
    for i, image in enumerate(clean_digits(40)):
        try:
            infer(client, image[None], request_id=f"clean-{i}")
            passed += 1
        except InferenceServerException as exc:
            assert exc.status() == "403"
    assert passed >= 38  # the block tier is calibrated at a 0.5 % false-positive rate
    adversarial = adversarial_digits()
    blocked = 0
    for i, image in enumerate(adversarial):
        response = httpx.post(
            f"http://{server.url}/v2/models/digits/infer",
            json={
                "id": f"adv-{i}",
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "FP32",
                        "shape": [1, 1, 28, 28],
                        "data": image.ravel().tolist(),
                    }
                ],
            },
            timeout=30,
        )
        if response.status_code == 403:
            body = response.json()
            assert body["request_id"] == f"adv-{i}" and body["withheld"] == [0]
            assert body["reason"] == "adversarial" and f"adv-{i}" in body["error"]
            assert "outputs" not in body
            blocked += 1
        else:
            assert response.status_code == 200
    assert blocked / len(adversarial) >= 0.9, (blocked, len(adversarial))
    metrics = httpx.get(f"http://{server.url}/metrics", timeout=10).text
    assert 'bastion_screening_verdicts_total{action="block",model="digits"' in metrics
    assert "bastion_screening_threshold" not in metrics  # thresholds are admin-only
    assert "bastion_screening_score" not in metrics  # per-detector scores: private series only


def test_request_with_one_withheld_image_is_refused_whole(server: ServerProcess) -> None:
    client = th.InferenceServerClient(server.url)
    batch = np.concatenate([clean_digits(2), adversarial_digits()[:1]])
    with pytest.raises(InferenceServerException) as err:
        infer(client, batch, request_id="mixed")
    assert err.value.status() == "403" and "images [2]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # scores are an attacker's oracle
        infer(client, batch, parameters={"screening_report": True})
    assert err.value.status() == "403" and "screening_report" in err.value.message()
    report = infer(
        client, batch, parameters={"screening_report": True}, headers=dict(ADMIN)
    )  # tritonclient adds its headers to the dict
    verdicts = [v.decode() for v in report.as_numpy("screening_verdict")]
    assert verdicts[2] == "adversarial:block" and verdicts[0] == "clean:allow"
    probs = report.as_numpy("probabilities")
    assert np.isnan(probs[2]).all() and np.isfinite(probs[:2]).all()
    assert report.as_numpy("screening_scores").shape == (3, 5)  # 4 detectors, combined


def test_screening_endpoint_needs_the_token_and_policy_can_be_tightened(
    server: ServerProcess,
) -> None:
    url = f"http://{server.url}"
    assert httpx.get(f"{url}/v2/models/digits/screening", timeout=10).status_code == 403
    info = httpx.get(f"{url}/v2/models/digits/screening", headers=ADMIN, timeout=10).json()
    assert info["action"] == "block" and info["review_action"] == "review"
    assert info["detectors"] == [
        "feature_squeezing",
        "confidence_margin",
        "gradient_norm",
        "mahalanobis",
    ]
    assert info["combiner"] == "fisher" and info["mahalanobis_layer"] == "net.features.2"
    tiers = info["tiers"]
    assert tiers["adversarial"]["target_fpr"] == pytest.approx(0.005)
    assert tiers["suspicious"]["target_fpr"] == pytest.approx(0.05)
    assert tiers["adversarial"]["threshold"] > tiers["suspicious"]["threshold"]
    assert tiers["adversarial"]["test"]["upper95"] < 0.01  # measured on the held-out split
    client = th.InferenceServerClient(server.url)
    adversarial = adversarial_digits()[:1]
    try:
        response = httpx.post(
            f"{url}/v2/models/digits/screening/action",
            headers=ADMIN,
            json={"action": "flag"},
            timeout=10,
        )
        assert response.status_code == 200
        flagged = infer(client, adversarial)
        assert flagged.get_response()["parameters"]["screening_flagged"] == "0"
        assert flagged.as_numpy("probabilities").shape == (1, 10)
    finally:
        httpx.post(
            f"{url}/v2/models/digits/screening/action",
            headers=ADMIN,
            json={"action": "block"},
            timeout=10,
        )
    with pytest.raises(InferenceServerException, match="403"):
        infer(client, adversarial)


def test_quarantined_input_is_stored_and_managed_by_the_admin_api_and_cli(
    quarantine_server: ServerProcess,
) -> None:
    url = f"http://{quarantine_server.url}"
    image = adversarial_digits()[:1]
    client = th.InferenceServerClient(quarantine_server.url)
    with pytest.raises(InferenceServerException) as err:
        infer(client, image, request_id="q-1", headers={"X-Client-ID": "mallory"})
    assert "quarantine ids" in err.value.message()
    listing = httpx.get(f"{url}/v2/quarantine", headers=ADMIN, timeout=10).json()
    assert listing["total"] == 1
    item = listing["items"][0]
    assert (item["client_id"], item["request_id"], item["model"]) == ("mallory", "q-1", "digits")
    assert item["verdict"] == "adversarial" and item["scores"]["combined"] > 2.3
    assert item["thresholds"]["adversarial"] == pytest.approx(-np.log10(0.005))
    record = httpx.get(f"{url}/v2/quarantine/{item['id']}", headers=ADMIN, timeout=10).json()
    stored = np.asarray(record["input"]["data"], np.float32).reshape(record["input"]["shape"])
    np.testing.assert_array_equal(stored, image[0])
    cli = [sys.executable, "-m", "bastion.gateway", "quarantine"]
    env = {**os.environ, "BASTION_URL": url, "BASTION_ADMIN_TOKEN": TOKEN}
    shown = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert item["id"] in shown.stdout, shown.stderr
    released = subprocess.run(
        [*cli, "release", item["id"], "--note", "false positive"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "released" in released.stdout, released.stderr
    kept = httpx.get(f"{url}/v2/quarantine/{item['id']}", headers=ADMIN, timeout=10).json()
    assert kept["status"] == "released" and kept["input"]["data"]  # kept for recalibration
    purged = subprocess.run(
        [*cli, "purge", "--status", "released"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "purged 1" in purged.stdout, purged.stderr
    assert httpx.get(f"{url}/v2/quarantine", headers=ADMIN, timeout=10).json()["total"] == 0
    assert httpx.get(f"{url}/v2/quarantine", timeout=10).status_code == 403


def test_kill_9_loses_no_quarantine_record_whose_id_was_returned(
    quarantine_server: ServerProcess,
) -> None:
    url = f"http://{quarantine_server.url}/v2/models/digits/infer"
    images = adversarial_digits()
    returned: list[str] = []
    stop = threading.Event()

    def attack(worker: int) -> None:
        with httpx.Client(timeout=10) as session:
            for i in range(10_000):
                if stop.is_set():
                    return
                image = images[(worker + i) % len(images)]
                body = {
                    "inputs": [
                        {
                            "name": "images",
                            "datatype": "FP32",
                            "shape": [1, 1, 28, 28],
                            "data": image.ravel().tolist(),
                        }
                    ]
                }
                try:
                    response = session.post(url, json=body)
                except httpx.HTTPError:
                    return
                if response.status_code == 403:
                    returned.extend(response.json()["quarantine_ids"])

    workers = [threading.Thread(target=attack, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    while len(returned) < 40 and all(w.is_alive() for w in workers):
        threading.Event().wait(0.05)
    os.kill(quarantine_server.process.pid, signal.SIGKILL)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    quarantine_server.process.wait(timeout=10)
    assert len(returned) >= 40
    store = SQLiteQuarantineStore(quarantine_db(quarantine_server))
    missing = [i for i in returned if store.get(i) is None]
    store.close()
    assert not missing, f"{len(missing)} of {len(returned)} returned ids were lost"
    print(json.dumps({"returned_ids": len(returned)}))
