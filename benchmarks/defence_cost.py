"""What the stateful defence costs the screened batch: fingerprints on the device, then the
host's index lookup, evidence and k-NN test per image.

The issue's target: fingerprinting and lookup at most 10 % of the screened batch's time, at most
2 KB per remembered query, memory bounded by configuration. The screened batch is the fused
screening job as served (batch ``--batch``, one torch thread); fingerprints run on the same
batch; the index lookup is ``match`` and ``add`` on the probe index for each image; ``observe``
is all of ``DefenceService.observe`` for each image as its own request (the attack case, the
dearest: one call per image): the lookup, the k-NN test and sybil link, the content hash, the
sequential test. Both indexes already hold ``--capacity`` queries from 500 clients. Images are
distinct pictures (the digits under random affine transforms), so the index works at its honest
steady state: every query searched, remembered and evicting the oldest. The paths are timed
round-robin in one run.

Run: ``python -m bastion.benchmarks.defence_cost [--batch 64] [--capacity 100000] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from bastion.benchmarks.machine import describe_machine
from bastion.benchmarks.screening_cost import median_ms
from bastion.gateway.defence import probe_table
from bastion.gateway.defence.fingerprint import fingerprints
from bastion.gateway.defence.knn import KnnSpec
from bastion.gateway.defence.observation import Embedded
from bastion.gateway.defence.probe_index import ProbeIndex
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.repository import ModelRepository
from bastion.gateway.screening.calibration import Calibration
from bastion.gateway.screening.mahalanobis import ClassGaussian
from bastion.gateway.screening.pipeline import ScreenedClassifier
from bastion.gateway.screening.policy import from_config
from bastion.gateway.settings import DEFAULT_REPOSITORY, Settings
from bastion.models.data import load_split, to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier


def pictures(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct digit pictures: every bundled digit under random affine transforms."""
    from torchvision.transforms import v2

    digits = torch.from_numpy(
        to_float(np.concatenate([load_split(s)[0] for s in ("train", "calibration", "test")]))
    )
    torch.manual_seed(seed)
    transform = v2.RandomAffine(degrees=15, translate=(0.08, 0.08), scale=(0.85, 1.1))
    picks = torch.randint(len(digits), (count,))
    return torch.stack([transform(digits[i]) for i in picks.tolist()]).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ModelRepository(DEFAULT_REPOSITORY).config("digits")
    policy = from_config(config)
    assert policy is not None
    folder = config.version_path(max(config.versions))
    module = ServedClassifier(load_digits(), channels_last=True).to(device).eval()
    job = ScreenedClassifier(
        module,
        policy.detectors,
        policy.squeeze,
        Calibration.load(folder),
        device,
        ClassGaussian.load(folder),
    )
    knn = KnnSpec.load(folder)
    assert knn is not None, "calibrate the digits model first (knn.json)"
    defence = DefenceService(
        Settings(fingerprint_salt=1, probe_capacity=args.capacity), Metrics(CollectorRegistry())
    )
    spec = defence.fingerprint_spec
    needed = args.capacity + args.batch * (args.repeats + 4)
    started = time.perf_counter()
    images = pictures(needed)
    prints, embeddings = [], []
    for i in range(0, needed, 256):
        x = torch.from_numpy(images[i : i + 256]).to(device)
        prints.append(fingerprints(x, spec).cpu().numpy())
        with torch.no_grad():
            embeddings.append(module.forward_embedded(x)[2].float().cpu().numpy())
    all_prints, all_embeddings = np.concatenate(prints), np.concatenate(embeddings)
    index = ProbeIndex(args.capacity)  # the lookup alone, on a twin of the defence's index

    def observe_one(i: int) -> None:  # image i as its own request from one of 500 clients
        embedded = Embedded("digits:1", knn, all_embeddings[i : i + 1])
        rows = all_prints[i : i + 1], ["clean"], images[i : i + 1]
        defence.observe(f"c{i % 500}", *rows, None, 0, None, embedded)

    def lookup_one(i: int) -> None:
        index.match(all_prints[i])
        index.add(all_prints[i], f"c{i % 500}")

    for i in range(args.capacity):  # the honest steady state: full rings, known clients
        observe_one(i)
        lookup_one(i)
    fill_s = time.perf_counter() - started
    cursor, lookup_cursor = [args.capacity], [args.capacity]
    x = torch.from_numpy(images[: args.batch]).to(device)

    def screened() -> object:
        return job(x)

    def fingerprint() -> object:
        out = fingerprints(x, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def batch_of(one: Callable[[int], None], cursor: list[int]) -> Callable[[], None]:
        def run() -> None:  # the next batch of fresh images, one request each
            for i in range(cursor[0], cursor[0] + args.batch):
                one(i)
            cursor[0] += args.batch

        return run

    lookup, observe = batch_of(lookup_one, lookup_cursor), batch_of(observe_one, cursor)

    medians = median_ms(
        {
            "screened batch": screened,
            "fingerprints": fingerprint,
            "index lookup": lookup,
            "observe": observe,
        },
        args.repeats,
    )
    lookup_ms = medians["fingerprints"] + medians["index lookup"]
    defence_ms = medians["fingerprints"] + medians["observe"]
    per_query = defence.index.memory_bytes() / args.capacity
    report = {
        "machine": describe_machine(),
        "device": str(device),
        "batch": args.batch,
        "capacity": args.capacity,
        "fill_seconds": fill_s,
        "ms_per_batch": medians,
        "lookup_share": lookup_ms / medians["screened batch"],
        "defence_share": defence_ms / medians["screened batch"],
        "index_bytes_per_query": per_query,
        "compiled_loops": probe_table.JIT,  # numba (the 'fast' extra) or plain Python
        "knn_bytes_per_client": knn.history * all_embeddings.shape[1] * 2,
        "probes_while_filling": int(
            sum(a.probes for c in defence.ladder.clients() if (a := defence.ladder.account(c)))
        ),
    }
    lines = [
        f"Stateful defence cost, digits model, batch {args.batch} on {device}, index of "
        f"{args.capacity:,} queries, index and k-NN loops "
        f"{'compiled (numba)' if probe_table.JIT else 'plain Python (no numba)'}:",
        "",
        "| path | ms / batch | share of the screened batch |",
        "|---|---:|---:|",
    ]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.2f} | {ms / medians['screened batch']:.1%} |")
    lines.append(
        f"| **fingerprints + index lookup** | {lookup_ms:.2f} | {report['lookup_share']:.1%} |"
    )
    lines.append(
        f"| fingerprints + observe (all of it) | {defence_ms:.2f} | {report['defence_share']:.1%} |"
    )
    lines.append("")
    lines.append(
        "Target: fingerprinting and lookup at most 10 % of the screened batch. 'observe' is all "
        "the host does per image: the lookup, the k-NN test, the sybil link, the content hash, "
        "the sequential test."
    )
    lines.append(
        f"Index memory: {per_query:,.0f} bytes per remembered query; k-NN history: "
        f"{report['knn_bytes_per_client']:,} bytes per client and model."
    )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "defence_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
