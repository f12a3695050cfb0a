"""What in-path screening costs the digits model: FLOPs per image and time per stage.

FLOPs are counted by ``torch.utils.flop_counter`` for the unscreened forward and for the fused
screening job (forward over originals plus squeezed copies, one backward for the input gradient);
the squeeze itself is elementwise and not counted. Times are medians over repeats with one torch
thread, on whatever device runs the script.

Run: ``python -m benchmarks.screening_cost [--batch 32] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import describe_machine
from gateway.repository import ModelRepository
from gateway.screening.pipeline import ScreenedClassifier
from gateway.screening.policy import from_config
from gateway.settings import DEFAULT_REPOSITORY
from models.data import load_split, to_float
from models.weights import load_digits
from models.zoo import ServedClassifier


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = from_config(ModelRepository(DEFAULT_REPOSITORY).config("digits"))
    assert policy is not None
    module = ServedClassifier(load_digits(), channels_last=True).to(device).eval()
    job = ScreenedClassifier(module, policy.detectors, policy.squeeze, None, device)
    x = torch.from_numpy(to_float(load_split("test")[0][: args.batch])).to(device)

    def plain() -> object:
        with torch.inference_mode():
            return module(x)

    rows = {
        "unscreened forward": (flops(plain), median_ms(plain)),
        "screened job": (flops(lambda: job(x)), median_ms(lambda: job(x))),
    }
    base_flops, base_ms = rows["unscreened forward"]
    report = {
        "machine": describe_machine(),
        "device": str(device),
        "batch": args.batch,
        "squeezers": policy.squeeze.count,
        "detectors": list(policy.detectors),
        "rows": {
            name: {
                "mflops_per_image": f / args.batch / 1e6,
                "ms_per_batch": ms,
                "flop_ratio": f / base_flops,
                "time_ratio": ms / base_ms,
            }
            for name, (f, ms) in rows.items()
        },
    }
    lines = [
        f"Screening cost, digits model, batch {args.batch} on {device}:",
        "",
        "| path | MFLOPs/image | ms/batch | FLOP ratio | time ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {row['mflops_per_image']:.2f} | {row['ms_per_batch']:.2f} | "
            f"{row['flop_ratio']:.2f} | {row['time_ratio']:.2f} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "screening_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
