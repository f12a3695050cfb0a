"""Drift detection delay and false alarms, replayed through a live gateway.

    python -m bastion.benchmarks.drift [--clean 50000] [--max-shifted 3000]

Starts ``bastion serve`` on the bundled repository with its default drift settings, then:

1. sends ``--clean`` clean test digits (shuffled epochs of the test split, one per request) and
   counts every drift alarm raised: each is a false alarm;
2. for each scenario, sends 1,000 clean digits (the alarm must be clear), notes the images the
   model has seen (the onset), then sends shifted digits until an alarm is raised; the delay is
   the image count in the raising event minus the onset, so it counts exactly the shifted
   requests the gateway had served when it raised the alarm. Then clean digits until it clears.

Scenarios: Gaussian pixel noise, a brightness shift, small random rotations, and a 10 %
adversarial mix sent by ``bastion attack-sim`` (PGD-L∞ ε 0.3 under an attacker's client id).
Results go to ``benchmarks/results/drift.{json,md}``, and a screenshot of the built-in dashboard
after the run to ``benchmarks/results/dashboard.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import torch.nn.functional as F

from bastion.benchmarks import procs
from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.workload import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
MODEL = "digits"
WORKERS = 16
CHUNK = 50  # requests between two looks at the drift state


def noise(images: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 1).astype(np.float32)


def brightness(images: np.ndarray, rng: np.random.Generator, delta: float) -> np.ndarray:
    return np.clip(images + delta, 0, 1).astype(np.float32)


def rotation(images: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Each image turned by its own angle, uniform in ±``degrees``, bilinear, zero fill."""
    angles = torch.from_numpy(rng.uniform(-degrees, degrees, len(images))) * math.pi / 180
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    x = torch.from_numpy(images)
    grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False).clamp(0, 1).numpy()


SCENARIOS: dict[str, tuple[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]] = {
    "noise": ("Gaussian pixel noise, sd 0.1", lambda x, r: noise(x, r, 0.1)),
    "brightness": ("brightness +0.1 on every pixel", lambda x, r: brightness(x, r, 0.1)),
    "rotation": ("random rotation, uniform in ±20°", lambda x, r: rotation(x, r, 20.0)),
    "rotation-10": ("random rotation, uniform in ±10°", lambda x, r: rotation(x, r, 10.0)),
}


