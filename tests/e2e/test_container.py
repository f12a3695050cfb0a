"""The container image (``Containerfile``, built by ``scripts/build-image.sh``) as a drop-in
Triton: the unchanged ``tritonclient`` over HTTP and gRPC gets the model's own answers from a
container that runs as uid 10001 and passes its own HEALTHCHECK.

Building the image takes minutes, so this test never builds it: without podman or the image it
skips and says how to make it.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as th

from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from tests.conftest import free_port

pytestmark = pytest.mark.e2e
IMAGE = os.environ.get("BASTION_IMAGE", "localhost/bastion:latest")
TOKEN = "s3cret"
BUILD = "bash scripts/build-image.sh (about 5 minutes)"


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """podman with the global flags scripts/build-image.sh takes from BASTION_PODMAN_OPTS."""
    command = ["podman", *shlex.split(os.environ.get("BASTION_PODMAN_OPTS", "")), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=timeout)


@cache
def run_flags() -> tuple[str, ...]:
    """Flags `podman run` needs on this machine: none, or, where podman may not raise rlimits and
    crun refuses hybrid cgroups (a sandbox), runc with the machine's own limits, as
    scripts/build-image.sh chooses them."""
    if podman("run", "--rm", "--entrypoint", "true", IMAGE, check=False).returncode == 0:
        return ()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    flags = ("--runtime", "runc") if shutil.which("runc") else ()
    return (*flags, "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}")


def split_flags(flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``--runtime`` is a global podman flag; the rest belong to ``podman run``."""
    if flags[:1] == ("--runtime",):
        return list(flags[:2]), list(flags[2:])
    return [], list(flags)


@dataclass
class Container:
    name: str
    port: int
    grpc_port: int
    global_flags: list[str]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman(*self.global_flags, *args, check=check)

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    if shutil.which("podman") is None:
        pytest.skip(f"podman is not installed (apt-get install podman buildah; then {BUILD})")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built: {BUILD}")
    global_flags, flags = split_flags(run_flags())
    port, grpc_port = free_port(), free_port()
    box = Container(f"bastion-e2e-{port}", port, grpc_port, global_flags)
    try:
        # as ops/kubernetes runs it: a read-only root, no capabilities, a writable state volume
        box.podman(
            "run", "--detach", "--name", box.name, *flags,
            "--read-only", "--volume", "/var/lib/bastion", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--publish", f"127.0.0.1:{port}:8000", "--publish", f"127.0.0.1:{grpc_port}:8001",
            "--env", f"BASTION_ADMIN_TOKEN={TOKEN}", "--env", "BASTION_TORCH_THREADS=1",
            IMAGE,
        )  # fmt: skip
        wait_ready(box)
        yield box
    finally:
        box.podman("rm", "--force", "--volumes", "--time", "0", box.name, check=False)


def wait_ready(box: Container, timeout_s: float = 180) -> None:
    """Polls readiness with backoff; model loading and numba's first compile come first."""
    delay, deadline = 0.1, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = box.podman("inspect", "--format", "{{.State.Status}}", box.name).stdout.strip()
        if state not in ("created", "running"):
            pytest.fail(f"container {state} before it was ready:\n{box.logs()}")
        try:
            if httpx.get(f"http://{box.url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    pytest.fail(f"container not ready in {timeout_s} s:\n{box.logs()}")


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forty test digits spread over the classes (the split is ordered by class), their labels
    and the probabilities of the model called directly."""
    images, labels = load_split("test")
    pick = np.linspace(0, len(labels) - 1, 40).astype(int)
    x = to_float(images[pick])
    with torch.inference_mode():
        expected = torch.softmax(load_digits()(torch.from_numpy(x)), 1).numpy()
    return x, labels[pick], expected


def check_answers(probs: np.ndarray, labels: np.ndarray, expected: np.ndarray) -> None:
    """Withheld images (the screening's calibrated ~0.5 % of clean ones) get NaN; every other
    row is the model's own answer."""
    served = ~np.isnan(probs).any(axis=1)
    assert served.mean() >= 0.9
    np.testing.assert_allclose(probs[served], expected[served], atol=1e-5)
    assert (probs[served].argmax(1) == labels[served]).mean() >= 0.9


def test_tritonclient_http_gets_the_models_answers(container: Container) -> None:
    client = th.InferenceServerClient(container.url, network_timeout=60)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("digits")
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    index = client.get_model_repository_index()
    assert {e["name"] for e in index} >= {"digits", "digits_onnx"}  # the bundled repository
    x, labels, expected = digits()
    tensor = th.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(
        "digits",
        [tensor],
        parameters={"screening_report": True},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    check_answers(result.as_numpy("probabilities"), labels, expected)
    client.close()


def test_tritonclient_grpc_gets_the_models_answers(container: Container) -> None:
    client = tg.InferenceServerClient(container.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["outputs"][1] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": ["-1", "10"],
    }
    x, labels, expected = digits()
    tensor = tg.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(
        "digits",
        [tensor],
        parameters={"screening_report": True},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    check_answers(result.as_numpy("probabilities"), labels, expected)
    client.close()


def test_runs_as_uid_10001_with_state_under_var_lib(container: Container) -> None:
    assert container.podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    status = container.podman("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4  # the server itself: real, effective, saved, filesystem
    lines = container.podman("exec", container.name, "env").stdout.splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    durable = [
        f"BASTION_{name.upper()}" for name in Settings.model_fields if name.endswith("_path")
    ]
    assert durable  # every durable file on the writable state folder, as in ops/kubernetes
    assert {name: env.get(name, "")[:17] for name in durable} == dict.fromkeys(
        durable, "/var/lib/bastion/"
    )
    assert env["HOME"] == "/tmp" and env["BASTION_HOST"] == "0.0.0.0"


def test_the_images_healthcheck_passes(container: Container) -> None:
    config = container.podman(
        "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE
    ).stdout
    assert "/v2/health/ready" in config  # built with --format docker: OCI drops HEALTHCHECK
    result = container.podman("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
