"""What in-path screening costs the digits model: FLOPs per image and time per stage.

FLOPs are counted by ``torch.utils.flop_counter`` for the unscreened forward, for the fused
screening job as served (originals forward with autograd and one backward for the input gradient,
squeezed copies forward without it, the Mahalanobis product, the tails and the combiner), and for
the job's parts (each detector alone, run by the same job code); the squeeze itself is
elementwise and not counted. Times are medians over repeats with one torch thread, on whatever
device runs the script; "time / FLOP ratio" is how far each path's time ratio is from its FLOP
ratio to the bare forward (1.0: it costs exactly its arithmetic).

Run: ``python -m bastion.benchmarks.screening_cost [--batch 32] [--out benchmarks/results]``.
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

from bastion.benchmarks.machine import describe_machine
from bastion.gateway.repository import ModelRepository
from bastion.gateway.screening.calibration import Calibration
from bastion.gateway.screening.mahalanobis import ClassGaussian
from bastion.gateway.screening.pipeline import ScreenedClassifier
from bastion.gateway.screening.policy import from_config
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_ms(paths: dict[str, Callable[[], object]], repeats: int = 60) -> dict[str, float]:
    """Median time of each path, the paths interleaved round-robin: on a shared, noisy machine a
    slow spell then hits every path alike, so the ratios stay fair."""
    for fn in paths.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ModelRepository(DEFAULT_REPOSITORY).config("digits")
    policy = from_config(config)
    assert policy is not None
    folder = config.version_path(max(config.versions))
    calibration, gaussian = Calibration.load(folder), ClassGaussian.load(folder)
    module = ServedClassifier(load_digits(), channels_last=True).to(device).eval()
    x = torch.from_numpy(to_float(load_split("test")[0][: args.batch])).to(device)

    def plain() -> object:
        with torch.inference_mode():
            return module(x)

    def job_of(names: tuple[str, ...], calibrated: bool = False) -> Callable[[], object]:
        job = ScreenedClassifier(
            module, names, policy.squeeze, calibration if calibrated else None, device, gaussian
        )
        return lambda: job(x)

    paths = {
        "unscreened forward": plain,
        "screened job (as served)": job_of(policy.detectors, calibrated=True),
        "part: feature squeezing": job_of(("feature_squeezing",)),
        "part: confidence margin": job_of(("confidence_margin",)),
        "part: gradient norm": job_of(("gradient_norm",)),
        "part: mahalanobis": job_of(("mahalanobis",)),
    }
    medians = median_ms(paths)
    rows = {name: (flops(fn), medians[name]) for name, fn in paths.items()}
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
                "time_over_flop_ratio": (ms / base_ms) / (f / base_flops),
            }
            for name, (f, ms) in rows.items()
        },
    }
    lines = [
        f"Screening cost, digits model, batch {args.batch} on {device}:",
        "",
        "| path | MFLOPs/image | ms/batch | FLOP ratio | time ratio | time / FLOP ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {row['mflops_per_image']:.2f} | {row['ms_per_batch']:.2f} | "
            f"{row['flop_ratio']:.2f} | {row['time_ratio']:.2f} | "
            f"{row['time_over_flop_ratio']:.2f} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "screening_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
