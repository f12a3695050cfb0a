"""Thresholds at a target false-positive rate, the combined percentile decision, the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.backends import COMBINED, load_backend
from gateway.registry import run_batch
from gateway.repository import ModelRepository
from gateway.screening.calibration import Calibration, combined_score, fit, threshold_at
from gateway.screening.policy import decide
from gateway.settings import DEFAULT_REPOSITORY
from models.data import load_split, to_float


def test_threshold_leaves_the_target_fraction_of_clean_scores_above_it() -> None:
    scores = np.arange(100, dtype=float)
    assert threshold_at(scores, 0.05) == 94.0  # index ceil(100 * 0.95) - 1
    assert (scores > threshold_at(scores, 0.05)).mean() == 0.05
    assert threshold_at(np.arange(1000.0), 0.01) == 989.0


def test_combined_score_is_the_max_clean_percentile() -> None:
    reference = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    scores = torch.tensor([[2.5, 10.0], [0.0, 45.0], [4.0, 0.0]])
    assert combined_score(scores, reference).tolist() == [0.5, 1.0, 1.0]


def test_fit_realises_at_most_the_target_rate_on_its_own_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=(1000, 3))
    calibration = fit(scores, ("a", "b", "c"), (1,), (2,), 0.05, meta={"note": "x"})
    assert calibration.calibration_fpr <= 0.05
    assert calibration.calibration_fpr >= 0.03
    for i, name in enumerate("abc"):
        assert (scores[:, i] > calibration.thresholds[name]).mean() == pytest.approx(0.05)
    calibration.save(tmp_path)
    loaded = Calibration.load(tmp_path)
    assert loaded == calibration
    assert Calibration.load(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("scores", "fpr"),
    [(np.ones((10, 3)), 0.05), (np.ones((100, 2)), 0.05), (np.ones((100, 3)), 0.0),
     (np.full((100, 3), np.inf), 0.05)],
    ids=["too-few", "wrong-columns", "zero-fpr", "non-finite"],
)
def test_fit_refuses_unusable_calibration_data(scores: np.ndarray, fpr: float) -> None:
    with pytest.raises(ValueError):
        fit(scores, ("a", "b", "c"), (1,), (2,), fpr)


def test_committed_calibration_holds_its_rate_on_the_held_out_test_split() -> None:
    """The bundled digits calibration (made by ``bastion calibrate digits``) on unseen digits."""
    config = ModelRepository(DEFAULT_REPOSITORY).config("digits")
    backend = load_backend(config, 1, "cpu", threads=1)
    calibration = backend.screening.calibration
    assert calibration.target_fpr == 0.05 and calibration.samples == 1000
    images, _ = load_split("test")
    outputs, _ = run_batch(backend, [{"images": to_float(images)}])
    decision = decide(outputs[COMBINED], calibration.combined_threshold, "block")
    test_fpr = len(decision.withheld) / len(images)
    assert 0.02 <= test_fpr <= 0.08, test_fpr
