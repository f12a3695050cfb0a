"""``bastion attack-sim`` against a real gateway: the blocks, metrics and quarantine it fires."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.gateway.attack_sim import format_report, simulate
from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret"
ATTACKER = "mallory-sim"


def block_verdicts(server: ServerProcess) -> float:
    """``bastion_screening_verdicts_total`` with action block, summed over versions and verdicts."""
    text = httpx.get(f"http://{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bastion_screening_verdicts_total"
        and sample.labels.get("action") == "block"
        and sample.labels.get("model") == "digits"
    )


@pytest.fixture
def quarantine_server(repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    config = repository / "digits" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('string_value: "block"', 'string_value: "quarantine"'))
    # what the quarantine records: the stateful defence (its own tests) would contain the
    # simulated attacker part-way and leave fewer records to count
    env = {"BASTION_ADMIN_TOKEN": TOKEN, "BASTION_DEFENCE": "false"}
    proc = start_server(tmp_path, "--model-repository", str(repository), env=env)
    yield proc
    proc.stop()


def test_simulated_attack_is_blocked_at_the_requested_rate_and_counted(
    server: ServerProcess,
) -> None:
    before = block_verdicts(server)
    report = simulate(
        server.url, rate_per_s=40, duration_s=4, adversarial_fraction=0.25, attacker_id=ATTACKER
    )
    print(format_report(report))
    assert 150 <= report.sent <= 160  # floor(40 * 4), never more
    assert report.elapsed_s < 4 + 3  # open loop: the schedule does not wait for answers
    assert report.counts["adversarial"]["error"] == report.counts["clean"]["error"] == 0
    assert sum(report.counts["adversarial"].values()) == 40
    assert report.block_rate >= 0.85, report.counts
    assert report.false_block_rate <= 0.15, report.counts
    blocked = report.counts["adversarial"]["blocked"] + report.counts["clean"]["blocked"]
    contained = report.counts["adversarial"]["contained"] + report.counts["clean"]["contained"]
    # a request refused by the stateful defence after its batch ran (the query that contained
    # its sender) has a verdict counted too; one refused at the door has none
    assert blocked <= block_verdicts(server) - before <= blocked + contained


def test_quarantined_attack_traffic_carries_the_attackers_client_id(
    quarantine_server: ServerProcess,
) -> None:
    report = simulate(
        quarantine_server.url,
        rate_per_s=40,
        duration_s=10,
        adversarial_fraction=0.5,
        clients=3,
        attacker_id=ATTACKER,
        seed=1,
        max_requests=60,
    )
    assert report.sent == 60 and report.counts["adversarial"]["blocked"] >= 25
    listing = httpx.get(
        f"http://{quarantine_server.url}/v2/quarantine",
        headers={"Authorization": f"Bearer {TOKEN}"},
        params={"limit": 1000, "status": "quarantined"},  # not the served review copies
        timeout=10,
    ).json()
    by_client = Counter(item["client_id"] for item in listing["items"])
    assert listing["total"] == len(listing["items"])
    assert by_client[ATTACKER] == report.counts["adversarial"]["blocked"]
    honest = {f"client-{i}" for i in range(1, 4)}
    assert set(by_client) - {ATTACKER} <= honest
    assert sum(by_client[c] for c in honest) == report.counts["clean"]["blocked"]
