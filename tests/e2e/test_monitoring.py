"""Monitoring end to end: drift on a live gateway, a real Prometheus scraping it with our alert
rules and Grafana queries, and the built-in dashboard rendered by headless Chromium."""

from __future__ import annotations

import contextlib
import html
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bastion.models.data import load_split, to_float
from tests.conftest import ARTIFACTS, CHROMIUM_FLAGS, ServerProcess, free_port, start_server, tool

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
CLEAN_IMAGES = 400


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


class Traffic(threading.Thread):
    """Clean digits first, then noisy ones until stopped; two images a request, and a request for
    an unknown model now and then (an error for the error panels)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        images = to_float(load_split("test")[0])
        self.clean = images[np.random.default_rng(0).permutation(len(images))]
        noise = np.random.default_rng(1).normal(0, 0.15, self.clean.shape).astype(np.float32)
        self.noisy = np.clip(self.clean + noise, 0, 1)
        self.client = th.InferenceServerClient(url)
        self.stopped = threading.Event()
        self.sent = 0

    def send(self, model: str, images: np.ndarray) -> None:
        tensor = th.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        # screening's 403 and the unknown model's 404 are expected
        with contextlib.suppress(InferenceServerException):
            self.client.infer(model, [tensor])
        self.sent += len(images)

    def run(self) -> None:
        i = 0
        while not self.stopped.is_set():
            pool = self.clean if self.sent < CLEAN_IMAGES else self.noisy
            start = i % (len(pool) - 2)
            self.send("digits", pool[start : start + 2])
            if i % 25 == 0:
                self.send("no_such_model", pool[:1])
            i += 1
            time.sleep(0.005)


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


@dataclass
class Live:
    server: ServerProcess
    prometheus: Prometheus
    traffic: Traffic


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("monitoring")
    server = start_server(
        folder,
        env={
            "BASTION_DRIFT_HOP_IMAGES": "100",
            "BASTION_DRIFT_MIN_IMAGES": "200",
            "BASTION_DRIFT_MMD_PERMUTATIONS": "200",
            "BASTION_DRIFT_MMD_ALPHA": "0.01",
            # as a team should run it: the tiers and the store's usage are behind the token
            "BASTION_METRICS_TOKEN": "scrape-token",
        },
    )
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(OPS / 'prometheus' / 'alerts.yml'))}]\n"
        "scrape_configs:\n"
        f"  - job_name: bastion\n    static_configs: [{{targets: ['{server.url}']}}]\n"
        "    authorization: {credentials: scrape-token}\n"
    )
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}")
    traffic = Traffic(server.url)
    try:
        wait_for(lambda: _up(prometheus), "Prometheus to scrape the gateway")
        traffic.start()
        yield Live(server, prometheus, traffic)
    finally:
        traffic.stopped.set()
        if traffic.is_alive():
            traffic.join(timeout=10)
        process.terminate()
        process.wait(timeout=20)
        server.stop()


def _up(prometheus: Prometheus) -> bool:
    """Prometheus is ready (its API answers 503 before) and has scraped the gateway."""
    try:
        if httpx.get(f"{prometheus.url}/-/ready", timeout=5).status_code != 200:
            return False
        result = prometheus.query('up{job="bastion"}')
    except httpx.HTTPError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


def drift_state(live: Live) -> dict[str, Any]:
    return httpx.get(f"http://{live.server.url}/v2/models/digits/drift", timeout=10).json()


def test_noise_raises_a_drift_alarm_in_the_api_metrics_and_log(live: Live) -> None:
    state = wait_for(
        lambda: (s := drift_state(live))["alarm"] and "psi_pixel_mean" in s["active"] and s,
        "a drift alarm on noisy digits",
    )
    raised = [e for e in state["events"] if e["kind"] == "raised"]
    assert raised and all(e["threshold"] > 0 and e["window_images"] >= 200 for e in raised)
    assert min(e["at_image"] for e in raised if e["statistic"] == "psi_pixel_mean") > CLEAN_IMAGES
    assert state["reference"]["samples"] == 1000
    scrape = {"Authorization": "Bearer scrape-token"}
    metrics = httpx.get(f"http://{live.server.url}/metrics", headers=scrape, timeout=10).text
    assert 'bastion_drift_alarm{model="digits",version="1"} 1.0' in metrics
    assert re.search(r'bastion_drift_score\{model="digits",statistic="psi_pixel_mean"', metrics)
    assert "drift alarm raised: model digits" in live.server.log.read_text()


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    rules = OPS / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        run = subprocess.run([promtool, *args], cwd=rules, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"], cwd=rules, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def grafana_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((OPS / "grafana" / "bastion-dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "15s").replace("$model", ".+")
            queries.append((panel["title"], expr))
    return queries


def test_prometheus_scrapes_the_gateway_and_every_grafana_query_returns_data(live: Live) -> None:
    wait_for(lambda: drift_state(live)["alarm"], "a drift alarm")
    queries = grafana_queries()
    assert len(queries) >= 12

    def finite(expr: str) -> bool:
        values = [float(r["value"][1]) for r in live.prometheus.query(expr)]
        return any(np.isfinite(v) for v in values)

    for title, expr in queries:
        wait_for(lambda expr=expr: finite(expr), f"data for panel {title!r}: {expr}", 30)


def test_prometheus_evaluates_the_drift_alert_on_the_gateways_metrics(live: Live) -> None:
    def drift_alert() -> bool:
        response = httpx.get(f"{live.prometheus.url}/api/v1/alerts", timeout=10).json()
        alerts = response["data"]["alerts"]
        return any(a["labels"]["alertname"] == "BastionDrift" for a in alerts)

    wait_for(drift_alert, "BastionDrift to be pending or firing", 60)


def test_dashboard_page_and_assets_come_only_from_the_gateway(live: Live) -> None:
    base = f"http://{live.server.url}"
    page = httpx.get(f"{base}/dashboard", timeout=10)
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    for asset in re.findall(r'(?:src|href)="(/dashboard/assets/[^"]+)"', page.text):
        assert httpx.get(base + asset, timeout=10).status_code == 200
    missing = httpx.get(f"{base}/dashboard/assets/settings.py", timeout=10)
    assert missing.status_code == 404 and "no dashboard asset" in missing.json()["error"]
    escape = httpx.get(f"{base}/dashboard/assets/..%2F..%2Fsettings.py", timeout=10)
    assert escape.status_code == 404 and "BaseSettings" not in escape.text


def test_dashboard_draws_live_charts_in_headless_chromium(live: Live, tmp_path: Path) -> None:
    chromium = tool("chromium")
    wait_for(lambda: drift_state(live)["alarm"], "a drift alarm")
    time.sleep(3)  # a few sampler intervals of traffic for the time series
    url = f"http://{live.server.url}/dashboard"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-ready="true"' in dom, dom[-2000:]
    charts = dict(re.findall(r'id="(chart-[a-z]+)"[^>]*data-points="(\d+)"', dom))
    expected = {
        "rps",
        "latency",
        "errors",
        "batch",
        "verdicts",
        "containment",
        "drift",
        "confidence",
        "classes",
    }
    assert set(charts) == {f"chart-{name}" for name in expected}
    empty = [name for name, points in charts.items() if int(points) == 0]
    assert not empty, f"charts without data: {empty}"
    attrs = {
        name: dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))
        for name, tag in re.findall(r'id="(chart-[a-z]+)"([^>]*)>', dom)
    }
    for name in ("rps", "latency", "errors", "verdicts", "drift"):  # time axes: minutes, not years
        assert 120 <= float(attrs[f"chart-{name}"]["x-span"]) < 86400, (
            name,
            attrs[f"chart-{name}"],
        )
    colours = json.loads(html.unescape(attrs["chart-verdicts"]["colors"]))
    assert colours.get("served", colours.get("clean")) == "#16a34a"  # clean is green
    assert colours.get("withheld", colours.get("adversarial")) == "#dc2626"  # withheld is red
    labels = json.loads(html.unescape(attrs["chart-confidence"]["labels"]))
    assert len(labels) >= 10 and labels[-1].endswith("100%")  # the last bin is labelled
    assert re.search(r'id="status" class="badge alarm">drift: digits', dom)
    events = dom.split('<table id="events">')[1].split("</tbody>")[0]
    assert "<td>psi_pixel_mean</td>" in events and '<td class="raised">raised</td>' in events
    # incidents only for an operator: the drift alarm opened one, from the incident log
    assert 'id="incidents-note" class="note">' in dom
    assert 'data-rows="0"' in dom.split('id="incidents"')[1]
    operator = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'op'}", "--dump-dom",
         f"{url}#token=scrape-token"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout  # fmt: skip
    incidents = operator.split('<table id="incidents">')[1].split("</tbody>")[0]
    assert re.search(r'data-rows="[1-9]', incidents), incidents
    assert "drift alarm: digits:1" in incidents and '<td class="open">open</td>' in incidents
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'shot'}",
            f"--screenshot={screenshot}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1280, 1900)
        colours = image.convert("RGB").resize((320, 475)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # drawn charts, not a blank page
