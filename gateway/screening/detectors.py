"""Detectors: pure batched functions, one score per sample, higher meaning more suspicious.

Each is described by a ``Detector`` (what it needs: squeezed copies, an input gradient) and
registered by name, so the screening pipeline is data: the fused job computes what the chosen
detectors need and calls them. A detector never raises for an odd input; a non-finite score
becomes +inf, the most suspicious value, so a broken input can never pass silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bastion.gateway.screening import mahalanobis
from bastion.gateway.screening.mahalanobis import ClassGaussian


@dataclass(frozen=True, slots=True)
class ScreenInputs:
    """What the fused job hands to the detectors, all on the device."""

    probs: torch.Tensor  # (n, K) softmax of the original inputs
    squeezed_probs: torch.Tensor | None = None  # (S, n, K) softmax of each squeezed copy
    gradient: torch.Tensor | None = None  # (n, ...) d CE(f(x), argmax f(x)) / dx
    features: torch.Tensor | None = None  # (n, E) pooled features of the Gaussian's layer
    gaussian: ClassGaussian | None = None  # fitted on the training split, on the device


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    score: Callable[[ScreenInputs], torch.Tensor]
    needs_squeeze: bool = False
    needs_gradient: bool = False
    needs_features: bool = False
    summary: str = ""
    bound: float | None = None  # the score's maximum, when it has one (shapes its tail fit)
    log_tail: bool = False  # a positive unbounded score: its tail is fitted on log s


def feature_squeezing(inputs: ScreenInputs) -> torch.Tensor:
    """Max over squeezers of the L1 distance between softmax outputs (Xu, Evans, Qi, NDSS 2018).

    Range 0..2: a clean input's prediction barely moves when its pixels are squeezed, an
    adversarial perturbation is often squeezed away and the prediction jumps.
    """
    assert inputs.squeezed_probs is not None
    distance = (inputs.squeezed_probs - inputs.probs.unsqueeze(0)).abs().sum(dim=-1)
    return distance.amax(dim=0)


def confidence_margin(inputs: ScreenInputs) -> torch.Tensor:
    """1 - (top-1 minus top-2 probability): minimum-distortion attacks (CW-L2, DeepFool) stop
    just across the decision boundary, where the margin is small (Hendrycks & Gimpel 2017)."""
    probs = inputs.probs
    if probs.shape[-1] < 2:
        return torch.zeros(probs.shape[0], device=probs.device, dtype=probs.dtype)
    top = probs.topk(2, dim=-1).values
    return 1.0 - (top[:, 0] - top[:, 1])


def gradient_norm(inputs: ScreenInputs) -> torch.Tensor:
    """L2 norm of the input gradient of the cross-entropy against the predicted class: large
    near a decision boundary, where adversarial examples tend to sit."""
    assert inputs.gradient is not None
    return inputs.gradient.flatten(1).norm(dim=1)


def mahalanobis_distance(inputs: ScreenInputs) -> torch.Tensor:
    """Smallest squared Mahalanobis distance of a layer's pooled features to a class mean, under
    class means and a tied covariance fitted on the training split (Lee et al., NeurIPS 2018)."""
    assert inputs.features is not None and inputs.gaussian is not None
    return mahalanobis.score(inputs.features, inputs.gaussian)


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "feature_squeezing",
            feature_squeezing,
            needs_squeeze=True,
            summary="L1 distance of softmax outputs under bit-depth and median squeezing",
            bound=2.0,
        ),
        Detector(
            "confidence_margin",
            confidence_margin,
            summary="1 - (top-1 - top-2 probability)",
            bound=1.0,
        ),
        Detector(
            "gradient_norm",
            gradient_norm,
            needs_gradient=True,
            summary="||d CE(f(x), y_hat) / dx||_2",
            log_tail=True,
        ),
        Detector(
            "mahalanobis",
            mahalanobis_distance,
            needs_features=True,
            summary="min over classes of the Mahalanobis distance of a layer's pooled features",
            log_tail=True,
        ),
    )
}


def get(names: tuple[str, ...]) -> tuple[Detector, ...]:
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detector {unknown[0]!r}; known: {sorted(DETECTORS)}")
    return tuple(DETECTORS[n] for n in names)


def run(detectors: tuple[Detector, ...], inputs: ScreenInputs) -> torch.Tensor:
    """Scores of every detector, (n, D), with non-finite scores mapped to +inf."""
    scores = torch.stack([d.score(inputs) for d in detectors], dim=1)
    return torch.nan_to_num(scores, nan=torch.inf, posinf=torch.inf)
