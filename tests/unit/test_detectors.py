"""Detector math against hand-computed cases, and the promise that no detector ever raises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.screening.detectors import (
    DETECTORS,
    ScreenInputs,
    confidence_margin,
    feature_squeezing,
    get,
    gradient_norm,
    run,
)


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
    assert not (DETECTORS["confidence_margin"].needs_squeeze
                or DETECTORS["confidence_margin"].needs_gradient)
    with pytest.raises(ValueError, match="unknown detector"):
        get(("feature_squeezing", "astrology"))


def test_non_finite_scores_become_the_most_suspicious_value() -> None:
    probs = torch.tensor([[float("nan"), 0.5], [0.6, 0.4]])
    squeezed = torch.tensor([[[0.5, 0.5], [0.6, 0.4]]])
    gradient = torch.tensor([[float("inf"), 1.0], [0.0, 0.0]])
    scores = run(get(tuple(DETECTORS)), ScreenInputs(probs, squeezed, gradient))
    assert math.isinf(scores[0, 0]) and math.isinf(scores[0, 2])
    assert torch.isfinite(scores[1]).all()


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 6), k=st.integers(1, 12), s=st.integers(1, 3), seed=st.integers(0, 2**16)
)
def test_scores_stay_in_their_ranges_for_any_probabilities(n: int, k: int, s: int,
                                                          seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=generator) * 5, dim=1)
    squeezed = torch.softmax(torch.randn(s, n, k, generator=generator) * 5, dim=2)
    inputs = ScreenInputs(probs, squeezed, torch.randn(n, 3, generator=generator))
    scores = run(get(tuple(DETECTORS)), inputs)
    assert scores.shape == (n, 3)
    assert ((scores[:, 0] >= 0) & (scores[:, 0] <= 2 + 1e-6)).all()
    assert ((scores[:, 1] >= -1e-6) & (scores[:, 1] <= 1 + 1e-6)).all()
    assert (scores[:, 2] >= 0).all()


def test_a_score_equal_to_the_threshold_passes_in_float32() -> None:
    from gateway.screening.policy import decide

    threshold = 0.962  # float64, as stored in calibration.json
    combined = np.array([0.962, 0.963, 0.5], dtype=np.float32)
    decision = decide(combined, threshold, "block")
    assert decision.verdicts == ["clean", "adversarial", "clean"]
    assert decision.withheld == [1]
