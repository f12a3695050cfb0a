"""What drift monitoring adds to one batch, in process, on one thread: no HTTP noise.

    python -m bastion.benchmarks.drift_cost [--batch 30] [--repeats 2000]

Times the unscreened forward (what the backend runs without a monitor), the forward that also
returns the embedding, the monitor's per-batch device work with and without its hop closes, and
one MMD permutation test (off the hot path). Prints a table; writes
``benchmarks/results/drift_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.workload import REPO_ROOT, set_single_thread
from bastion.gateway.monitoring import drift
from bastion.gateway.monitoring.drift_monitor import DriftMonitor
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.monitoring.reference import ReferenceProfile
from bastion.gateway.monitoring.window import DriftConfig
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier

RESULTS = REPO_ROOT / "benchmarks" / "results" / "drift_cost.json"


def per_call_us(call: Callable[[], object], repeats: int) -> float:
    """Median of five timed runs of ``repeats`` calls, in microseconds per call."""
    call()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        runs.append((time.perf_counter() - start) / repeats * 1e6)
    return sorted(runs)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=30, help="images per batch")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    set_single_thread()
    logging.getLogger("bastion.gateway").setLevel(logging.ERROR)  # the repeated batch raises alarms
    profile = ReferenceProfile.load(DEFAULT_REPOSITORY / "digits" / "1")
    assert profile is not None, "run `bastion calibrate digits` first"
    module = ServedClassifier(load_digits(), channels_last=True).eval()
    x = torch.from_numpy(to_float(load_split("test")[0][: args.batch]))
    cpu = torch.device("cpu")
    with torch.no_grad():
        _, probs, embedding = module.forward_embedded(x)
    never = DriftMonitor("digits", "1", profile, DriftConfig(hop_images=10**12), Metrics(), cpu)
    default = DriftConfig()
    closing = DriftMonitor(
        "digits", "1", profile, replace(default, mmd_interval_s=1e12), Metrics(), cpu
    )

    def inference() -> object:
        with torch.inference_mode():
            return module(x)

    def embedded() -> object:
        with torch.inference_mode():
            return module.forward_embedded(x)

    forwards = args.repeats // 10
    rows = {
        "forward (inference_mode, no monitor)": per_call_us(inference, forwards),
        "forward returning the embedding (inference_mode)": per_call_us(embedded, forwards),
        "monitor: add a batch to the hop": per_call_us(
            lambda: never.observe(x, probs, embedding, None), args.repeats
        ),
        "monitor: add a batch, hop closes included (every 250 images)": per_call_us(
            lambda: closing.observe(x, probs, embedding, None), args.repeats
        ),
    }
    sample = embedding.repeat(256 // args.batch + 1, 1)[:256]
    start = time.perf_counter()
    drift.mmd_permutation_test(sample, profile.embeddings, profile.bandwidth, 1000)
    mmd_us = (time.perf_counter() - start) * 1e6
    never.close()
    closing.close()
    forward = rows["forward (inference_mode, no monitor)"]
    print(f"batch of {args.batch} digits, one thread")
    print(f"{'step':<64} {'us/batch':>10} {'x forward':>10}")
    for name, value in rows.items():
        print(f"{name:<64} {value:>10.1f} {value / forward:>10.3f}")
    print(f"{'MMD test, 256 vs 500 embeddings, 1,000 permutations (worker)':<64} {mmd_us:>10.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": describe_machine(),
                "batch": args.batch,
                "us_per_batch": rows,
                "mmd_test_us": mmd_us,
                "mmd_interval_s": default.mmd_interval_s,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
