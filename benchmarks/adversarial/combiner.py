"""Prototype: other detector sets, squeezers and combination rules, fitted on the calibration
split only.

Thresholds come from the clean calibration digits (as ``bastion calibrate`` does); choosing
between candidates uses attacks on *calibration* seeds (the development set); the test split's
attacks (``examples.npz`` from ``evaluate --save-examples``) are only reported, never used to
choose. Two rules: the gateway's max of clean percentiles (a Bonferroni-like union: every detector
must clear its own 1 - fpr/D-ish cut) and Fisher's method on the same percentiles,
``-sum_d log(1 - p_d + 1/N)`` (Fisher 1925), which lets two moderately raised scores add up.

Run: ``python -m benchmarks.adversarial.combiner [--seeds 300] [--examples PATH]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.adversarial import attacks as zoo
from benchmarks.adversarial.evaluate import EXAMPLES, RESULTS
from benchmarks.adversarial.scoring import auc
from gateway.screening.calibration import percentiles, threshold_at
from gateway.screening.pipeline import ScreenedClassifier
from kernels.squeeze import SqueezeSpec
from models.data import load_split, to_float
from models.weights import load_digits
from models.zoo import ServedClassifier

ALL = ("feature_squeezing", "confidence_margin", "gradient_norm")
RULES = ("max", "fisher")
DEV_ATTACKS = ("fgsm", "bim", "pgd", "deepfool", "cw")


@dataclass(frozen=True)
class Candidate:
    detectors: tuple[str, ...]
    bits: tuple[int, ...] = (1,)
    medians: tuple[int, ...] = (2,)
    rule: str = "max"

    @property
    def name(self) -> str:
        short = "+".join(d.split("_")[0][:4] for d in self.detectors)
        return f"{short} b{self.bits} m{self.medians} {self.rule}".replace(",)", ")")


CANDIDATES = tuple(
    Candidate(dets, bits, medians, rule)
    for dets in (ALL, ALL[:2], ALL[:1])
    for bits, medians in (((1,), (2,)), ((1,), (2, 3)), ((1, 2), (2,)), ((1,), (3,)))
    for rule in RULES
    if not (len(dets) == 1 and rule == "fisher")
)


def raw_scores(candidate: Candidate, images: np.ndarray) -> np.ndarray:
    """Uncalibrated detector scores (n, D) from the gateway's screening job."""
    spec = SqueezeSpec(candidate.bits, candidate.medians)
    module = ServedClassifier(load_digits(), channels_last=True).eval()
    job = ScreenedClassifier(module, candidate.detectors, spec, None, torch.device("cpu"))
    parts = [
        job(torch.from_numpy(to_float(images[i : i + 250]))).scores.numpy()
        for i in range(0, len(images), 250)
    ]
    return np.concatenate(parts).astype(np.float64)


def combine(scores: np.ndarray, reference: np.ndarray, rule: str) -> np.ndarray:
    """One number per sample from per-detector clean percentiles."""
    p = percentiles(torch.from_numpy(scores), torch.from_numpy(reference)).numpy()
    if rule == "max":
        return p.max(axis=1)
    return -np.log(1.0 - p + 1.0 / (reference.shape[1] + 1)).sum(axis=1)


def rates(candidate: Candidate, sets: dict[str, np.ndarray], fpr: float) -> dict[str, float]:
    """Thresholds fitted on ``sets['calibration']``; flagged fraction of every other set."""
    scores = {name: raw_scores(candidate, images) for name, images in sets.items()}
    reference = np.sort(scores["calibration"], axis=0).T.copy()
    combined = {name: combine(s, reference, candidate.rule) for name, s in scores.items()}
    cut = threshold_at(combined["calibration"], fpr)
    out = {name: float((c > cut).mean()) for name, c in combined.items()}
    out["test_auc"] = auc(combined["test_clean"], combined["test_adversarial"])
    return out


def dev_attacks(seeds: int, seed: int) -> np.ndarray:
    """Successful adversarial digits made from calibration-split seeds (the development set)."""
    images, labels = load_split("calibration")
    net = load_digits()
    picked = zoo.select_seeds(net, images, labels, seeds, seed)
    found = [
        zoo.run_attack(spec, net, images, labels, picked, seed).pixels
        for spec in zoo.select(list(DEV_ATTACKS))
    ]
    return np.concatenate(found)


def test_attacks(path: Path) -> np.ndarray:
    """The evaluation's test-split adversarial digits (all attacks pooled)."""
    with np.load(path) as data:
        keys = [k for k in data.files if data[k].ndim == 4 and k != "clean"]
        return np.concatenate([data[k] for k in keys if not k.startswith("adaptive")])


def markdown(rows: dict[str, dict[str, float]], dev: int, test: int, fpr: float) -> str:
    """Candidates ranked by development-set detection (calibration-split attacks)."""
    lines = [
        "# Screening configurations, fitted on the calibration split",
        "",
        f"Thresholds: {100 * fpr:.0f} % target FPR on the 1,000 clean calibration digits. "
        f"Ranked by detection of {dev} successful attacks on calibration-split seeds (the "
        f"development set); the test columns ({test} successful attacks on test seeds, 1,000 "
        "clean test digits) are reported, not used to choose. feat = feature squeezing, conf = "
        "confidence margin, grad = gradient norm; b = bit depths, m = median windows.",
        "",
        "| candidate | dev TPR % | test TPR % | test FPR % | test AUC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["dev_adversarial"]):
        lines.append(
            f"| {name} | {100 * r['dev_adversarial']:.1f} | {100 * r['test_adversarial']:.1f} "
            f"| {100 * r['test_clean']:.1f} | {r['test_auc']:.4f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--examples", type=Path, default=RESULTS / EXAMPLES)
    parser.add_argument("--out", type=Path, default=RESULTS / "combiner.json")
    args = parser.parse_args(argv)
    sets = {
        "calibration": load_split("calibration")[0],
        "dev_adversarial": dev_attacks(args.seeds, args.seed),
        "test_clean": load_split("test")[0],
        "test_adversarial": test_attacks(args.examples),
    }
    print(f"dev adversarial: {len(sets['dev_adversarial'])}, test: {len(sets['test_adversarial'])}")
    rows = {c.name: rates(c, sets, args.fpr) for c in CANDIDATES}
    table = markdown(rows, len(sets["dev_adversarial"]), len(sets["test_adversarial"]), args.fpr)
    print(table)
    args.out.with_suffix(".md").write_text(table)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
