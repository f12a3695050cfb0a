"""The bare model's ceiling: images/s at each batch size, no server, one torch thread.

This is the most any server can reach on one core, and its shape (how much batching buys) says
how much a dynamic batcher can win over a per-request server. Both memory layouts are timed:
PyTorch's default NCHW, which the peers serve, and channels_last (NHWC), which Bastion serves and
for which oneDNN has faster convolutions. The digits model runs on real test digits; the ResNets
run on noise with random weights, which time the same as trained ones.

Run: ``python -m bastion.benchmarks.model_ceiling [--model digits|resnet18|resnet50]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.procs import system_busy_seconds
from bastion.benchmarks.workload import REPO_ROOT, digit_images, load_served, set_single_thread


@dataclass(frozen=True)
class Profile:
    """What to time for one model; the ResNets get fewer points to stay within a minute or so."""

    architecture: str
    shape: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    target_s: float
    warmup: int


LAYOUTS = ("nchw", "channels_last")
PROFILES = {
    "digits": Profile("digits_cnn", (1, 28, 28), (1, 2, 4, 8, 16, 32, 64), 7, 0.25, 5),
    "resnet18": Profile("resnet18", (3, 224, 224), (1, 4, 16), 3, 0.5, 1),
    "resnet50": Profile("resnet50", (3, 224, 224), (1, 4, 16), 3, 0.5, 1),
}


def inputs(name: str, profile: Profile, count: int) -> torch.Tensor:
    """Real digits for the digits model, uniform noise in [0, 1] for the others."""
    if name == "digits":
        images, _ = digit_images(count)
    else:
        images = np.random.default_rng(0).random((count, *profile.shape), dtype=np.float32)
    return torch.from_numpy(images)


def _call_s(model: torch.nn.Module, batch: torch.Tensor, iterations: int) -> float:
    """Seconds per forward pass, averaged over ``iterations`` back-to-back passes."""
    started = time.perf_counter()
    for _ in range(iterations):
        model(batch)
    return (time.perf_counter() - started) / iterations


def time_batch(model: torch.nn.Module, batch: torch.Tensor, profile: Profile) -> dict[str, float]:
    """Median seconds per pass over repeats, each repeat long enough to swamp timer noise."""
    first = min(_call_s(model, batch, 1) for _ in range(profile.warmup))
    iterations = max(1, math.ceil(profile.target_s / max(first, 1e-6)))
    per_call = statistics.median(_call_s(model, batch, iterations) for _ in range(profile.repeats))
    size = batch.shape[0]
    return {
        "batch": size,
        "ms_per_batch": per_call * 1e3,
        "us_per_image": per_call * 1e6 / size,
        "images_per_s": size / per_call,
        "iterations": iterations,
        "repeats": profile.repeats,
    }


def sweep(name: str, layout: str) -> tuple[list[dict[str, float]], str]:
    """Every batch size of a profile in one memory layout."""
    profile = PROFILES[name]
    model, source = load_served(profile.architecture, channels_last=layout == "channels_last")
    data = inputs(name, profile, max(profile.batches))
    with torch.inference_mode():
        rows = [time_batch(model, data[:size].contiguous(), profile) for size in profile.batches]
    return [row | {"layout": layout} for row in rows], source


def measure(name: str, layouts: list[str]) -> dict[str, object]:
    """The whole sweep for one model, with the provenance needed to compare runs."""
    profile = PROFILES[name]
    set_single_thread()
    own, busy, started = time.process_time(), system_busy_seconds(), time.monotonic()
    rows: list[dict] = []
    for layout in layouts:
        layout_rows, source = sweep(name, layout)
        rows += layout_rows
    others = system_busy_seconds() - busy - (time.process_time() - own)
    return {
        "model": name,
        "architecture": profile.architecture,
        "weights": source,
        "input_shape": list(profile.shape),
        "layouts": layouts,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": describe_machine(),
        "other_cpu_cores": max(others, 0.0) / (time.monotonic() - started),
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """A Markdown table of the sweep, with the speed-up over batch 1 in plain NCHW."""
    rows = result["rows"]
    base = rows[0]["images_per_s"]
    lines = [
        "| layout | batch | ms / batch | µs / image | images/s | vs NCHW batch 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layout']} | {row['batch']} | {row['ms_per_batch']:.3f} "
            f"| {row['us_per_image']:,.1f} | {row['images_per_s']:,.0f} "
            f"| {row['images_per_s'] / base:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PROFILES), default="digits")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--layouts", default="nchw,channels_last", help="memory layouts to time")
    parser.add_argument("--label", default="", help="suffix for the file name, e.g. torch2.13")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    if not layouts or set(layouts) - set(LAYOUTS):
        parser.error(f"--layouts takes a comma-separated subset of {LAYOUTS}")
    result = measure(args.model, layouts)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.label}" if args.label else ""
    target = args.out / f"model_ceiling_{args.model}{suffix}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} ({result['weights']}), torch {result['torch']}, 1 thread")
    print(f"other processes kept {result['other_cpu_cores']:.2f} cores busy meanwhile")
    print(format_table(result))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
