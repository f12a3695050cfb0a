"""Thresholds from clean data at a target false-positive rate, stored with the model version.

Per detector, the threshold is the clean score at index ``ceil(n (1 - fpr)) - 1`` of the sorted
calibration scores, and a sample is flagged when its score is *above* it (EvadeML-Zoo's
``feature_squeezing.py::train``). The combined decision maps every score to its empirical
percentile among the clean calibration scores of its detector, takes the maximum, and thresholds
that the same way: it needs no adversarial data, and the realised false-positive rate on the
calibration split is at most the target.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILENAME = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    detectors: tuple[str, ...]
    bits: tuple[int, ...]
    medians: tuple[int, ...]
    target_fpr: float
    thresholds: dict[str, float]  # per detector, at target_fpr on its own
    combined_threshold: float  # on the max-percentile score
    reference: dict[str, list[float]]  # sorted clean scores per detector
    calibration_fpr: float  # realised on the calibration split by the combined decision
    samples: int
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        path = folder / FILENAME
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> Calibration | None:
        path = folder / FILENAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        for key in ("detectors", "bits", "medians"):
            data[key] = tuple(data[key])
        return cls(**data)

    def reference_tensor(self, device: torch.device) -> torch.Tensor:
        """(D, N) sorted clean scores, for percentiles on the device."""
        rows = [self.reference[name] for name in self.detectors]
        return torch.tensor(rows, dtype=torch.float32, device=device)


def threshold_at(scores: np.ndarray, fpr: float) -> float:
    """The clean score a fraction ``fpr`` of the calibration samples lies above."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    index = max(0, math.ceil(len(ordered) * (1.0 - fpr)) - 1)
    return float(ordered[index])


def percentiles(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Fraction of clean calibration scores at or below each score: (n, D) in [0, 1]."""
    ranks = torch.searchsorted(reference, scores.T.contiguous(), right=True)
    return (ranks.T.to(scores.dtype)) / reference.shape[1]


def combined_score(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The max over detectors of each score's clean percentile: one number per sample."""
    return percentiles(scores, reference).amax(dim=1)


def fit(
    scores: np.ndarray,
    detectors: tuple[str, ...],
    bits: tuple[int, ...],
    medians: tuple[int, ...],
    target_fpr: float,
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """Calibrates from clean scores (n, D), one column per detector."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError("target false-positive rate must lie in (0, 1)")
    if scores.ndim != 2 or scores.shape[1] != len(detectors) or len(scores) < 20:
        raise ValueError("need an (n >= 20, detectors) matrix of clean scores")
    if not np.isfinite(scores).all():
        raise ValueError("clean calibration scores must be finite")
    reference = {name: np.sort(scores[:, i]).tolist() for i, name in enumerate(detectors)}
    ref = torch.tensor([reference[n] for n in detectors], dtype=torch.float64)
    combined = combined_score(torch.from_numpy(scores.astype(np.float64)), ref).numpy()
    combined_threshold = threshold_at(combined, target_fpr)
    return Calibration(
        detectors=detectors,
        bits=bits,
        medians=medians,
        target_fpr=target_fpr,
        thresholds={n: threshold_at(scores[:, i], target_fpr) for i, n in enumerate(detectors)},
        combined_threshold=combined_threshold,
        reference=reference,
        calibration_fpr=float((combined > combined_threshold).mean()),
        samples=len(scores),
        meta={"created_at": time.time(), **(meta or {})},
    )
