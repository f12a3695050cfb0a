"""The two tiers end to end, with ``tritonclient``: a clean batch of 16 is answered, a
suspicious digit is served and recorded for review, an adversarial one is withheld."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import cache

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.gateway.backends import COMBINED, load_backend
from bastion.gateway.registry import run_batch
from bastion.gateway.repository import ModelRepository
from bastion.gateway.screening.policy import ADVERSARIAL, SUSPICIOUS
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models import samples
from bastion.models.data import load_split, to_float
from tests.conftest import ServerProcess, start_server
from tests.e2e.test_screening import ADMIN, adversarial_digits, infer

pytestmark = pytest.mark.e2e
SCRAPE_TOKEN = "scrape"
SCRAPE = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
MARGIN = 0.1  # keep clear of a tier's edge: batch composition moves a score by a few ulps


@cache
def offline() -> tuple[np.ndarray, dict[str, float]]:
    """The committed screening's combined score of every clean test digit, and the tiers."""
    backend = load_backend(ModelRepository(DEFAULT_REPOSITORY).config("digits"), 1, "cpu", 1)
    outputs, _ = run_batch(backend, [{"images": to_float(load_split("test")[0])}])
    return outputs[COMBINED], dict(backend.screening.thresholds)


def test_a_clean_batch_of_16_is_answered(server: ServerProcess) -> None:
    combined, cuts = offline()
    starts = [
        i
        for i in range(0, 1000 - 16, 16)
        if (combined[i : i + 16] < cuts[ADVERSARIAL] - MARGIN).all()
    ]
    images = to_float(load_split("test")[0])[starts[0] : starts[0] + 16]
    result = infer(th.InferenceServerClient(server.url), images, request_id="clean-16")
    assert result.as_numpy("probabilities").shape == (16, 10)
    assert np.isfinite(result.as_numpy("probabilities")).all()


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A gateway run as a team should: admin and metrics tokens set."""
    proc = start_server(
        tmp_path_factory.mktemp("tiers"),
        env={"BASTION_ADMIN_TOKEN": "s3cret", "BASTION_METRICS_TOKEN": SCRAPE_TOKEN},
    )
    yield proc
    proc.stop()


def test_a_suspicious_digit_is_served_and_recorded_for_review(operated: ServerProcess) -> None:
    server = operated
    combined, cuts = offline()
    between = (combined > cuts[SUSPICIOUS] + MARGIN) & (combined < cuts[ADVERSARIAL] - MARGIN)
    index = int(np.flatnonzero(between)[0])
    image = to_float(load_split("test")[0][index : index + 1])
    client = th.InferenceServerClient(server.url)
    result = infer(client, image, request_id="suspicious-1", headers={"X-Client-ID": "carol"})
    assert result.as_numpy("probabilities").shape == (1, 10)  # served like any other
    assert "screening" not in str(result.get_response())  # nothing tells the client
    url = f"http://{server.url}"
    deadline, found = time.monotonic() + 10, []
    while not found and time.monotonic() < deadline:  # written off the response path
        listing = httpx.get(
            f"{url}/v2/quarantine", params={"status": "review"}, headers=ADMIN, timeout=10
        ).json()
        found = [r for r in listing["items"] if r["request_id"] == "suspicious-1"]
        time.sleep(0.1)
    (record,) = found
    assert (record["client_id"], record["verdict"], record["status"]) == (
        "carol",
        "suspicious",
        "review",
    )
    score = record["scores"]["combined"]
    assert cuts[SUSPICIOUS] < score <= cuts[ADVERSARIAL]
    assert set(record["scores"]) == {
        "feature_squeezing",
        "confidence_margin",
        "gradient_norm",
        "mahalanobis",
        "combined",
    }
    stored = httpx.get(f"{url}/v2/quarantine/{record['id']}", headers=ADMIN, timeout=10).json()
    data = np.asarray(stored["input"]["data"], np.float32).reshape(stored["input"]["shape"])
    np.testing.assert_array_equal(data, image[0])
    metrics = httpx.get(f"{url}/metrics", headers=SCRAPE, timeout=10).text
    assert 'action="review",model="digits",verdict="suspicious",version="1"' in metrics
    assert (
        'bastion_screening_reviews_total{model="digits",outcome="written",version="1"}' in metrics
    )
    assert (
        'bastion_screening_target_fpr{model="digits",tier="adversarial",version="1"} 0.005'
        in metrics
    )


def test_an_adversarial_digit_is_withheld(server: ServerProcess) -> None:
    client = th.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as err:
        infer(client, adversarial_digits()[:1], request_id="adv-tier")
    assert err.value.status() == "403" and "withheld" in err.value.message()


def test_the_readme_samples_get_one_answer_per_tier(server: ServerProcess) -> None:
    """The README's example digits (``models/samples``): clean and suspicious are served on
    every run, adversarial is refused."""
    client = th.InferenceServerClient(server.url)
    for kind in ("clean", "suspicious"):
        x, labels = samples.load(kind)
        predicted = infer(client, x).as_numpy("probabilities").argmax(1)
        if kind == "clean":
            assert (predicted == labels).all()
    x, _ = samples.load("adversarial")
    with pytest.raises(InferenceServerException) as err:
        infer(client, x)
    assert err.value.status() == "403" and "images [0, 1] withheld" in err.value.message()


def test_nothing_public_tells_a_suspicious_image_from_a_clean_one(server: ServerProcess) -> None:
    """A public count of the review tier would be an oracle: a prober could learn, one query at
    a time, when it sits between the tiers. /metrics (no token set here) and the dashboard's
    data count a served suspicious image as clean; the review path and the store are private."""
    url = f"http://{server.url}"
    x, _ = samples.load("suspicious")
    infer(th.InferenceServerClient(server.url), x)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'verdict="clean"' in metrics
    for private in (
        "suspicious",
        "bastion_screening_reviews",
        "bastion_quarantine_records",
        "bastion_screening_target_fpr",
        "bastion_screening_tiers",
    ):
        assert private not in metrics, private
    time.sleep(2.5)  # a dashboard sample
    public = httpx.get(f"{url}/dashboard/api/summary", timeout=10).json()
    assert "suspicious" not in public["series"]["verdicts_per_s"]
    operator = httpx.get(f"{url}/dashboard/api/summary", headers=ADMIN, timeout=10).json()
    assert "suspicious" in operator["series"]["verdicts_per_s"]
