"""What honest clients see: the 1,000 clean test digits through a live gateway, by batch size.

Starts ``bastion serve`` on the bundled repository, sends every clean test digit with
``tritonclient`` in requests of 1, 16 and 64 images (in test-split order, which is by class, and
in a seeded shuffle), and counts refused requests (403: the block tier withheld an image) and
the verdict of every image (read from the ``bastion_screening_verdicts_total`` counters before and
after). One flagged image refuses its whole request, so the refused share of batch-b requests is
about ``1 - (1 - block FPR) ** b``.

Run: ``python -m bastion.benchmarks.adversarial.clean_traffic`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bastion.benchmarks.adversarial.through_gateway import RESULTS, running_gateway
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models.data import load_split, to_float

BATCHES = (1, 16, 64)
VERDICT = re.compile(
    r'bastion_screening_verdicts_total\{action="(\w+)",model="digits",'
    r'verdict="(\w+)",version="1"\} ([0-9.e+]+)'
)


def verdict_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for _action, verdict, value in VERDICT.findall(httpx.get(f"http://{url}/metrics").text):
        counts[verdict] = counts.get(verdict, 0.0) + float(value)
    return counts


def send(url: str, images: np.ndarray, batch: int) -> tuple[int, int]:
    """(requests, refused) for ``images`` sent ``batch`` at a time, one request in flight."""
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    client = triton_http.InferenceServerClient(url, network_timeout=60)
    requests = refused = 0
    for start in range(0, len(images), batch):
        x = np.ascontiguousarray(images[start : start + batch])
        tensor = triton_http.InferInput("images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        requests += 1
        try:
            client.infer("digits", [tensor])
        except InferenceServerException as exc:
            if exc.status() != "403":
                raise
            refused += 1
    client.close()
    return requests, refused


def run(seed: int = 0) -> dict[str, Any]:
    images = to_float(load_split("test")[0])
    orders = {
        "by class": np.arange(len(images)),
        "shuffled": np.random.default_rng(seed).permutation(len(images)),
    }
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_gateway(DEFAULT_REPOSITORY, Path(tmp)) as url,
    ):
        for order, index in orders.items():
            for batch in BATCHES:
                before = verdict_counts(url)
                requests, refused = send(url, images[index], batch)
                after = verdict_counts(url)
                delta = {v: after.get(v, 0.0) - before.get(v, 0.0) for v in after}
                rows.append(
                    {
                        "order": order,
                        "batch": batch,
                        "requests": requests,
                        "refused": refused,
                        "refused_rate": refused / requests,
                        "withheld_images": delta.get("adversarial", 0.0),
                        "reviewed_images": delta.get("suspicious", 0.0),
                        "images": sum(delta.values()),
                    }
                )
    return {"rows": rows, "images": len(images)}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Clean test digits through a live gateway",
        "",
        f"All {result['images']} clean test digits, sent with tritonclient (binary FP32), one "
        "request in flight; verdicts from the gateway's own counters.",
        "",
        "| order | batch | requests | refused (403) | refused % | images withheld % "
        "| images served, reviewed % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        n = max(r["images"], 1)
        lines.append(
            f"| {r['order']} | {r['batch']} | {r['requests']} | {r['refused']} "
            f"| {100 * r['refused_rate']:.1f} | {100 * r['withheld_images'] / n:.1f} "
            f"| {100 * r['reviewed_images'] / n:.1f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "clean_traffic.json")
    args = parser.parse_args(argv)
    result = run(args.seed)
    table = markdown(result)
    print(table)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