class Sender:
    """One image per request through ``tritonclient``, one client per worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="drift-bench")

    def _send(self, image: np.ndarray) -> int:
        import tritonclient.http as th
        from tritonclient.utils import InferenceServerException

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = th.InferenceServerClient(self.url)
        tensor = th.InferInput("images", [1, *image.shape], "FP32")
        tensor.set_data_from_numpy(image[None])
        try:
            client.infer(MODEL, [tensor])
        except InferenceServerException as exc:
            return int(exc.status() or 0)
        return 200

    def send(self, images: np.ndarray) -> list[int]:
        return list(self._pool.map(self._send, images))

    def close(self) -> None:
        self._pool.shutdown()


class Gateway:
    def __init__(self, url: str) -> None:
        self.url = url

    def drift(self) -> dict[str, Any]:
        return httpx.get(f"http://{self.url}/v2/models/{MODEL}/drift", timeout=30).json()


def clean_epochs(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` images as shuffled passes over the pool (no image twice within a pass)."""
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(count // len(pool) + 1)])
    return pool[order[:count]]


@dataclass
class ScenarioResult:
    name: str
    description: str
    onset_image: int
    detected: bool
    delay_requests: int | None  # shifted requests served when the first alarm was raised
    first_statistics: list[str]  # statistics raised by that first window
    raised_within_sent: list[str]  # every statistic raised before the replay stopped
    sent: int
    clear_requests: int | None  # clean requests after the shift until no alarm was active


def raised_after(state: dict[str, Any], onset: int) -> list[dict[str, Any]]:
    return [e for e in state["events"] if e["kind"] == "raised" and e["at_image"] > onset]


def settle(gateway: Gateway, sender: Sender, pool: np.ndarray, rng: np.random.Generator) -> int:
    """At least 1,000 clean requests, and more until no alarm is active; returns how many clean
    requests it took for the alarm to clear (to within a chunk)."""
    sent, cleared = 0, None if gateway.drift()["alarm"] else 0
    while cleared is None or sent < 1000:
        sender.send(clean_epochs(pool, CHUNK, rng))
        sent += CHUNK
        if cleared is None and not gateway.drift()["alarm"]:
            cleared = sent
        if sent > 10_000:
            raise RuntimeError("the drift alarm did not clear in 10,000 clean requests")
    return cleared


def run_shift(
    gateway: Gateway,
    sender: Sender,
    stream: Callable[[int], np.ndarray],
    budget: int,
    max_shifted: int,
) -> tuple[int, list[dict[str, Any]], int]:
    """Sends ``budget`` shifted requests, and more up to ``max_shifted`` while no alarm has been
    raised; returns (onset, the first raising events, requests sent)."""
    onset = gateway.drift()["images_seen"]
    sent, events = 0, []
    while sent < budget or (not events and sent < max_shifted):
        sender.send(stream(CHUNK))
        sent += CHUNK
        events = raised_after(gateway.drift(), onset)
    first = min((e["at_image"] for e in events), default=None)
    return onset, [e for e in events if e["at_image"] == first], sent


def attack_sim_stream(url: str, requests: int, seed: int) -> None:
    """The 10 % adversarial mix, sent by the ``bastion attack-sim`` command itself."""
    command = [
        str(Path(sys.executable).with_name("bastion")),
        "attack-sim",
        "--url",
        f"http://{url}",
        "--rate",
        "300",
        "--duration",
        str(requests / 300 + 1),
        "--max-requests",
        str(requests),
        "--adversarial-fraction",
        "0.1",
        "--seed",
        str(seed),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)


def scenario_result(
    name: str,
    description: str,
    onset: int,
    events: list[dict[str, Any]],
    sent: int,
    state: dict[str, Any],
) -> ScenarioResult:
    first = min((e["at_image"] for e in events), default=None)
    raised = raised_after(state, onset)
    return ScenarioResult(
        name=name,
        description=description,
        onset_image=onset,
        detected=first is not None,
        delay_requests=None if first is None else first - onset,
        first_statistics=sorted(e["statistic"] for e in events if e["at_image"] == first),
        raised_within_sent=sorted({e["statistic"] for e in raised}),
        sent=sent,
        clear_requests=None,
    )


def dashboard_screenshot(url: str, target: Path) -> bool:
    chromium = shutil.which("chromium")
    if chromium is None:
        return False
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,1900",
                "--virtual-time-budget=6000",
                f"--screenshot={target}",
                f"http://{url}/dashboard",
            ],
            capture_output=True,
            timeout=120,
        )
    return run.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", type=int, default=50_000, help="clean requests for false alarms")
    parser.add_argument("--shifted", type=int, default=1000, help="shifted requests per scenario")
    parser.add_argument(
        "--max-shifted", type=int, default=3000, help="more while undetected, up to this many"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from bastion.models.data import load_split, to_float

    pool = to_float(load_split("test")[0])
    rng = np.random.default_rng(0)
    workdir = Path(tempfile.mkdtemp(prefix="bastion-drift-"))
    port = procs.free_port_block(1)
    url = f"127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("bastion")), "serve", "--port", str(port)]
    env = {
        "BASTION_TORCH_THREADS": "1",
        **procs.private_state(workdir),
        "OMP_NUM_THREADS": "1",
    }
    server = procs.start("bastion", command, env, f"http://{url}", workdir / "server.log")
    sender = Sender(url)
    gateway = Gateway(url)
    try:
        procs.wait_ready(server, lambda: procs.http_ok(f"http://{url}/v2/health/ready"), 120)
        config = gateway.drift()["config"]
        started = time.monotonic()
        for offset in range(0, args.clean, 1000):
            sender.send(clean_epochs(pool, min(1000, args.clean - offset), rng))
        clean_s = time.monotonic() - started
        clean_state = gateway.drift()
        false_alarms = raised_after(clean_state, 0)
        print(
            f"clean: {args.clean} requests in {clean_s:.0f} s, {clean_state['windows']} windows, "
            f"{len(false_alarms)} false alarms"
        )
        results = []
        for name, (description, shift) in SCENARIOS.items():
            settle(gateway, sender, pool, rng)
            onset, events, sent = run_shift(
                gateway,
                sender,
                lambda n, shift=shift: shift(clean_epochs(pool, n, rng), rng),
                args.shifted,
                args.max_shifted,
            )
            result = scenario_result(name, description, onset, events, sent, gateway.drift())
            result.clear_requests = settle(gateway, sender, pool, rng)
            results.append(result)
            print(_row(result))
        settle(gateway, sender, pool, rng)
        onset = gateway.drift()["images_seen"]
        attack_sim_stream(url, args.shifted, seed=1)
        state = gateway.drift()
        events = raised_after(state, onset)
        first = min((e["at_image"] for e in events), default=None)
        adversarial = scenario_result(
            "adversarial-10%",
            "10 % PGD-L∞ ε 0.3 digits among clean ones (bastion attack-sim, 300 rps)",
            onset,
            [e for e in events if e["at_image"] == first],
            state["images_seen"] - onset,
            state,
        )
        results.append(adversarial)
        print(_row(adversarial))
        screenshot = args.out / "dashboard.png"
        shot = dashboard_screenshot(url, screenshot)
        adversarial.clear_requests = settle(gateway, sender, pool, rng)
    finally:
        sender.close()
        procs.stop(server)
    report = {
        "machine": describe_machine(),
        "command": "python -m bastion.benchmarks.drift " + " ".join(argv or sys.argv[1:]),
        "drift_config": config,
        "clean": {
            "requests": args.clean,
            "seconds": clean_s,
            "windows": clean_state["windows"],
            "false_alarms": false_alarms,
        },
        "scenarios": [asdict(r) for r in results],
        "screenshot": _shown(screenshot) if shot else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(report, indent=1))
    (args.out / "drift.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _row(r: ScenarioResult) -> str:
    delay = f"{r.delay_requests}" if r.detected else f"not within {r.sent}"
    return f"{r.name:<16} delay {delay:>16}  first {','.join(r.first_statistics) or '-'}"


def markdown(report: dict[str, Any]) -> str:
    clean = report["clean"]
    lines = [
        f"`{report['command'].strip()}`",
        "",
        f"Clean stream: {clean['requests']:,} requests ({clean['windows']} windows evaluated) in "
        f"{clean['seconds']:.0f} s: **{len(clean['false_alarms'])} false alarms**. Each scenario "
        "then sends shifted requests (at least 1,000) after at least 1,000 clean ones.",
        "",
        "| scenario | requests to the first alarm | first statistics | also raised by the end | "
        "clean requests until no alarm (0: already clear) |",
        "|---|---:|---|---|---:|",
    ]
    for r in report["scenarios"]:
        delay = f"**{r['delay_requests']}**" if r["detected"] else f"not in {r['sent']}"
        others = sorted(set(r["raised_within_sent"]) - set(r["first_statistics"]))
        lines.append(
            f"| {r['description']} | {delay} | {', '.join(r['first_statistics']) or '—'} | "
            f"{', '.join(others) or '—'} | {r['clear_requests']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
