"""Can the served-prediction ledger keep up? Its write path alone, in one process.

Requests of ``--batch`` rows each (the rows ``ledger_rows`` builds for a real request: hashes,
fingerprint sketches, class and confidence) are submitted as fast as one thread can, the way
the data plane does after each request; the writer thread inserts them in batched
transactions. Prints the request-side cost of ``submit`` (what the hot path pays), the rows the
writer commits per second, and the retention sweep's time over the full table, and writes a
JSON result. The serving-rate cost of the ledger (on against off at 64 users) is
``python -m bastion.benchmarks.serving --servers bastion,bastion-noledger --users 64``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bastion.benchmarks.workload import REPO_ROOT
from bastion.gateway.incidents.ledger import Ledger, ledger_rows

RESULTS = REPO_ROOT / "benchmarks" / "results" / "ledger_write.json"


def requests(count: int, batch: int, seed: int = 0) -> list[list]:
    """``count`` requests' rows, built once (the benchmark times the ledger, not the rows)."""
    rng = np.random.default_rng(seed)
    built = []
    for i in range(min(count, 256)):  # distinct contents; reused round-robin
        images = rng.random((batch, 1, 28, 28), dtype=np.float32)
        prints = np.sort(rng.integers(-(2**62), 2**62, size=(batch, 50)), axis=1)
        probabilities = rng.dirichlet(np.ones(10), size=batch).astype(np.float32)
        built.append(
            ledger_rows(("digits", "1"), (f"client-{i % 50}", f"r{i}"), images,
                        {"probabilities": probabilities}, prints, ["clean"] * batch, "served")
        )  # fmt: skip
    return [built[i % len(built)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=62_500, help="requests to write")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = requests(args.requests, args.batch)
    with tempfile.TemporaryDirectory(prefix="bastion-ledger-") as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db", 30 * 86400.0, 10_000_000, backlog=100_000)
        started = time.perf_counter()
        submit_ns = 0
        for rows in work:
            t = time.perf_counter_ns()
            while not ledger.submit(rows):  # never drop here: the writer's pace is measured
                time.sleep(0.001)
            submit_ns += time.perf_counter_ns() - t
        ledger.flush()
        wall = time.perf_counter() - started
        rows_written = ledger.written
        swept = time.perf_counter()
        ledger.sweep()
        sweep_s = time.perf_counter() - swept
        size = (Path(tmp) / "ledger.db").stat().st_size
        ledger.close()
    result = {
        "command": "python -m bastion.benchmarks.ledger_write",
        "requests": args.requests,
        "rows": rows_written,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows_written / wall),
        "requests_per_s": round(args.requests / wall),
        "submit_us_per_request": round(submit_ns / args.requests / 1000, 2),
        "sweep_s": round(sweep_s, 3),
        "bytes_per_row": round(size / rows_written, 1),
    }
    print("| rows | wall s | rows/s | requests/s | submit µs/request | sweep s | bytes/row |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    print(
        f"| {rows_written:,} | {result['wall_s']} | {result['rows_per_s']:,} "
        f"| {result['requests_per_s']:,} | {result['submit_us_per_request']} "
        f"| {result['sweep_s']} | {result['bytes_per_row']} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
