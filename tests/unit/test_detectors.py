"""Detector math against hand-computed cases, and the promise that no detector ever raises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway.screening.detectors import (
    DETECTORS,
    ScreenInputs,
    confidence_margin,
    feature_squeezing,
    get,
    gradient_norm,
    mahalanobis_distance,
    run,
)
from bastion.gateway.screening.mahalanobis import fit
from bastion.gateway.screening.policy import decide

THREE = ("feature_squeezing", "confidence_margin", "gradient_norm")


def test_feature_squeezing_is_the_max_l1_distance_over_squeezers() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    squeezed = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.8, 0.2], [0.0, 1.0]]])
    scores = feature_squeezing(ScreenInputs(probs, squeezed))
    assert scores.tolist() == pytest.approx([0.8, 1.0])


def test_confidence_margin_is_one_minus_top1_minus_top2() -> None:
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.34, 0.33, 0.33], [1.0, 0.0, 0.0]])
    assert confidence_margin(ScreenInputs(probs)).tolist() == pytest.approx([0.5, 0.99, 0.0])
    single_class = torch.tensor([[1.0], [1.0]])
    assert confidence_margin(ScreenInputs(single_class)).tolist() == [0.0, 0.0]


def test_gradient_norm_is_the_l2_norm_of_each_samples_gradient() -> None:
    gradient = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert gradient_norm(ScreenInputs(torch.ones(2, 2), gradient=gradient)).tolist() == [5.0, 0.0]


def test_registry_describes_what_each_detector_needs() -> None:
    assert DETECTORS["feature_squeezing"].needs_squeeze
    assert DETECTORS["gradient_norm"].needs_gradient
    assert DETECTORS["mahalanobis"].needs_features
    assert not (
        DETECTORS["confidence_margin"].needs_squeeze
        or DETECTORS["confidence_margin"].needs_gradient
    )
    with pytest.raises(ValueError, match="unknown detector"):
        get(("feature_squeezing", "astrology"))


def test_non_finite_scores_become_the_most_suspicious_value() -> None:
    probs = torch.tensor([[float("nan"), 0.5], [0.6, 0.4]])
    squeezed = torch.tensor([[[0.5, 0.5], [0.6, 0.4]]])
    gradient = torch.tensor([[float("inf"), 1.0], [0.0, 0.0]])
    scores = run(get(THREE), ScreenInputs(probs, squeezed, gradient))
    assert math.isinf(scores[0, 0]) and math.isinf(scores[0, 2])
    assert torch.isfinite(scores[1]).all()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 12), s=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_scores_stay_in_their_ranges_for_any_probabilities(
    n: int, k: int, s: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=generator) * 5, dim=1)
    squeezed = torch.softmax(torch.randn(s, n, k, generator=generator) * 5, dim=2)
    inputs = ScreenInputs(probs, squeezed, torch.randn(n, 3, generator=generator))
    scores = run(get(THREE), inputs)
    assert scores.shape == (n, 3)
    assert ((scores[:, 0] >= 0) & (scores[:, 0] <= 2 + 1e-6)).all()
    assert ((scores[:, 1] >= -1e-6) & (scores[:, 1] <= 1 + 1e-6)).all()
    assert (scores[:, 2] >= 0).all()


def test_mahalanobis_matches_a_direct_numpy_computation() -> None:
    """Class means, tied covariance (MLE plus the ridge) and min over classes of
    (z - mu_c)^T Sigma^-1 (z - mu_c), computed the textbook way (Lee et al. 2018, eq. 2)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    centres = rng.normal(size=(4, 6)) * 3
    features = centres[labels] + rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    gaussian = fit(torch.from_numpy(features), torch.from_numpy(labels), 4)
    means = np.stack([features[labels == c].mean(0) for c in range(4)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += 1e-6 * np.trace(covariance) / 6 * np.eye(6)
    precision = np.linalg.inv(covariance)
    queries = rng.normal(size=(10, 6)) * 4
    expected = np.min(
        [np.einsum("ni,ij,nj->n", queries - m, precision, queries - m) for m in means], axis=0
    )
    inputs = ScreenInputs(
        torch.ones(10, 4), features=torch.from_numpy(queries).float(), gaussian=gaussian
    )
    np.testing.assert_allclose(mahalanobis_distance(inputs).numpy(), expected, rtol=1e-3)


def test_mahalanobis_fit_refuses_a_class_without_samples() -> None:
    with pytest.raises(ValueError, match="classes"):
        fit(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), 3)


def test_a_score_equal_to_a_tier_threshold_passes_in_float32() -> None:
    thresholds = {"adversarial": 2.30103, "suspicious": 1.30103}  # float64, as computed
    combined = np.array([2.30103, 2.30104, 1.30103, 1.5, 0.2], dtype=np.float32)
    decision = decide(combined, thresholds, "block")
    assert decision.verdicts == ["suspicious", "adversarial", "clean", "suspicious", "clean"]
    assert decision.withheld == [1]


@pytest.mark.parametrize(
    ("action", "review", "withheld", "quarantined", "flagged", "reviewed"),
    [
        ("block", "review", [0], [], [], [1]),
        ("quarantine", "review", [0], [0], [], [1]),
        ("flag", "allow", [], [], [0], []),
        ("allow", "review", [], [], [], [1]),
    ],
)
def test_tiers_map_each_verdict_to_its_action(
    action: str, review: str, withheld: list, quarantined: list, flagged: list, reviewed: list
) -> None:
    thresholds = {"adversarial": 2.3, "suspicious": 1.3}
    decision = decide(np.array([5.0, 1.5, 0.1]), thresholds, action, review)
    assert decision.verdicts == ["adversarial", "suspicious", "clean"]
    assert decision.actions == [action, review, "allow"]
    assert (decision.withheld, decision.quarantined) == (withheld, quarantined)
    assert (decision.flagged, decision.reviewed) == (flagged, reviewed)


def test_without_calibration_every_image_is_uncalibrated_and_served() -> None:
    decision = decide(np.array([-1.0, -1.0]), None, "block")
    assert decision.verdicts == ["uncalibrated"] * 2
    assert decision.actions == ["allow"] * 2 and not decision.withheld
