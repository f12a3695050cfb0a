"""Where the line-search test's threshold sits: honest pictures against a search's blends.

``gateway.defence.line_search`` takes a query for a line search when, for some pair of its
client's last ``WINDOW`` pictures, its distance from their line over its distance from the
nearer of them is at most ``RATIO``. This measures that ratio, on the 8-bit rows the gateway
keeps, for both sides:

- **honest**: clients as ``benchmarks.incident`` runs them (fresh photos of their digits:
  rotated, scaled and shifted; 5 % exact retries, 5 % JPEG re-encodes of earlier photos), each
  photographing only ``--digits`` digits (few digits: photos of one digit are the closest
  honest pictures get to each other) or 300;
- **search**: a binary search between a test digit and another digit of another class
  (HopSkipJump's first search, read as "not adversarial" at every step), with OARS-style
  uniform noise of L-inf ``sigma`` on every query (Feng et al., CCS 2023), for several sigmas.

It also times one ``LineSearches.check`` (the gateway's cost per query) with full windows.

Run: ``python -m bastion.benchmarks.line_geometry [--clients 8] [--queries 600]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bastion.benchmarks.incident_clients import HonestSource
from bastion.gateway.defence.jit import JIT
from bastion.gateway.defence.line_search import RATIO, WINDOW, LineSearches, line_ratio, warm_up
from bastion.models.data import load_split, to_float

RESULTS = Path(__file__).resolve().parent / "results"
SIGMAS = (0.0, 0.02, 0.05, 0.1)


def levels(image: np.ndarray) -> np.ndarray:
    """The row the gateway keeps: 8-bit levels, as floats in [0, 1]."""
    return np.rint(np.clip(image.reshape(-1), 0, 1) * 255) / 255


def honest_ratios(pictures: np.ndarray, clients: int, queries: int, digits: int) -> np.ndarray:
    """Each honest query's smallest ratio over its client's window (retries skipped: they
    never reach the test)."""
    rng = np.random.default_rng(digits)
    ratios = []
    for client in range(clients):
        source = HonestSource(pictures[rng.choice(len(pictures), digits, replace=False)], client)
        window: list[np.ndarray] = []
        for _ in range(queries):
            kind, image = source.next()
            if kind == "retry":
                continue
            row = levels(image)
            ratio = line_ratio(row, np.stack(window)) if len(window) >= 2 else np.inf
            if np.isfinite(ratio):
                ratios.append(ratio)
            window = [*window, row][-WINDOW:]
    return np.asarray(ratios)


def search_ratios(pictures: np.ndarray, labels: np.ndarray, sigma: float, searches: int) -> list:
    """Each blend's ratio in ``searches`` six-step binary searches with noise ``sigma``."""
    rng = np.random.default_rng(int(sigma * 1000) + 1)
    ratios = []
    for _ in range(searches):
        seed_index, start_index = rng.choice(len(pictures), 2, replace=False)
        if labels[seed_index] == labels[start_index]:
            continue
        seed, start = pictures[seed_index].reshape(-1), pictures[start_index].reshape(-1)

        def noisy(image: np.ndarray) -> np.ndarray:
            return levels(image + rng.uniform(-sigma, sigma, image.shape))

        window = [noisy(seed), noisy(start)]
        low, high = 0.0, 1.0
        for _ in range(6):
            alpha = (low + high) / 2
            row = noisy((1 - alpha) * seed + alpha * start)
            ratios.append(line_ratio(row, np.stack(window[-WINDOW:])))
            window.append(row)
            low = alpha
    return ratios


def check_us(pictures: np.ndarray, clients: int = 100, queries: int = 3000) -> float:
    """Microseconds a ``LineSearches.check`` takes (median of five runs): the gateway's cost
    per query, its windows full (``clients`` clients sending distinct digits in turn)."""
    lines = LineSearches(4096, salt=1)
    warm_up()
    for k in range(len(pictures)):  # fill every window
        lines.check(f"c{k % clients}", pictures[k], k % 10, k)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for k in range(queries):
            picture = pictures[k % len(pictures)]
            lines.check(f"c{k % clients}", picture, k % 10, k + len(pictures))
        runs.append((time.perf_counter() - start) / queries * 1e6)
    return float(np.median(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=600, help="per honest client")
    parser.add_argument("--searches", type=int, default=200, help="binary searches per sigma")
    parser.add_argument("--out", type=Path, default=RESULTS / "line_geometry.json")
    args = parser.parse_args()
    x, labels = load_split("test")
    pictures = to_float(x)
    rows = []
    print(f"line-search test at RATIO {RATIO} (caught: ratio <= RATIO)\n")
    print("| traffic | queries | min ratio | 0.1th pct | median | caught |")
    print("|---|---:|---:|---:|---:|---:|")
    for digits in (5, 300):
        ratios = honest_ratios(pictures, args.clients, args.queries, digits)
        rows.append(("honest", f"{digits} digits a client", ratios))
    for sigma in SIGMAS:
        ratios = np.asarray(search_ratios(pictures, labels, sigma, args.searches))
        rows.append(("search", f"L-inf noise {sigma}", ratios))
    table = []
    for side, label, ratios in rows:
        finite = ratios[np.isfinite(ratios)]
        entry = {
            "side": side,
            "traffic": label,
            "queries": len(ratios),
            "min": float(finite.min()),
            "p0.1": float(np.quantile(finite, 0.001)),
            "median": float(np.median(finite)),
            "caught": float(np.mean(ratios <= RATIO)),
        }
        table.append(entry)
        print(
            f"| {side}: {label} | {entry['queries']:,} | {entry['min']:.3f} | "
            f"{entry['p0.1']:.3f} | {entry['median']:.3f} | {entry['caught']:.1%} |"
        )
    cost = check_us(pictures[:1000])
    print(f"\nLineSearches.check: {cost:.1f} us a query (numba: {JIT}), windows full")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"ratio": RATIO, "window": WINDOW, "rows": table, "check_us": cost, "numba": JIT}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
