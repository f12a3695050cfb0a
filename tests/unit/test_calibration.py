"""The clean-tail calibration: p-values past the largest clean score, tiers at any supported FPR,
the combining rules, the held-out report, the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bastion.gateway.screening import tail
from bastion.gateway.screening.calibration import (
    Calibration,
    Combiner,
    clopper_pearson_upper,
    combined_numpy,
    fit,
    held_out,
    threshold,
)
from bastion.gateway.screening.tail import UnsupportedTarget

# Known clean distributions: light (exponential, xi = 0), heavy (Pareto-like Student t, xi > 0)
# and bounded (beta, xi < 0), each with its exact survival function to score the threshold by.
DISTRIBUTIONS = {
    "exponential": stats.expon(),
    "student-t3": stats.t(3),
    "beta": stats.beta(2, 5),
}


def true_fpr(dist: stats.rv_continuous, model: tail.TailModel, fpr: float) -> float:
    """The exact clean rate above the fitted threshold: P(surprise(s) > -log10 fpr), found on the
    raw-score axis by bisection (surprise is monotone in the score)."""
    low, high = float(dist.ppf(0.5)), float(dist.ppf(1 - 1e-9))
    for _ in range(100):
        mid = (low + high) / 2
        if tail.surprise_numpy(np.array([mid]), model)[0] > threshold(fpr):
            high = mid
        else:
            low = mid
    return float(dist.sf(high))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("fpr", [0.001, 0.005, 0.05])
def test_tail_thresholds_realise_their_rate_on_a_known_distribution(name: str, fpr: float) -> None:
    """2,000 clean scores: at 0.1 % the empirical p-value alone could not go below 1/2,001; the
    fitted tail sets the threshold, and its exact rate stays within a factor of the target
    (averaged over seeds, so one unlucky draw does not decide)."""
    dist = DISTRIBUTIONS[name]
    rates = []
    for seed in range(8):
        scores = dist.rvs(size=2000, random_state=np.random.default_rng(seed))
        rates.append(true_fpr(dist, tail.fit(scores), fpr))
    mean = float(np.mean(rates))
    assert 0.5 * fpr <= mean <= 1.6 * fpr, (name, fpr, rates)


def test_p_values_keep_falling_past_the_largest_clean_score() -> None:
    model = tail.fit(np.random.default_rng(0).exponential(size=1000))
    top = max(model.reference)
    surprise = tail.surprise_numpy(np.array([top, top + 1, top + 3]), model)
    assert 3 < surprise[0] < surprise[1] < surprise[2]  # 1,000 scores alone cap at log10(1001)


def test_body_p_value_is_the_conformal_one() -> None:
    model = tail.fit(np.arange(1000.0))
    assert model.start == 899.0  # the tail is the top 100 scores
    # 149 clean scores lie above 850.5: p = (1 + 149) / 1001
    expected = -np.log10(150 / 1001)
    assert tail.surprise_numpy(np.array([850.5]), model)[0] == pytest.approx(expected)


def test_device_and_numpy_surprise_agree() -> None:
    rng = np.random.default_rng(1)
    models = [tail.fit(rng.exponential(size=600)), tail.fit(rng.standard_t(3, size=600))]
    scores = np.column_stack([rng.exponential(size=50) * 3, rng.standard_t(3, size=50) * 3])
    scores[0] = [np.inf, 1e9]
    device = tail.surprise(
        torch.from_numpy(scores).float(), tail.TailTensors.stack(models, torch.device("cpu"))
    ).numpy()
    expected = np.column_stack([tail.surprise_numpy(scores[:, i], m) for i, m in enumerate(models)])
    np.testing.assert_allclose(device, expected, rtol=1e-4, atol=1e-4)
    assert device.max() <= -np.log10(tail.FLOOR) + 1e-3


@pytest.mark.parametrize("rule", ["max", "fisher"])
def test_combined_score_is_calibrated_at_both_tiers_on_held_out_data(rule: str) -> None:
    rng = np.random.default_rng(2)
    calibration = fit(
        rng.gamma(2.0, size=(4000, 3)), ("a", "b", "c"), (1,), (2,), (0.005, 0.05), rule
    )
    report = held_out(calibration, rng.gamma(2.0, size=(40000, 3)), (0.005, 0.05))
    for target in (0.005, 0.05):
        realised = report[repr(target)]
        assert 0.5 * target <= realised["fpr"] <= 1.5 * target, report
        assert realised["upper95"] > realised["fpr"]
    device = Combiner.on(calibration, torch.device("cpu"))
    scores = rng.gamma(2.0, size=(64, 3))
    np.testing.assert_allclose(
        device(torch.from_numpy(scores).float()).numpy(),
        combined_numpy(scores, calibration),
        rtol=1e-3,
        atol=1e-3,
    )


def test_fisher_adds_up_moderate_scores_that_max_lets_pass() -> None:
    rng = np.random.default_rng(3)
    clean = rng.normal(size=(2000, 2))
    both = np.array([[2.3, 2.3]])  # each about the 1 % clean quantile, together far rarer
    by_rule = {
        rule: combined_numpy(both, fit(clean, ("a", "b"), (1,), (2,), (0.005,), rule))[0]
        for rule in ("max", "fisher")
    }
    assert by_rule["fisher"] > threshold(0.005) > by_rule["max"]


def test_unsupportable_target_is_refused_with_the_data_it_needs() -> None:
    scores = np.random.default_rng(4).exponential(size=(1000, 2))
    with pytest.raises(UnsupportedTarget, match=r"needs at least 9,999 clean calibration images"):
        fit(scores, ("a", "b"), (1,), (2,), (0.00001, 0.05))
    with pytest.raises(UnsupportedTarget, match="needs at least 500"):
        fit(scores[:300], ("a", "b"), (1,), (2,), (0.05,))
    assert tail.samples_needed(0.001) == 500 and tail.smallest_fpr(1000) < 0.0001


@pytest.mark.parametrize(
    ("scores", "rule"),
    [(np.ones((1000, 2)), "max"), (np.full((1000, 3), np.inf), "max"), (np.ones((1000, 3)), "sum")],
    ids=["wrong-columns", "non-finite", "unknown-rule"],
)
def test_fit_refuses_unusable_calibration_data(scores: np.ndarray, rule: str) -> None:
    with pytest.raises(ValueError):
        fit(scores, ("a", "b", "c"), (1,), (2,), (0.05,), rule)


def test_clopper_pearson_upper_bound_is_the_exact_binomial_one() -> None:
    # 0 of 1,000 has the closed form 1 - 0.05 ** (1 / 1000) (the "rule of three": ~3 / n)
    assert clopper_pearson_upper(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)
    # the bound is the rate at which seeing 5 or fewer of 1,000 has probability 5 %
    upper = clopper_pearson_upper(5, 1000)
    assert stats.binom.cdf(5, 1000, upper) == pytest.approx(0.05, rel=1e-6)
    assert clopper_pearson_upper(10, 10) == 1.0


def test_calibration_file_round_trips_and_refuses_the_old_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    calibration = fit(rng.gamma(2.0, size=(1000, 2)), ("a", "b"), (1,), (2,), (0.005, 0.05))
    calibration.save(tmp_path)
    assert Calibration.load(tmp_path) == calibration
    assert Calibration.load(tmp_path / "missing") is None
    (tmp_path / "calibration.json").write_text(json.dumps({"detectors": ["a"]}))
    with pytest.raises(ValueError, match="format 1"):
        Calibration.load(tmp_path)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d["combined"].update(scale=-1.0), "scale is not positive"),
        (lambda d: d["tails"]["a"].update(reference=d["tails"]["a"]["reference"][::-1]), "sorted"),
        (lambda d: d.update(samples=10**9), "not the calibration samples"),
        (lambda d: d["tails"].pop("b"), "no tail for detectors"),
        (lambda d: d["combined"].update(shape=float("nan")), "not finite"),
    ],
    ids=["negative-scale", "unsorted", "samples", "missing-tail", "nan-shape"],
)
def test_a_tampered_calibration_file_is_refused_not_trusted(
    tmp_path: Path, edit: object, why: str
) -> None:
    """A wrong number must fail closed at load: a negative scale would pass every input."""
    rng = np.random.default_rng(6)
    fit(rng.gamma(2.0, size=(1000, 2)), ("a", "b"), (1,), (2,), (0.005,)).save(tmp_path)
    path = tmp_path / "calibration.json"
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=why):
        Calibration.load(tmp_path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="format"):
        Calibration.load(tmp_path)
