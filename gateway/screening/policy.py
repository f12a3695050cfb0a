"""Per-model screening policy: which detectors run, the two tiers, and what each verdict does.

Set in the model's ``config.pbtxt`` parameters, so a policy travels with the model:

    parameters { key: "screening" value: { string_value: "on" } }            # on | off
    parameters { key: "screening_detectors" value: { string_value: "feature_squeezing,..." } }
    parameters { key: "squeeze_bits" value: { string_value: "1" } }
    parameters { key: "squeeze_medians" value: { string_value: "2" } }
    parameters { key: "screening_mahalanobis_layer" value: { string_value: "penultimate" } }
    parameters { key: "screening_combiner" value: { string_value: "max" } }  # max | fisher
    parameters { key: "screening_block_fpr" value: { string_value: "0.005" } }
    parameters { key: "screening_review_fpr" value: { string_value: "0.05" } }
    parameters { key: "screening_action" value: { string_value: "block" } }  # adversarial tier
    parameters { key: "screening_review_action" value: { string_value: "review" } }  # suspicious
    parameters { key: "screening_uncalibrated" value: { string_value: "refuse" } }  # or "allow"

Each image gets one verdict from its combined score (a clean surprise, ``calibration.py``):
``adversarial`` above the block tier's threshold (clean inputs land there at ``block_fpr``),
``suspicious`` above the review tier's (``review_fpr``), else ``clean``; ``uncalibrated`` when
the version has no calibration. Adversarial images get ``screening_action``: ``block`` or
``quarantine`` withhold them, ``flag`` and ``allow`` serve them. Suspicious images are served;
with ``review`` (the default) a copy goes to the quarantine store as a review record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bastion.gateway.repository import ConfigError, ModelConfig
from bastion.gateway.screening.calibration import RULES, threshold
from bastion.gateway.screening.detectors import DETECTORS
from bastion.gateway.screening.mahalanobis import PENULTIMATE
from bastion.kernels.squeeze import SqueezeSpec

ACTIONS = ("allow", "flag", "block", "quarantine")
REVIEW_ACTIONS = ("review", "allow")
WITHHELD = ("block", "quarantine")
ADVERSARIAL, SUSPICIOUS, CLEAN, UNCALIBRATED = "adversarial", "suspicious", "clean", "uncalibrated"
VERDICTS = (CLEAN, SUSPICIOUS, ADVERSARIAL, UNCALIBRATED)


@dataclass(frozen=True)
class ScreeningPolicy:
    detectors: tuple[str, ...]
    squeeze: SqueezeSpec
    action: str
    allow_uncalibrated: bool
    block_fpr: float = 0.005
    review_fpr: float = 0.05
    review_action: str = "review"
    combiner: str = "max"
    mahalanobis_layer: str = PENULTIMATE

    @property
    def thresholds(self) -> dict[str, float]:
        """Combined-score threshold per tier (verdict): ``-log10`` of its target FPR."""
        return {ADVERSARIAL: threshold(self.block_fpr), SUSPICIOUS: threshold(self.review_fpr)}

    @property
    def targets(self) -> dict[str, float]:
        return {ADVERSARIAL: self.block_fpr, SUSPICIOUS: self.review_fpr}


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
        block_fpr = _rate(params, "screening_block_fpr", "0.005")
        review_fpr = _rate(params, "screening_review_fpr", "0.05")
        if not 0.0 < block_fpr < review_fpr < 1.0:
            raise ValueError(
                f"need 0 < screening_block_fpr < screening_review_fpr < 1, got block "
                f"{block_fpr:g} and review {review_fpr:g} (fractions: 0.005 is 0.5 %)"
            )
    except ValueError as exc:
        raise ConfigError(f"model {config.name!r}: screening parameters: {exc}") from None
    action = params.get("screening_action", "block")
    if action not in ACTIONS:
        raise ConfigError(f"model {config.name!r}: screening_action must be one of {ACTIONS}")
    review_action = params.get("screening_review_action", "review")
    if review_action not in REVIEW_ACTIONS:
        raise ConfigError(
            f"model {config.name!r}: screening_review_action must be one of {REVIEW_ACTIONS}"
        )
    combiner = params.get("screening_combiner", "max")
    if combiner not in RULES:
        raise ConfigError(f"model {config.name!r}: screening_combiner must be one of {RULES}")
    uncalibrated = params.get("screening_uncalibrated", "refuse")
    if uncalibrated not in ("refuse", "allow"):
        raise ConfigError(f"model {config.name!r}: screening_uncalibrated is refuse or allow")
    return ScreeningPolicy(
        detectors,
        squeeze,
        action,
        uncalibrated == "allow",
        block_fpr=block_fpr,
        review_fpr=review_fpr,
        review_action=review_action,
        combiner=combiner,
        mahalanobis_layer=params.get("screening_mahalanobis_layer", PENULTIMATE),
    )


def _rate(params: dict[str, str], key: str, default: str) -> float:
    text = params.get(key, default)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key} must be a fraction such as 0.005, got {text!r}") from None


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
    reviewed: list[int] = field(default_factory=list)


def verdicts(combined: np.ndarray, thresholds: dict[str, float] | None) -> list[str]:
    """One verdict per combined score (n,): the strictest tier whose threshold it is above.

    Compared in the scores' own precision, so a score equal to a threshold passes that tier
    (float32 2.30103 is above float64 2.30103), as it does offline and at calibration.
    """
    if thresholds is None:
        return [UNCALIBRATED] * len(combined)
    cast = combined.dtype.type
    block = combined > cast(thresholds[ADVERSARIAL])
    review = combined > cast(thresholds[SUSPICIOUS])
    return [
        ADVERSARIAL if b else SUSPICIOUS if r else CLEAN
        for b, r in zip(block.tolist(), review.tolist(), strict=True)
    ]


def decide(
    combined: np.ndarray,
    thresholds: dict[str, float] | None,
    action: str,
    review_action: str = "review",
) -> Decision:
    """Verdicts and actions per image from the combined scores of one request."""
    per_image = verdicts(combined, thresholds)
    by_verdict = {ADVERSARIAL: action, SUSPICIOUS: review_action}
    actions = [by_verdict.get(v, "allow") for v in per_image]
    return Decision(
        verdicts=per_image,
        actions=actions,
        withheld=[i for i, a in enumerate(actions) if a in WITHHELD],
        flagged=[i for i, a in enumerate(actions) if a == "flag"],
        quarantined=[i for i, a in enumerate(actions) if a == "quarantine"],
        reviewed=[i for i, a in enumerate(actions) if a == "review"],
    )
