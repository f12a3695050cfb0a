"""Which windows should a query fingerprint hash: Blacklight's flattened ones, or 2-D patches?

Blacklight (Li et al., USENIX Security 2022) hashes windows of 20 values slid over the
flattened image. A Square attack (Andriushchenko et al., ECCV 2020) changes a square of the
image at a time, and every flattened window crosses the square's rows, so its steps share few
hashes with the query they step from: the gateway links its queries late. Patches of 4 x 5
pixels (also 20 values) leave the windows outside the square intact. This benchmark measures
both sides of the trade on the same hash, in the probe index the gateway uses:

- **honest**: ``--honest`` distinct photos of the bundled digits (random affine transforms, as
  ``defence_cost`` sends), 500 clients, through a ``ProbeIndex`` of 100,000: how many found a
  near-duplicate, and how many a near-duplicate of a near-duplicate (a *probe*: evidence
  against the client; the ladder assumes an honest rate of 1 in 1,000);
- **Square**: ART's SquareAttack (L-inf 0.3, as in ``benchmarks.incident``) on ``--seeds``
  seeds, refused queries read as "not adversarial" (the gateway's screening, scored in
  process): the first of its queries that is a near-duplicate, and the first probe (counted
  among all its queries, its exact resends of a picture included: ART asks twice).

Both geometries use one numpy hash here (a random linear map of the window's quantised values,
step 50), not the gateway's salted mix, so only the geometry and the threshold differ.

Run: ``python -m bastion.benchmarks.fingerprint_geometry [--honest 20000] [--seeds 6]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bastion.gateway.defence.fingerprint import EMPTY, picture_hash
from bastion.gateway.defence.probe_index import ProbeIndex

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (("flat", 25), ("flat", 22), ("patch", 27), ("patch", 25), ("patch", 23), ("patch", 20))
TOP = 50


def fingerprint(image: np.ndarray, geometry: str, mult: np.ndarray) -> np.ndarray:
    """(1, 28, 28) floats in [0, 1] -> (TOP,) int64: the largest distinct window hashes."""
    q = (np.rint(np.clip(image.reshape(28, 28), 0, 1) * 255).astype(np.int64) // 50).astype(
        np.uint64
    )
    if geometry == "flat":
        windows = sliding_window_view(q.ravel(), 20)
    else:
        windows = sliding_window_view(q, (4, 5)).reshape(-1, 20)
    hashes = (windows * mult).sum(1)  # wraps modulo 2**64
    hashes ^= hashes >> np.uint64(29)
    kept = np.unique(hashes.view(np.int64))[::-1][:TOP]
    out = np.full(TOP, EMPTY, np.int64)
    out[: len(kept)] = kept
    return out


def replay(stream: np.ndarray, geometry: str, threshold: int, mult: np.ndarray) -> list[str]:
    """Each query's fate in a fresh index: "" (nothing like it), "match" or "probe", or
    "retry" for an exact resend of an earlier picture (the gateway's retry: no lookup)."""
    index = ProbeIndex(capacity=100_000, top=TOP, threshold=threshold, ttl_s=1e9)
    fates, seen = [], set()
    for i, image in enumerate(stream):
        picture = picture_hash(image)
        if picture in seen:
            fates.append("retry")
            continue
        seen.add(picture)
        row = fingerprint(image, geometry, mult)
        found = index.match(row)
        fates.append("" if found is None else "probe" if found.links > 0 else "match")
        index.add(row, f"c{i % 500}", i, int(found is not None))
        if found is not None:
            index.link(found.slot)
    return fates


def square_streams(seeds: int, queries: int) -> list[np.ndarray]:
    """ART SquareAttack's first ``queries`` queries per seed, against the digits model behind
    the gateway's own screening (a withheld query reads as uniform probabilities)."""
    import torch
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    from bastion.benchmarks.incident_attacker import L2_BOUND, choose_seeds
    from bastion.gateway.backends import COMBINED, load_backend
    from bastion.gateway.registry import run_batch
    from bastion.gateway.repository import ModelRepository
    from bastion.gateway.screening.policy import ADVERSARIAL
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    torch.set_num_threads(1)
    backend = load_backend(ModelRepository(DEFAULT_REPOSITORY).config("digits"), 1, "cpu", 1)
    assert backend.screening is not None
    threshold = float(backend.screening.thresholds[ADVERSARIAL])
    picked, _ = choose_seeds(seeds, 0, L2_BOUND)
    streams = []
    for s in range(seeds):
        label, sent = int(picked["y"][s]), []

        def oracle(batch: np.ndarray, label: int = label, sent: list = sent) -> np.ndarray:
            batch = np.asarray(batch, np.float32).reshape(-1, 1, 28, 28)
            sent.extend(batch)
            if len(sent) >= queries:
                raise StopIteration
            out = run_batch(backend, [{"images": batch}])[0]
            probs = out["probabilities"].copy()
            uniform = np.full(10, 1.0, np.float32)
            uniform[label] += 1e-3
            probs[out[COMBINED] >= threshold] = uniform / uniform.sum()
            return probs

        model = BlackBoxClassifierNeuralNetwork(
            oracle, input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
        )
        attack = SquareAttack(model, norm=np.inf, eps=0.3, max_iter=300, verbose=False)
        with contextlib.suppress(StopIteration):  # the oracle stops it after ``queries``
            attack.generate(picked["x"][s : s + 1], y=np.eye(10)[[label]])
        streams.append(np.stack(sent[:queries]))
    return streams


def first(fates: list[str], kinds: tuple[str, ...]) -> int | None:
    return next((i + 1 for i, fate in enumerate(fates) if fate in kinds), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--honest", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from bastion.benchmarks.defence_cost import pictures

    mult = np.random.default_rng(0).integers(1, 2**62, size=20).astype(np.uint64) | np.uint64(1)
    honest = pictures(args.honest, seed=1)
    squares = square_streams(args.seeds, args.queries)
    rows = []
    for geometry, threshold in VARIANTS:
        fates = replay(honest, geometry, threshold, mult)
        linked = [first(replay(s, geometry, threshold, mult), ("match", "probe")) for s in squares]
        probed = [first(replay(s, geometry, threshold, mult), ("probe",)) for s in squares]
        rows.append(
            {
                "geometry": geometry,
                "threshold": threshold,
                "honest_matches": fates.count("match") + fates.count("probe"),
                "honest_probes": fates.count("probe"),
                "square_first_match": linked,
                "square_first_probe": probed,
            }
        )

    def cell(values: list[int | None]) -> str:
        return " ".join("-" if v is None else str(v) for v in values)

    lines = [
        f"`python -m bastion.benchmarks.fingerprint_geometry --honest {args.honest} "
        f"--seeds {args.seeds}`",
        "",
        f"| windows | T | honest near-duplicates (of {args.honest:,}) | honest probes "
        f"| Square: first near-duplicate, per seed | Square: first probe, per seed |",
        "|---|--:|--:|--:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['geometry']} | {r['threshold']} | {r['honest_matches']} | "
            f"{r['honest_probes']} | {cell(r['square_first_match'])} | "
            f"{cell(r['square_first_probe'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fingerprint_geometry.md").write_text(text)
    (args.out / "fingerprint_geometry.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
