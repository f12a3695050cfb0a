"""Quarantine bounds end to end: a real server under quotas from the environment, the client's
403, the metrics, and ``bastion quarantine stats``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.models.data import load_split, to_float
from tests.conftest import ServerProcess, flag_every_image, start_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def quarantine_everything(repository: Path) -> Path:
    """Every image adversarial (a calibration threshold below any score), every verdict kept."""
    flag_every_image(repository)
    config = repository / "digits" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('string_value: "block"', 'string_value: "quarantine"'))
    return repository


@pytest.fixture
def bounded_server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "BASTION_ADMIN_TOKEN": TOKEN,
        "BASTION_QUARANTINE_MAX_RECORDS_PER_CLIENT": "2",
        "BASTION_QUARANTINE_MAX_RECORDS": "3",
        "BASTION_METRICS_TOKEN": "mtok",
    }
    proc = start_server(tmp_path, "--model-repository", str(quarantine_everything(repository)),
                        env=env)
    yield proc
    proc.stop()


def images(n: int, start: int = 0) -> np.ndarray:
    """Test digits ``start`` to ``start + n``: each client its own pictures."""
    return np.ascontiguousarray(to_float(load_split("test")[0][start : start + n]), np.float32)


def refused(server: ServerProcess, n: int, client_id: str, start: int = 0) -> dict:
    x = images(n, start)
    response = httpx.post(
        f"http://{server.url}/v2/models/digits/infer",
        json={"id": client_id, "inputs": [{"name": "images", "datatype": "FP32",
                                           "shape": list(x.shape), "data": x.ravel().tolist()}]},
        headers={"X-Client-ID": client_id},
        timeout=30,
    )
    assert response.status_code == 403, response.text
    return response.json()


def test_quotas_drop_records_but_never_serve_the_input_and_stats_show_it(
    bounded_server: ServerProcess,
) -> None:
    url = f"http://{bounded_server.url}"
    body = refused(bounded_server, 3, "mallory")  # 2 kept: the per-client quota
    assert body["withheld"] == [0, 1, 2] and len(body["quarantine_ids"]) == 2
    assert "quarantine_dropped" not in body  # the operator's to know (metrics, stats)
    tensor = th.InferInput("images", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images(2, 3))
    with pytest.raises(InferenceServerException) as err:  # 1 kept: the store is then full
        th.InferenceServerClient(bounded_server.url).infer(
            "digits", [tensor], headers={"X-Client-ID": "alice"}
        )
    assert err.value.status() == "403" and "quota" not in err.value.message()
    body = refused(bounded_server, 1, "bob", 5)
    assert body["withheld"] == [0] and body["quarantine_ids"] == []
    assert "bastion_quarantine" not in httpx.get(f"{url}/metrics", timeout=10).text  # 403
    scrape = {"Authorization": "Bearer mtok"}
    metrics = httpx.get(f"{url}/metrics", headers=scrape, timeout=10).text
    assert "bastion_quarantine_over_quota 1.0" in metrics
    assert "bastion_quarantine_records 3.0" in metrics
    assert 'bastion_quarantine_dropped_total{reason="client_quota"} 1.0' in metrics
    assert 'bastion_quarantine_dropped_total{reason="records_quota"} 2.0' in metrics
    cli = [sys.executable, "-m", "bastion.gateway", "quarantine", "stats"]
    env = {**os.environ, "BASTION_URL": url, "BASTION_ADMIN_TOKEN": TOKEN}
    shown = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "records      3 of 3" in shown.stdout and "YES" in shown.stdout
    assert "mallory=2 alice=1" in shown.stdout
    raw = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=60)
    stats = json.loads(raw.stdout)
    assert stats["records"] == 3 and stats["over_quota"] is True
    assert stats["dropped"] == {"records_quota": 2, "bytes_quota": 0, "client_quota": 1}
    denied = subprocess.run(cli, env={**env, "BASTION_ADMIN_TOKEN": "wrong"},
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "403" in denied.stderr
