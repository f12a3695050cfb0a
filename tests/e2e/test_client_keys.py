"""Client keys end to end: the CLI makes a key, tritonclient sends it, revocation bites at once."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.models import samples
from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path, env={"BASTION_ADMIN_TOKEN": TOKEN})
    yield proc
    proc.stop()


def cli(server: ServerProcess, *args: str) -> str:
    env = {**os.environ, "BASTION_URL": server.url, "BASTION_ADMIN_TOKEN": TOKEN}
    done = subprocess.run(
        [sys.executable, "-m", "bastion.gateway", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def infer(server: ServerProcess, headers: dict[str, str] | None = None) -> np.ndarray:
    x, _ = samples.load("clean")
    tensor = th.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = th.InferenceServerClient(server.url)
    return client.infer("digits", [tensor], headers=headers).as_numpy("probabilities")


def grpc_status(server: ServerProcess, headers: dict[str, str] | None = None) -> str:
    """The status tritonclient.grpc reports for one inference ("OK" when served)."""
    x, _ = samples.load("clean")
    tensor = tg.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        client.infer("digits", [tensor], headers=headers)
    except InferenceServerException as exc:
        return str(exc.status())
    finally:
        client.close()
    return "OK"


def test_once_a_key_exists_inference_needs_one_and_revocation_bites_at_once(
    keyed: ServerProcess,
) -> None:
    assert infer(keyed).shape == (16, 10)  # no key configured: the embedded default is open
    assert "no keys" in cli(keyed, "list")  # said, not an empty screen
    made = cli(keyed, "create", "--client", "orders-service", "--note", "e2e")
    fields = dict(line.split(maxsplit=1) for line in made.splitlines())
    key, key_id = fields["key"], fields["id"]
    with pytest.raises(InferenceServerException) as err:
        infer(keyed)
    assert err.value.status() == "401" and "client key" in err.value.message()
    raw = httpx.post(f"http://{keyed.url}/v2/models/digits/infer", json={"inputs": []})
    assert raw.status_code == 401 and raw.headers["www-authenticate"].startswith("Bearer")
    assert raw.json()["error"]
    assert infer(keyed, {"Authorization": f"Bearer {key}"}).shape == (16, 10)
    assert infer(keyed, {"Authorization": f"Bearer {TOKEN}"}).shape == (16, 10)  # the admin
    assert grpc_status(keyed) == "StatusCode.UNAUTHENTICATED"  # gRPC: the key in metadata
    assert grpc_status(keyed, {"x-client-id": "orders-service"}) == "StatusCode.UNAUTHENTICATED"
    assert grpc_status(keyed, {"authorization": f"Bearer {key}"}) == "OK"
    with pytest.raises(InferenceServerException, match="401"):  # a claimed id is no key
        infer(keyed, {"X-Client-ID": "orders-service"})
    listed = cli(keyed, "list")
    assert listed.startswith("id ") and "no keys" not in listed
    assert key_id in listed and "orders-service" in listed and key not in listed
    assert "revoked" in cli(keyed, "revoke", key_id)
    with pytest.raises(InferenceServerException, match="401"):
        infer(keyed, {"Authorization": f"Bearer {key}"})
    assert grpc_status(keyed, {"authorization": f"Bearer {key}"}) == "StatusCode.UNAUTHENTICATED"
    assert httpx.get(f"http://{keyed.url}/v2/admin/keys", timeout=10).status_code == 403
    conn = sqlite3.connect(keyed.incident_env()["BASTION_INCIDENT_LOG_PATH"])
    logged = conn.execute("SELECT kind, actor, subject, body FROM log_entries").fetchall()
    conn.close()
    # each key decision is in the incident log by id and client, never the key itself
    assert [row[:3] for row in logged if row[0].startswith("key_")] == [
        ("key_created", "admin", key_id),
        ("key_revoked", "admin", key_id),
    ]
    assert all(key not in body for *_, body in logged)
    assert all("orders-service" in row[3] for row in logged if row[0].startswith("key_"))


def test_the_key_names_the_client_in_the_evidence(keyed: ServerProcess) -> None:
    key = dict(
        line.split(maxsplit=1) for line in cli(keyed, "create", "--client", "carol").splitlines()
    )["key"]
    x, _ = samples.load("suspicious")
    tensor = th.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = th.InferenceServerClient(keyed.url)
    client.infer(
        "digits",
        [tensor],
        headers={
            "Authorization": f"Bearer {key}",
            "X-Client-ID": "someone-else",  # ignored: keys rule
        },
    )
    admin = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(100):
        items = httpx.get(
            f"http://{keyed.url}/v2/quarantine",
            params={"status": "review"},
            headers=admin,
            timeout=10,
        ).json()["items"]
        if len(items) == 2:
            break
        import time

        time.sleep(0.1)
    assert {item["client_id"] for item in items} == {"carol"}


def test_behind_an_authenticating_proxy_the_client_header_is_believed(tmp_path: Path) -> None:
    from bastion.gateway.identity.keys import SQLiteKeyStore

    keys = tmp_path / "keys.db"
    store = SQLiteKeyStore(keys)
    store.create("some-client")
    store.close()
    env = {"BASTION_KEYS_PATH": str(keys), "BASTION_TRUST_CLIENT_HEADER": "true"}
    proxied = start_server(tmp_path, env=env)
    try:
        assert infer(proxied, {"X-Client-ID": "tenant-7"}).shape == (16, 10)
        with pytest.raises(InferenceServerException, match="401"):  # the proxy must name one
            infer(proxied)
    finally:
        proxied.stop()


def test_two_gateways_on_one_postgres_share_their_keys(tmp_path: Path, postgres_db: str) -> None:
    """Replicas with ``BASTION_DATABASE_URL``: a key made through one works on the other, and
    its revocation through that one stops it on the first within the refresh (1 s)."""
    import time

    env = {"BASTION_ADMIN_TOKEN": TOKEN, "BASTION_DATABASE_URL": postgres_db}
    env["BASTION_INCIDENT_KEY_PATH"] = str(tmp_path / "incident.key")  # replicas share it
    first = start_server(tmp_path, env=env)
    second = start_server(tmp_path, env=env)
    try:
        made = cli(first, "create", "--client", "orders-service")
        fields = dict(line.split(maxsplit=1) for line in made.splitlines())
        bearer = {"Authorization": f"Bearer {fields['key']}"}
        deadline = time.monotonic() + 5
        while grpc_status(second) != "StatusCode.UNAUTHENTICATED":  # it re-reads within 1 s
            assert time.monotonic() < deadline, "the key never reached the other replica"
            time.sleep(0.1)
        grpc_bearer = {"authorization": bearer["Authorization"]}  # gRPC metadata is lower case
        assert grpc_status(second, grpc_bearer) == "OK"  # made on the first, valid here
        with pytest.raises(InferenceServerException, match="401"):
            infer(second)  # keys configured on both: a request without one is refused
        assert "revoked" in cli(second, "revoke", fields["id"])
        revoked_at = time.monotonic()
        while True:
            try:
                infer(first, bearer)
            except InferenceServerException as exc:
                assert exc.status() == "401"
                break
            assert time.monotonic() - revoked_at < 2.0, "revocation did not reach the replica"
            time.sleep(0.05)
    finally:
        first.stop()
        second.stop()
    assert not list(tmp_path.glob("keys-*.db"))  # no replica kept keys of its own


def test_with_keys_on_a_stream_without_one_is_refused_when_it_opens(keyed: ServerProcess) -> None:
    """A keyless ModelStreamInfer is UNAUTHENTICATED at once, before any request: it never
    holds one of the gateway's gRPC call slots."""
    import time

    import grpc

    cli(keyed, "create", "--client", "orders-service")

    def nothing() -> Iterator[bytes]:
        time.sleep(5)
        yield from ()

    with grpc.insecure_channel(keyed.grpc_url) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stream(nothing(), timeout=20))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 4
