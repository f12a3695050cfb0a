"""Per-model screening policy: which detectors run, and what each verdict does to an image.

Set in the model's ``config.pbtxt`` parameters, so a policy travels with the model:

    parameters { key: "screening" value: { string_value: "on" } }            # on | off
    parameters { key: "screening_detectors" value: { string_value: "feature_squeezing,..." } }
    parameters { key: "squeeze_bits" value: { string_value: "1" } }
    parameters { key: "squeeze_medians" value: { string_value: "2" } }
    parameters { key: "screening_action" value: { string_value: "block" } }  # for "adversarial"
    parameters { key: "screening_uncalibrated" value: { string_value: "refuse" } }  # or "allow"

A verdict is ``clean``, ``adversarial`` (the combined score is above the calibrated threshold) or
``uncalibrated``; clean and uncalibrated images are always allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gateway.repository import ConfigError, ModelConfig
from gateway.screening.detectors import DETECTORS
from kernels.squeeze import SqueezeSpec

ACTIONS = ("allow", "flag", "block", "quarantine")
WITHHELD = ("block", "quarantine")


@dataclass(frozen=True)
class ScreeningPolicy:
    detectors: tuple[str, ...]
    squeeze: SqueezeSpec
    action: str
    allow_uncalibrated: bool


def from_config(config: ModelConfig) -> ScreeningPolicy | None:
    """The model's policy, or None when screening is off."""
    params = config.parameters
    if params.get("screening", "off").lower() != "on":
        return None
    try:
        names = tuple(n.strip() for n in params.get("screening_detectors", "").split(",") if n)
        detectors = names or tuple(DETECTORS)
        unknown = [n for n in detectors if n not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector {unknown[0]!r}")
        squeeze = SqueezeSpec(
            bits=_ints(params.get("squeeze_bits", "1")),
            medians=_ints(params.get("squeeze_medians", "2")),
        )
    except ValueError as exc:
        raise ConfigError(f"model {config.name!r}: screening parameters: {exc}") from None
    action = params.get("screening_action", "block")
    if action not in ACTIONS:
        raise ConfigError(f"model {config.name!r}: screening_action must be one of {ACTIONS}")
    uncalibrated = params.get("screening_uncalibrated", "refuse")
    if uncalibrated not in ("refuse", "allow"):
        raise ConfigError(f"model {config.name!r}: screening_uncalibrated is refuse or allow")
    return ScreeningPolicy(detectors, squeeze, action, uncalibrated == "allow")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


@dataclass
class Decision:
    """What screening did to each image of one request."""

    verdicts: list[str]
    actions: list[str]
    withheld: list[int] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)


def decide(combined: np.ndarray, threshold: float | None, action: str) -> Decision:
    """Verdicts and actions per image from the combined scores of one request."""
    if threshold is None:
        verdicts = ["uncalibrated"] * len(combined)
    else:
        # compare in the scores' own precision: a percentile equal to the threshold must pass
        # (float32 0.962 is above float64 0.962), as it does offline and at calibration
        above = combined > combined.dtype.type(threshold)
        verdicts = ["adversarial" if flag else "clean" for flag in above.tolist()]
    actions = [action if v == "adversarial" else "allow" for v in verdicts]
    return Decision(
        verdicts=verdicts,
        actions=actions,
        withheld=[i for i, a in enumerate(actions) if a in WITHHELD],
        flagged=[i for i, a in enumerate(actions) if a == "flag"],
        quarantined=[i for i, a in enumerate(actions) if a == "quarantine"],
    )
