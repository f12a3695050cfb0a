"""A few real digits that ship with Bastion, for the README's examples and first tries.

``models/samples/digits.npz`` holds uint8 images (n, 1, 28, 28) and labels from the *test* split,
in three sets chosen with the committed screening of the bundled ``digits`` model:

- ``clean``: 16 test digits every tier serves (combined score well below the review tier);
- ``suspicious``: 2 unaltered test digits between the review and block tiers (served, and a copy
  is kept for review);
- ``adversarial``: 2 PGD examples (L-inf 0.3, from ``benchmarks/results/adversarial``) the block
  tier withholds.

Rebuild after recalibrating: ``python -m bastion.models.samples``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATH = Path(__file__).with_name("samples") / "digits.npz"
KINDS = ("clean", "suspicious", "adversarial")
MARGIN = 0.3  # clear of each tier's edge, so batch composition or a CPU's rounding cannot flip it


def load(kind: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (n, 1, 28, 28) in [0, 1] and their true labels (n,) int64."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with np.load(PATH, allow_pickle=False) as data:
        return data[kind].astype(np.float32) / np.float32(255.0), data[f"{kind}_labels"]


def build() -> Path:
    """Chooses the samples with the committed screening and writes ``PATH``."""
    from bastion.benchmarks.adversarial.scoring import build_job, score
    from bastion.gateway.screening.policy import ADVERSARIAL, SUSPICIOUS
    from bastion.models.data import load_split

    job, _ = build_job()
    assert job.thresholds is not None
    block, review = job.thresholds[ADVERSARIAL], job.thresholds[SUSPICIOUS]
    images, labels = load_split("test")
    combined = score(job, images).combined
    clean = np.flatnonzero(combined < review - MARGIN)[::50][:16]
    between = np.flatnonzero((combined > review + MARGIN) & (combined < block - MARGIN))[:2]
    examples = Path(__file__).parents[1] / "benchmarks/results/adversarial/examples.npz"
    with np.load(examples) as data:
        pgd, pgd_labels = data["pgd-0.3"], data["pgd-0.3_labels"]
    strong = np.flatnonzero(score(job, pgd).combined > block + MARGIN)[:2]
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        PATH,
        clean=images[clean],
        clean_labels=labels[clean],
        suspicious=images[between],
        suspicious_labels=labels[between],
        adversarial=pgd[strong],
        adversarial_labels=pgd_labels[strong],
    )
    return PATH


if __name__ == "__main__":
    print(f"wrote {build()}")
