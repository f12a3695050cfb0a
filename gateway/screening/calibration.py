"""Clean-data calibration of the combined screening score, stored with the model version.

Two stages, both fitted on clean calibration images only (no adversarial data):

1. each detector's score becomes its clean surprise ``-log10 p`` (``tail.py``: conformal body,
   generalized Pareto tail), so scores on different scales become comparable;
2. a combining rule turns the D surprises into one statistic, ``max`` (a Bonferroni-like
   union: the most surprised detector decides) or ``fisher`` (their sum, Fisher 1925: two
   moderately raised detectors add up), and that statistic gets its own clean tail model.

The combined score is the surprise of the statistic, so a tier at false-positive rate ``a``
flags scores above ``-log10 a`` and a policy can move its tiers without recalibrating (within
``smallest_fpr``). ``calibration.json`` also keeps the realised FPR of each tier on the
calibration split and, when ``bastion calibrate`` had one, on the held-out clean test split.
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

from bastion.gateway.screening import tail
from bastion.gateway.screening.detectors import DETECTORS
from bastion.gateway.screening.tail import TailModel, TailTensors

FILENAME = "calibration.json"
FORMAT = 2
RULES = ("max", "fisher")


@dataclass(frozen=True)
class Calibration:
    detectors: tuple[str, ...]
    bits: tuple[int, ...]
    medians: tuple[int, ...]
    rule: str
    tails: dict[str, TailModel]  # per detector, on its raw score
    combined: TailModel  # on the combining rule's statistic
    samples: int
    calibration_fpr: dict[str, float]  # realised per target FPR (key: the target, as text)
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # held-out, per target
    format: int = FORMAT
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def smallest_fpr(self) -> float:
        return tail.smallest_fpr(self.samples)

    def save(self, folder: Path) -> Path:
        path = folder / FILENAME
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> Calibration | None:
        """The version's calibration, or None when it has none. Raises ``ValueError`` for a
        file written by an older format (it must be recalibrated, not guessed at)."""
        path = folder / FILENAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format", 1) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path} has calibration format {found}, not {FORMAT}")
        try:
            for key in ("detectors", "bits", "medians"):
                data[key] = tuple(data[key])
            data["tails"] = {name: TailModel(**t) for name, t in data["tails"].items()}
            data["combined"] = TailModel(**data["combined"])
            calibration = cls(**data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} is not a calibration: {exc!r}") from None
        calibration.validate()
        return calibration

    def validate(self) -> None:
        """Raises ``ValueError`` unless every number can be trusted: a wrong file must fail
        closed at load (a negative scale would pass every input)."""
        if self.rule not in RULES or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"calibration rule {self.rule!r} or samples {self.samples!r} invalid")
        missing = [d for d in self.detectors if d not in self.tails]
        if not self.detectors or missing:
            raise ValueError(f"calibration has no tail for detectors {missing or 'at all'}")
        for name, model in [*self.tails.items(), ("combined", self.combined)]:
            tail.validate(model, self.samples, name)


def threshold(fpr: float) -> float:
    """The combined score a clean input exceeds with probability ``fpr``."""
    return -math.log10(fpr)


def statistic(surprises: torch.Tensor, rule: str) -> torch.Tensor:
    """(n, D) per-detector surprise -> (n,) combining statistic."""
    return surprises.amax(dim=1) if rule == "max" else surprises.sum(dim=1)


@dataclass(frozen=True)
class Combiner:
    """A calibration's tail models on one device: raw detector scores -> combined score."""

    detectors: TailTensors
    combined: TailTensors
    rule: str

    @classmethod
    def on(cls, calibration: Calibration, device: torch.device) -> Combiner:
        models = [calibration.tails[name] for name in calibration.detectors]
        return cls(
            TailTensors.stack(models, device),
            TailTensors.stack([calibration.combined], device),
            calibration.rule,
        )

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(n, D) raw scores -> (n,) combined surprise, on the scores' device."""
        t = statistic(tail.surprise(scores, self.detectors), self.rule)
        return tail.surprise(t.unsqueeze(1), self.combined)[:, 0]


def combined_numpy(scores: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The combined score in float64 numpy, for offline reports and checks."""
    columns = [
        tail.surprise_numpy(scores[:, i], calibration.tails[name])
        for i, name in enumerate(calibration.detectors)
    ]
    surprises = np.column_stack(columns)
    t = surprises.max(axis=1) if calibration.rule == "max" else surprises.sum(axis=1)
    return tail.surprise_numpy(t, calibration.combined)


def fit(
    scores: np.ndarray,
    detectors: tuple[str, ...],
    bits: tuple[int, ...],
    medians: tuple[int, ...],
    targets: tuple[float, ...],
    rule: str = "max",
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """Calibrates from clean scores (n, D), one column per detector.

    Raises ``tail.UnsupportedTarget`` when a target FPR needs more clean images than given, and
    ``ValueError`` for a malformed score matrix or an unknown rule.
    """
    if rule not in RULES:
        raise ValueError(f"combining rule must be one of {RULES}, got {rule!r}")
    if scores.ndim != 2 or scores.shape[1] != len(detectors):
        raise ValueError("need an (n, detectors) matrix of clean scores")
    if not np.isfinite(scores).all():
        raise ValueError("clean calibration scores must be finite")
    for target in targets:
        tail.check_target(target, len(scores))
    tails = {name: _fit_detector(scores[:, i], name) for i, name in enumerate(detectors)}
    surprises = np.column_stack(
        [tail.surprise_numpy(scores[:, i], tails[name]) for i, name in enumerate(detectors)]
    )
    t = surprises.max(axis=1) if rule == "max" else surprises.sum(axis=1)
    combined_tail = tail.fit(t)
    combined = tail.surprise_numpy(t, combined_tail)
    return Calibration(
        detectors=detectors,
        bits=bits,
        medians=medians,
        rule=rule,
        tails=tails,
        combined=combined_tail,
        samples=len(scores),
        calibration_fpr={repr(a): float((combined > threshold(a)).mean()) for a in targets},
        meta={"created_at": time.time(), **(meta or {})},
    )


def _fit_detector(scores: np.ndarray, name: str) -> TailModel:
    """A registered detector's tail is fitted on its range's re-expression; an unregistered
    name (tests, offline studies) on the raw score."""
    detector = DETECTORS.get(name)
    if detector is None:
        return tail.fit(scores)
    return tail.fit(scores, detector.bound, detector.log_tail)


def clopper_pearson_upper(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a binomial proportion (Clopper & Pearson 1934):
    the ``p`` at which seeing ``successes`` or fewer has probability ``1 - confidence``."""
    if trials <= 0:
        return 1.0
    if successes >= trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, successes + 1, trials - successes))


def held_out(
    calibration: Calibration, clean_scores: np.ndarray, targets: tuple[float, ...]
) -> dict[str, dict[str, float]]:
    """Realised FPR of each target on held-out clean scores (n, D), with its 95 % upper bound."""
    combined = combined_numpy(clean_scores, calibration)
    out = {}
    for target in targets:
        flagged = int((combined > threshold(target)).sum())
        out[repr(target)] = {
            "target": target,
            "flagged": flagged,
            "samples": len(combined),
            "fpr": flagged / max(len(combined), 1),
            "upper95": clopper_pearson_upper(flagged, len(combined)),
        }
    return out
