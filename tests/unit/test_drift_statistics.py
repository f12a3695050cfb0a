"""Drift statistics against hand-computed values, numpy, and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway.monitoring import drift


def test_psi_matches_the_hand_computed_sum() -> None:
    ref = torch.tensor([0.5, 0.3, 0.2])
    obs = torch.tensor([0.3, 0.3, 0.4])
    expected = (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.4 - 0.2) * math.log(0.4 / 0.2)
    assert float(drift.psi(ref, obs)) == pytest.approx(expected)


def test_psi_is_zero_for_identical_and_floors_empty_bins() -> None:
    ref = torch.tensor([0.25, 0.25, 0.5, 0.0])
    assert float(drift.psi(ref, ref)) == pytest.approx(0.0, abs=1e-12)
    # an empty reference bin is floored, so mass appearing there gives a large, finite score
    value = float(drift.psi(ref, torch.tensor([0.2, 0.2, 0.4, 0.2])))
    assert math.isfinite(value) and value > 1.0


def test_js_divergence_hand_value_symmetry_and_bound() -> None:
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(drift.js_divergence(p, q)) == pytest.approx(math.log(2))
    a, b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    m = (a + b) / 2
    kl = lambda x: float((x * torch.log(x / m)).sum())  # noqa: E731
    assert float(drift.js_divergence(a, b)) == pytest.approx((kl(a) + kl(b)) / 2)
    assert float(drift.js_divergence(a, b)) == pytest.approx(float(drift.js_divergence(b, a)))


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5, width=32), min_size=1, max_size=60),
    edges=st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=9),
)
def test_bin_counts_match_numpy_searchsorted(values: list[float], edges: list[float]) -> None:
    edges_np = np.sort(np.array(edges, dtype=np.float32))
    values_np = np.array(values, dtype=np.float32)
    counts = drift.bin_counts(
        torch.from_numpy(np.stack([values_np, -values_np])),
        torch.from_numpy(np.stack([edges_np, edges_np])),
    )
    for row, data in enumerate([values_np, -values_np]):
        index = np.searchsorted(edges_np, data, side="right")
        np.testing.assert_array_equal(
            counts[row].numpy(), np.bincount(index, minlength=len(edges_np) + 1)
        )


def test_quantile_edges_split_the_reference_into_equal_mass() -> None:
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    edges = drift.quantile_edges(values, 10)
    shares = drift.proportions(drift.bin_counts(values.unsqueeze(0), edges.unsqueeze(0)))
    np.testing.assert_allclose(shares.numpy(), 0.1, atol=1e-3)


def test_mmd2_matches_the_definition_on_a_small_case() -> None:
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    k = lambda a, b: math.exp(-((a - b) ** 2) / 2)  # noqa: E731  bandwidth 1
    xx = (k(0, 0) + k(0, 1) + k(1, 0) + k(1, 1)) / 4
    yy = 1.0
    xy = (k(0, 3) + k(1, 3)) / 2
    assert drift.mmd2(x, y, 1.0) == pytest.approx(xx + yy - 2 * xy)


def test_permutation_pvalue_is_small_for_a_shift_and_not_for_the_same_distribution() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(200, 8, generator=g)
    same = torch.randn(100, 8, generator=g)
    shifted = torch.randn(100, 8, generator=g) + 0.5
    bandwidth = drift.median_bandwidth(ref)
    _, p_same = drift.mmd_permutation_test(same, ref, bandwidth, 500, g)
    value, p_shift = drift.mmd_permutation_test(shifted, ref, bandwidth, 500, g)
    assert p_same > 0.01
    assert p_shift == pytest.approx(1 / 501)
    assert value == pytest.approx(drift.mmd2(shifted, ref, bandwidth))


def test_permutation_pvalues_are_roughly_uniform_under_the_null() -> None:
    g = torch.Generator().manual_seed(2)
    pvalues = [
        drift.mmd_permutation_test(
            torch.randn(40, 4, generator=g), torch.randn(60, 4, generator=g), 2.5, 200, g
        )[1]
        for _ in range(60)
    ]
    rejected = sum(p <= 0.05 for p in pvalues)
    assert rejected <= 9  # 3 expected at a true 5 % level; a biased test rejects far more
