"""With ``BASTION_METRICS_TOKEN`` set, /metrics needs it, and only then shows detector scores."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess, start_server
from tests.security.harness import assert_live, digit_json, response_error, under_attack

pytestmark = pytest.mark.e2e
METRICS_TOKEN = "m3trics"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"BASTION_METRICS_TOKEN": METRICS_TOKEN}
    proc = start_server(tmp_path_factory.mktemp("metrics"), env=env)
    yield proc
    proc.stop()


def test_metrics_need_the_token_and_only_then_show_scores(server: ServerProcess) -> None:
    with httpx.Client(base_url=f"http://{server.url}", timeout=30) as client:
        assert client.post("/v2/models/digits/infer", json=digit_json()).status_code in (200, 403)
        for authorization in (None, "Bearer wrong", f"Basic {METRICS_TOKEN}", METRICS_TOKEN):
            headers = {} if authorization is None else {"Authorization": authorization}
            responses, probes = under_attack(
                server, lambda h=headers: client.get("/metrics", headers=h), min_s=0.2
            )
            for response in responses:
                assert "metrics token" in response_error(response, 403)
                assert "bastion_" not in response.text
            assert_live(probes)
        scrape = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scrape.status_code == 200
        assert "bastion_screening_score_bucket" in scrape.text  # the request above, per detector
        assert "bastion_screening_threshold" not in scrape.text
