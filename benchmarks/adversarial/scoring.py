"""Scores through the gateway's own screening job, and detection metrics on them.

The job is built the way the torch backend builds it (served graph, channels-last, the model's
policy and its committed calibration), so the numbers describe what the gateway decides. Metrics
follow Xu et al. (NDSS 2018): negatives are the clean test split, positives the successful
adversarial examples; ROC-AUC with higher score = adversarial, and the true- and false-positive
rates at each tier's threshold calibrated on the separate calibration split. Every column is a
clean surprise (``-log10 p``: per detector under its own tail, and the combined score), so one
tier's threshold applies to each: a detector's rate is what it would flag on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from bastion.gateway.repository import ModelRepository
from bastion.gateway.screening import tail
from bastion.gateway.screening.calibration import Calibration
from bastion.gateway.screening.mahalanobis import ClassGaussian
from bastion.gateway.screening.pipeline import ScreenedClassifier
from bastion.gateway.screening.policy import ADVERSARIAL, SUSPICIOUS, from_config
from bastion.gateway.settings import DEFAULT_REPOSITORY
from bastion.models.data import to_float
from bastion.models.weights import load_digits
from bastion.models.zoo import ServedClassifier

COMBINED = "combined"
TIERS = {"block": ADVERSARIAL, "review": SUSPICIOUS}


@dataclass(frozen=True)
class Scores:
    """Per-sample detector surprises (n, D), the combined score (n,) and predictions (n,)."""

    detectors: np.ndarray
    combined: np.ndarray
    predictions: np.ndarray

    def column(self, name: str, names: tuple[str, ...]) -> np.ndarray:
        return self.combined if name == COMBINED else self.detectors[:, names.index(name)]


def build_job(
    repository: Path = DEFAULT_REPOSITORY, model: str = "digits", version: int = 1
) -> tuple[ScreenedClassifier, Calibration]:
    """The gateway's screening job for a model version, with its committed calibration."""
    config = ModelRepository(repository).config(model)
    policy = from_config(config)
    if policy is None:
        raise ValueError(f"model {model!r} does not screen its inputs")
    folder = config.version_path(version)
    calibration = Calibration.load(folder)
    if calibration is None:
        raise ValueError(f"model {model!r} version {version} has no calibration")
    gaussian = ClassGaussian.load(folder) if "mahalanobis" in policy.detectors else None
    module = ServedClassifier(load_digits(repository, version), channels_last=True).eval()
    device = torch.device("cpu")
    job = ScreenedClassifier(
        module, policy.detectors, policy.squeeze, calibration, device, gaussian
    )
    job.targets, job.thresholds = policy.targets, policy.thresholds
    return job, calibration


def score(job: ScreenedClassifier, pixels: np.ndarray, batch_size: int = 250) -> Scores:
    """Runs uint8 images through the screening job in batches."""
    assert job.combiner is not None, "scoring needs a calibrated job"
    parts = []
    for i in range(0, len(pixels), batch_size):
        result = job(torch.from_numpy(to_float(pixels[i : i + batch_size])))
        surprise = tail.surprise(result.scores, job.combiner.detectors)
        parts.append((surprise.numpy(), result.combined.numpy(), result.logits.argmax(1)))
    if not parts:
        width = len(job.detectors)
        return Scores(np.zeros((0, width)), np.zeros(0), np.zeros(0, dtype=np.int64))
    detectors, combined, predictions = zip(*parts, strict=True)
    return Scores(
        np.concatenate(detectors), np.concatenate(combined), np.concatenate(predictions).astype(int)
    )


def thresholds(job: ScreenedClassifier, tier: str) -> dict[str, float]:
    """One tier's threshold ("block" or "review") for every column: each is a clean surprise."""
    assert job.thresholds is not None
    cut = job.thresholds[TIERS[tier]]
    return {**{d.name: cut for d in job.detectors}, COMBINED: cut}


def _finite(values: np.ndarray) -> np.ndarray:
    """Non-finite scores (the detectors' 'most suspicious') as the largest float, for sklearn."""
    return np.nan_to_num(values.astype(np.float64), nan=np.inf, posinf=np.finfo(np.float64).max)


def auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """ROC-AUC of a score separating adversarial (positive) from clean; NaN without positives."""
    if len(adversarial) == 0 or len(clean) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    return float(roc_auc_score(y, _finite(np.r_[clean, adversarial])))


def flagged_rate(values: np.ndarray, threshold: float) -> float:
    """Fraction flagged by the gateway's rule ``score > threshold``."""
    return float((values > threshold).mean()) if len(values) else float("nan")


def roc(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates along the ROC curve."""
    y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    fpr, tpr, _ = roc_curve(y, _finite(np.r_[clean, adversarial]))
    return fpr, tpr


def metrics(
    clean: Scores, adversarial: Scores, names: tuple[str, ...], cuts: dict[str, float]
) -> dict[str, dict[str, float]]:
    """AUC, TPR at the calibrated threshold and the clean test FPR, per detector and combined."""
    out = {}
    for name in (*names, COMBINED):
        negatives, positives = clean.column(name, names), adversarial.column(name, names)
        out[name] = {
            "auc": auc(negatives, positives),
            "tpr": flagged_rate(positives, cuts[name]),
            "fpr": flagged_rate(negatives, cuts[name]),
        }
    return out


def pool(parts: list[Scores]) -> Scores:
    """All attacks' successes as one set: pooled rates are weighted by each attack's successes."""
    return Scores(
        np.concatenate([p.detectors for p in parts]),
        np.concatenate([p.combined for p in parts]),
        np.concatenate([p.predictions for p in parts]),
    )
