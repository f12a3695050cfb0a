"""The line-search test: a query on the line through two of its client's recent pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from bastion.benchmarks.incident_clients import HonestSource
from bastion.gateway.defence.fingerprint import fingerprints
from bastion.gateway.defence.line_search import KEPT, WINDOW, LineSearches, line_ratio
from bastion.gateway.defence.service import DefenceService
from bastion.gateway.errors import Forbidden
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float


def digits(count: int, start: int = 0) -> np.ndarray:
    """(count, 1, 28, 28) float32 test digits in [0, 1]."""
    return to_float(load_split("test")[0][start : start + count])


def test_a_blend_of_two_earlier_pictures_and_a_step_beyond_them_lie_on_their_line() -> None:
    seed, start = digits(2).reshape(2, -1)
    window = np.stack([seed, start])
    for t in (0.5, 0.25, 0.875, 1.5, -0.3):  # a binary search's blends, a geometric step
        assert line_ratio(seed + t * (start - seed), window) < 1e-6
    assert line_ratio(digits(1, 2).reshape(-1), window) > 0.5  # another digit


def test_pairs_and_queries_closer_than_a_step_are_skipped() -> None:
    seed, start = digits(2).reshape(2, -1)
    almost = seed.copy()
    almost[:3] += 0.05  # a re-encode's change, L2 0.09
    assert line_ratio(start, np.stack([seed, almost])) == float("inf")  # the ends: one picture
    assert line_ratio(almost, np.stack([seed, start])) == float("inf")  # next to an end
    assert line_ratio(seed, seed[None, :]) == float("inf")  # one picture is no line


def test_honest_photos_retries_and_re_encodes_are_never_on_a_line() -> None:
    """The hardest honest client: five digits photographed again and again (rotated, scaled,
    shifted), with exact retries and JPEG re-encodes of earlier photos."""
    lines = LineSearches(clients=8, salt=3)
    on_line = 0
    for client in range(4):
        source = HonestSource(digits(5, 100 + 5 * client), seed=client, mix=0.1)
        for _ in range(150):
            _, image = source.next()
            on_line += lines.check(f"honest-{client}", image)
    assert on_line == 0


@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_a_binary_search_between_two_digits_is_caught_at_its_first_blend(sigma: float) -> None:
    """HopSkipJump's first search: the seed, its start (another digit), then blends, each
    with OARS-style uniform noise of L-inf ``sigma`` on every query."""
    rng = np.random.default_rng(0)
    seed, start = digits(2, 10)
    lines = LineSearches(clients=4, salt=3)

    def noisy(image: np.ndarray) -> np.ndarray:
        return np.clip(image + rng.uniform(-sigma, sigma, image.shape), 0, 1)

    assert not lines.check("attacker", noisy(seed))
    assert not lines.check("attacker", noisy(start))
    low, high, caught = 0.0, 1.0, []
    for _ in range(6):
        alpha = (low + high) / 2
        caught.append(lines.check("attacker", noisy((1 - alpha) * seed + alpha * start)))
        low = alpha  # read as "not adversarial yet": the search walks towards the start
    assert all(caught)
    assert not lines.check("someone else", noisy((seed + start) / 2))  # no window of its own


def test_memory_is_bounded_by_window_clients_and_kept_pixels() -> None:
    lines = LineSearches(clients=2, salt=3)
    for client in ("a", "b", "c"):
        for image in digits(WINDOW + 3):
            lines.check(client, image)
    assert len(lines) == 2 and "a" not in lines._rows
    assert lines._rows["c"].shape == (WINDOW, 784) and lines._rows["c"].dtype == np.uint8
    rng = np.random.default_rng(1)
    seed, start = rng.random((2, 3, 64, 64), dtype=np.float32)  # a large input
    lines.check("big", seed)
    lines.check("big", start)
    assert lines._rows["big"].shape == (2, KEPT)
    assert lines.check("big", 0.5 * seed + 0.5 * start)  # pixels kept: still on the line
    assert not lines.check("big", rng.random((3, 64, 64), dtype=np.float32))


def test_the_service_withholds_a_blend_as_a_probe_and_answers_the_honest() -> None:
    """Through ``observe`` and ``enforce``: the blend gets 403 reason ``probe``, counts as a
    probe against its sender, and its near-duplicates are refused after it; another client's
    pictures are answered."""
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30), Metrics(CollectorRegistry())
    )
    spec = defence.fingerprint_spec
    seed, start, other = digits(3, 20)

    def ask(client: str, image: np.ndarray) -> str:
        image = image[None].astype(np.float32)
        prints = fingerprints(torch.from_numpy(image), spec).numpy()
        observed = defence.observe(client, prints, ["clean"], image, np.ones((1, 4), np.float32), 7)
        try:
            defence.enforce(client, observed, None)
        except Forbidden as exc:
            defence.settle(observed, served=False)
            return str(exc.details["reason"])
        defence.settle(observed, served=True)
        return "answered"

    assert [ask("attacker", x) for x in (seed, start)] == ["answered", "answered"]
    assert ask("attacker", 0.5 * seed + 0.5 * start) == "probe"
    assert defence.ladder.account("attacker").probes == 1
    assert [ask("honest", x) for x in (seed, other, start)] == ["answered"] * 3
