"""A probing campaign is contained across rotating identities while an honest client is served."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.models import samples
from bastion.models.data import load_split, to_float
from tests.conftest import ARTIFACTS, CHROMIUM_FLAGS, ServerProcess, start_server, tool

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"
ATTACK: dict[str, Any] = {}  # what the campaign below was served, and one contained identity


def send(client: th.InferenceServerClient, image: np.ndarray, who: str) -> str:
    tensor = th.InferInput("images", [1, *image.shape], "FP32")
    tensor.set_data_from_numpy(image[None].astype(np.float32))
    try:
        client.infer("digits", [tensor], headers={"X-Client-ID": who})
    except InferenceServerException as exc:
        if "contained" in exc.message():
            return "contained"
        if "throttled" in exc.message():
            return "throttled"
        assert exc.status() == "403" and "withheld" in exc.message(), exc.message()
        return "withheld"
    return "served"


@pytest.fixture(scope="module")
def defended(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # a fixed salt: the walk below meets the same fingerprints on every run
    env = {"BASTION_DEFENCE": "true", "BASTION_ADMIN_TOKEN": TOKEN, "BASTION_FINGERPRINT_SALT": "7"}
    env["BASTION_ALERT_S"] = "900"  # the alert is off by default; an operator turns it on
    env["BASTION_ALERT_YOUNG_IMAGES"] = "50"  # honest-lab below sends 60: established
    proc = start_server(tmp_path_factory.mktemp("defended"), env=env)
    yield proc
    proc.stop()


def test_a_probing_campaign_is_contained_across_identities_and_honest_traffic_flows(
    defended: ServerProcess,
) -> None:
    server = defended
    images = to_float(load_split("test")[0])
    client = th.InferenceServerClient(server.url)
    rng = np.random.default_rng(0)
    probe = images[7].copy()
    answers: list[str] = []
    honest: list[str] = []
    for i in range(60):  # a decision-based walk: tiny sparse steps, a new identity every 3
        step = rng.random(probe.shape) < 0.005
        probe = np.where(step, np.clip(probe + rng.choice([-0.1, 0.1], probe.shape), 0, 1), probe)
        answers.append(send(client, probe, f"sybil-{i // 3}"))
        honest.append(send(client, images[100 + i], "honest-lab"))
    ATTACK["served"] = answers.count("served")
    listed = httpx.get(
        f"http://{server.url}/v2/admin/clients",
        params={"rung": "refuse"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    ).json()["clients"]
    # identities bound by their own probes (two, most of their images); a later one whose first
    # query continued the contained campaign is throttled instead, and its next ones get 429
    bound = [c["client"] for c in listed if c["client"].startswith("sybil-")]
    assert bound, listed
    members = [c for c in listed if c["client"] in bound]
    assert all(c["bound"] and c["campaign_rung"] == "refuse" for c in members), members
    assert all(c["last_seen_utc"].endswith("+00:00") for c in listed)
    ATTACK["contained"] = max(bound, key=lambda name: int(name.split("-")[1]))
    contained = {"contained", "throttled"}
    first = next(i for i, status in enumerate(answers) if status in contained)
    assert first <= 20, answers
    assert answers.count("withheld") <= 3, answers  # the walk stays clean: caught as probes
    after = answers[first + 3 :]  # from the first refusal, past one throttled interval
    # a new identity's first query is answered with 403 too: it is what links it to the campaign
    assert sum(status in contained for status in after) / len(after) >= 0.95, answers
    assert not contained & set(honest), honest
    assert honest.count("served") >= 58, honest


def test_an_honest_client_resending_the_same_digits_is_never_contained(
    defended: ServerProcess,
) -> None:
    """Retries are exact resends: the same bytes are no probe, whoever sends them."""
    images = to_float(load_split("test")[0])[300:310]
    client = th.InferenceServerClient(defended.url)
    statuses = [
        send(client, image, who)
        for _ in range(5)
        for image in images
        for who in ("retrying-app", "other-app")
    ]
    assert "contained" not in statuses and "throttled" not in statuses, statuses


def test_a_contained_client_is_refused_by_every_model_not_only_the_screened_one(
    defended: ServerProcess,
) -> None:
    """digits_onnx serves the same network unscreened: a contained client gets nothing there
    either (and an honest one is served)."""
    client = th.InferenceServerClient(defended.url)
    image = to_float(load_split("test")[0])[42]
    tensor = th.InferInput("images", [1, *image.shape], "FP32")
    tensor.set_data_from_numpy(image[None])
    with pytest.raises(InferenceServerException) as refused:
        client.infer("digits_onnx", [tensor], headers={"X-Client-ID": ATTACK["contained"]})
    assert refused.value.status() == "403" and "contained" in refused.value.message()
    served = client.infer("digits_onnx", [tensor], headers={"X-Client-ID": "honest-lab"})
    assert served.as_numpy("probabilities").shape == (1, 10)


def test_during_the_alert_a_fresh_identitys_suspicious_image_is_withheld(
    defended: ServerProcess,
) -> None:
    """The campaign above raised an alert: an identity with no history is on the strict policy
    (a suspicious image withheld), a client established before the attack is not."""
    client = th.InferenceServerClient(defended.url)
    images = to_float(load_split("test")[0])[600:1000]
    verdicts: list[str] = []
    for start in range(0, len(images), 50):  # the admin's report finds suspicious digits
        tensor = th.InferInput("images", [50, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[start : start + 50])
        result = client.infer(
            "digits",
            [tensor],
            parameters={"screening_report": True},
            headers={"Authorization": f"Bearer {TOKEN}", "X-Client-ID": "ops"},
        )
        verdicts += [v.decode() for v in result.as_numpy("screening_verdict")]
    suspicious = [i for i, v in enumerate(verdicts) if v.startswith("suspicious")]
    assert suspicious, verdicts
    assert "alert: campaign" in defended.log.read_text()
    image = images[suspicious[0]]
    assert send(client, image, "newcomer-during-alert") == "withheld"
    assert send(client, image, "honest-lab") == "served"


def test_an_admin_sees_the_campaign_and_lifts_it(defended: ServerProcess) -> None:
    """After the campaign above: the CLI lists it on the refuse rung, shows its evidence, and
    a release lets its clients in again (the token gates all of it)."""
    env = {**os.environ, "BASTION_URL": defended.url, "BASTION_ADMIN_TOKEN": TOKEN}
    cli = [sys.executable, "-m", "bastion.gateway", "clients"]

    def run(*args: str) -> str:
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sybil = ATTACK["contained"]
    listed = run("list", "--rung", "refuse")
    assert sybil in listed and "honest-lab" not in listed, run("list")
    shown = json.loads(run("show", sybil))  # an identity bound by its own probes
    assert shown["rung"] == "refuse" and shown["campaign_size"] >= 5 and shown["probes"] >= 2
    assert "released" in run("release", sybil)
    image = to_float(load_split("test")[0])[7]
    client = th.InferenceServerClient(defended.url)
    assert send(client, image, sybil) == "served"
    assert "now refuse" in defended.log.read_text()  # every transition logged with evidence
    anonymous = httpx.get(f"http://{defended.url}/v2/admin/clients", timeout=10)
    assert anonymous.status_code == 403
    other = to_float(load_split("test")[0])[400]  # a new picture: evidence for a new client
    assert send(client, other, "team/alice") == "served"  # a client id with a slash in it
    assert json.loads(run("show", "team/alice"))["client"] == "team/alice"
    assert "team/alice" in run("release", "team/alice")


def test_the_campaign_and_its_release_are_in_the_incident_log_which_verifies(
    defended: ServerProcess,
) -> None:
    """After the campaign and the admin's release above: each rung change, each identity
    joining the campaign and the release are entries of a log that verifies offline."""
    env = {**os.environ, **defended.incident_env()}
    done = subprocess.run(
        [sys.executable, "-m", "bastion.gateway", "incidents", "verify", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["ok"] and verdict["entries"] == verdict["witnessed"] >= 10
    conn = sqlite3.connect(defended.incident_env()["BASTION_INCIDENT_LOG_PATH"])
    rows = conn.execute("SELECT kind, actor, subject, body FROM log_entries").fetchall()
    conn.close()
    kinds = {kind for kind, *_ in rows}
    assert {"containment", "campaign", "release"} <= kinds, kinds
    released = [json.loads(body) for kind, actor, subject, body in rows if kind == "release"]
    assert any(ATTACK["contained"] in r["released"] for r in released)
    assert all(actor == "admin" for kind, actor, *_ in rows if kind == "release")
    rungs = {json.loads(b)["rung"] for k, _, s, b in rows if k == "containment" and "sybil" in s}
    assert "refuse" in rungs
    # the ledger: what each client was given, the attacker's refusals beside the honest answers
    ledger = sqlite3.connect(defended.incident_env()["BASTION_LEDGER_PATH"])
    outcomes = dict(
        ledger.execute(
            "SELECT client || ':' || outcome, COUNT(*) FROM served "
            "WHERE client = 'honest-lab' OR client LIKE 'sybil-%' GROUP BY 1"
        ).fetchall()
    )
    ledger.close()
    assert outcomes.get("honest-lab:served", 0) >= 58, outcomes
    refused = sum(n for key, n in outcomes.items() if key.startswith("sybil") and "refused" in key)
    # each late identity's first query (the one that continued the campaign); its next ones
    # were 429s at the door, before anything was computed or ledgered
    assert refused >= 12, outcomes


def test_the_impact_report_lists_exactly_what_the_attacker_was_served(
    defended: ServerProcess, tmp_path: Path
) -> None:
    """The campaign's incident, reported offline: its JSON lists every answer the sybils got
    (the walk's, and the one after the admin's release), no honest client among the
    involved; its page renders in headless Chromium (a screenshot is kept)."""
    env = {**os.environ, **defended.incident_env(), "BASTION_URL": defended.url}
    env["BASTION_ADMIN_TOKEN"] = TOKEN
    cli = [sys.executable, "-m", "bastion.gateway", "incidents"]
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True, timeout=60)
    line = next(row for row in listed.stdout.splitlines() if "contained" in row)
    incident = line.split()[0]
    done = subprocess.run(
        [*cli, "report", incident, "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / f"incident-{incident}.json").read_text())
    involved = report["clients_involved"]
    assert "sybil-0" in involved and ATTACK["contained"] in involved
    assert "sybil-19" in involved and "honest-lab" not in involved
    served = report["attacker_served"]
    assert all(r["client"].startswith("sybil-") and r["outcome"] == "served" for r in served)
    assert report["attacker_served_count"] == len(served) == ATTACK["served"] + 1, served
    assert report["campaign_outcomes"].get("refused", 0) >= 12
    page = tmp_path / f"incident-{incident}.html"
    chromium = tool("chromium")
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom",
         page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout  # fmt: skip
    assert 'data-ready="true"' in dom, dom[-2000:]
    # the drift report of the window, written beside it and linked
    drift = report["drift_report"]
    assert drift.get("file") == f"incident-{incident}-drift.html", drift
    assert 'id="bastion-drift"' in (tmp_path / drift["file"]).read_text()
    assert f'href="{drift["file"]}"' in dom
    points = dict(re.findall(r'id="(chart-[a-z]+)" data-points="(\d+)"', dom))
    assert set(points) == {"chart-requests", "chart-confidence", "chart-classes", "chart-clients"}
    assert all(int(n) > 0 for n in points.values()), points
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "incident-report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'shot'}",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000


def test_a_step_from_a_withheld_query_is_refused_again_not_answered(
    defended: ServerProcess,
) -> None:
    """Screening withholds an adversarial digit; the attacker's later small steps from it are
    refused as what they repeat (403, reason ``repeat``), never given the withheld answer."""
    adversarial, _ = samples.load("adversarial")
    client = th.InferenceServerClient(defended.url)
    reasons = []
    for i in range(3):
        step = adversarial[0].copy()
        step.flat[:i] += 0.002  # new bytes, the same picture
        tensor = th.InferInput("images", [1, *step.shape], "FP32")
        tensor.set_data_from_numpy(step[None].astype(np.float32))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("digits", [tensor], headers={"X-Client-ID": "stepper"})
        body = refused.value.message()
        assert refused.value.status() == "403", body
        reasons.append("repeat" if "nearly duplicates" in body else "screening")
    # the first is the screening's; the second is a one-off (screened afresh); the third
    # continues a linked, refused query
    assert reasons[0] == "screening" and reasons[2] == "repeat", reasons


def test_with_repeat_a_probe_gets_the_remembered_answer(tmp_path: Path) -> None:
    env = {"BASTION_DEFENCE": "true", "BASTION_PROBE_RESPONSE": "repeat"}
    proc = start_server(tmp_path, env=env)
    try:
        client = th.InferenceServerClient(proc.url)
        image = to_float(load_split("test")[0])[42]

        def probabilities(x: np.ndarray, who: str) -> np.ndarray:
            tensor = th.InferInput("images", [1, *x.shape], "FP32")
            tensor.set_data_from_numpy(x[None].astype(np.float32))
            result = client.infer("digits", [tensor], headers={"X-Client-ID": who})
            return result.as_numpy("probabilities")[0]

        first = probabilities(image, "a")
        step = image.copy()
        step[0, 14, 10:14] += 0.02  # an attacker's next query: new bytes, same picture
        assert np.array_equal(probabilities(step, "b"), first)  # nothing new to learn
        other = to_float(load_split("test")[0])[43]
        assert not np.array_equal(probabilities(other, "b"), first)  # a new picture: its own
    finally:
        proc.stop()
