"""The line-search test: a query on the line through two of its client's recent pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from bastion.benchmarks.incident_clients import HonestSource
from bastion.gateway.defence.fingerprint import fingerprints, picture_hash
from bastion.gateway.defence.line_search import (
    FAST_PUSH,
    FAST_SCAN,
    KEPT,
    PAIRS,
    REFUSED,
    WINDOW,
    LineSearches,
    intensity_line,
    line_ratio,
    numpy_push,
    numpy_scan,
    pair_ratios,
    push,
    scan,
)
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


def test_the_compiled_ring_loops_match_the_numpy_reference() -> None:
    """``scan`` and ``push`` (compiled by numba when installed) against the plain loops and
    their numpy twins on a ring of 8-bit digits filling and wrapping, and their ratios against
    ``pair_ratios``: blends on a line, repeats too close to count."""
    rng = np.random.default_rng(5)
    pictures = np.rint(digits(40).reshape(40, -1) * 255).astype(np.uint8)
    rings = {name: (np.zeros((WINDOW, 784), np.uint8), np.zeros((WINDOW, WINDOW)), [0])
             for name in ("fast", "plain", "numpy")}  # fmt: skip
    steps = {
        "fast": (FAST_SCAN, FAST_PUSH),
        "plain": (scan, push),
        "numpy": (numpy_scan, numpy_push),
    }
    kept: list[np.ndarray] = []
    for step in range(20):
        if step % 3 == 2 and len(kept) >= 2:  # a blend of two pictures in the ring
            t = rng.uniform(0.2, 0.8)
            query = np.rint((1 - t) * kept[0] + t * kept[-1]).astype(np.uint8)
        elif step % 5 == 4:
            query = kept[-1].copy()  # a repeat
        else:
            query = pictures[rng.integers(40)]
        results = {}
        for name, (rows, gram, filled) in rings.items():
            scan_with, push_with = steps[name]
            dots = np.empty(WINDOW + 1)
            ratios = scan_with(rows, gram, filled[0], query, dots, 0.25 * 255)
            filled[0] = push_with(rows, gram, filled[0], query, dots)
            results[name] = ratios
        np.testing.assert_allclose(results["fast"], results["plain"], rtol=1e-9)
        np.testing.assert_allclose(results["fast"], results["numpy"], rtol=1e-9)
        if len(kept) >= 2:
            first, second, expected = pair_ratios(query / 255.0, np.stack(kept) / 255.0)
            where = {pair: k for k, pair in enumerate(zip(*PAIRS[len(kept)], strict=True))}
            got = np.full(len(results["fast"]), np.inf)
            for i, j, r in zip(first, second, expected, strict=True):
                got[where[(int(i), int(j))]] = r
            np.testing.assert_allclose(results["fast"], got, rtol=1e-6, atol=1e-9)
            if step % 3 == 2:
                assert results["fast"].min() < 0.01
        kept = [*kept, query][-WINDOW:]
    for name in ("plain", "numpy"):
        assert np.array_equal(rings[name][0], rings["fast"][0])
        np.testing.assert_allclose(rings[name][1], rings["fast"][1])


def test_pairs_and_queries_closer_than_a_step_are_skipped() -> None:
    seed, start = digits(2).reshape(2, -1)
    almost = seed.copy()
    almost[:3] += 0.05  # a re-encode's change, L2 0.09
    assert line_ratio(start, np.stack([seed, almost])) == float("inf")  # the ends: one picture
    assert line_ratio(almost, np.stack([seed, start])) == float("inf")  # next to an end
    assert line_ratio(seed, seed[None, :]) == float("inf")  # one picture is no line


def check(lines: LineSearches, client: str, image: np.ndarray, answer: int = REFUSED) -> bool:
    return lines.check(client, image, answer, picture_hash(image)) is not None


def test_honest_photos_retries_and_re_encodes_are_never_on_a_line() -> None:
    """The hardest honest client: five digits photographed again and again (rotated, scaled,
    shifted), with exact retries and JPEG re-encodes of earlier photos."""
    lines = LineSearches(clients=8, salt=3)
    on_line = 0
    for client in range(4):
        source = HonestSource(digits(5, 100 + 5 * client), seed=client, mix=0.1)
        for _ in range(150):
            _, image = source.next()
            on_line += check(lines, f"honest-{client}", image)  # as if every one was refused
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

    assert not check(lines, "attacker", noisy(seed), 7)
    assert not check(lines, "attacker", noisy(start), 1)  # answered differently: a boundary
    low, high, caught = 0.0, 1.0, []
    for _ in range(6):
        alpha = (low + high) / 2
        caught.append(check(lines, "attacker", noisy((1 - alpha) * seed + alpha * start), 7))
        low = alpha  # read as "not adversarial yet": the search walks towards the start
    assert all(caught)
    assert not check(lines, "someone else", noisy((seed + start) / 2))  # no window of its own


def test_a_young_identity_continuing_a_suspects_line_search_is_caught_through_its_window() -> None:
    """A rotating attacker's next identity sends the next noisy blend: against its own (empty)
    window it is nothing; against the suspect identity's window it continues that search, at
    the looser ratio for suspects (noise of L-inf 0.06, what OARS has grown to by then)."""
    rng = np.random.default_rng(2)
    seed, start = digits(2, 50)

    def noisy(image: np.ndarray, sigma: float) -> np.ndarray:
        return np.clip(image + rng.uniform(-sigma, sigma, image.shape), 0, 1)

    lines = LineSearches(clients=8, salt=3)
    for image, label in ((seed, 3), (start, 8)):
        image = noisy(image, 0.02)
        lines.check("first", image, label, picture_hash(image))
    blend = noisy(0.4 * seed + 0.6 * start, 0.06)
    content = picture_hash(blend)
    assert lines.check("next", blend, 8, content) is None
    assert lines.check("other", blend, 8, content, suspects=("first",)) == "first"
    honest = LineSearches(clients=8, salt=3)
    for k, image in enumerate(digits(2, 50)):
        honest.check("first", image, k, k)
    others = digits(30, 200)
    assert all(honest.check(f"new-{k}", x, 0, k, ("first",)) is None for k, x in enumerate(others))


def test_variants_of_one_photo_answered_alike_and_intensity_series_are_let_through() -> None:
    """A cross-fade between two photos the model answers alike searches no boundary; an
    exposure, contrast or fade series lies on a line through a uniform picture."""
    seed, start, other = digits(3, 30).reshape(3, -1)
    lines = LineSearches(clients=4, salt=3)
    for t in (0.0, 1.0, 0.5, 0.25):
        assert not check(lines, "fade", (1 - t) * seed + t * start, 4)  # the same class
    for c in (1.0, 0.9, 0.8, 0.6, 0.45):  # exposure: refused each time, still let through
        assert not check(lines, "exposure", c * other)
    for c in (1.0, 0.8, 0.6):
        assert not check(lines, "contrast", 0.5 + c * (other - 0.5))
    assert intensity_line(other, 0.7 * other, 0.01)
    assert not intensity_line(seed, start, 1.0)  # two digits: nowhere near a uniform picture


def test_a_refused_line_search_is_remembered_and_a_refusal_after_the_fact_counts() -> None:
    seed, start = digits(2, 40).reshape(2, -1)
    lines = LineSearches(clients=4, salt=3)
    check(lines, "a", seed, 3)
    check(lines, "a", start, 3)  # answered alike so far
    blend = 0.5 * seed + 0.5 * start
    assert not check(lines, "a", blend, 3)
    lines.refused("a", [picture_hash(start)])  # the start was withheld after all
    again = 0.25 * seed + 0.75 * start
    assert check(lines, "a", again, 3)
    assert lines.refused_to(picture_hash(again)) == "a"
    lines.forget("a")
    assert lines.refused_to(picture_hash(again)) is None and len(lines) == 0


def test_memory_is_bounded_by_window_clients_and_kept_pixels() -> None:
    lines = LineSearches(clients=2, salt=3)
    for client in ("a", "b", "c"):
        for image in digits(WINDOW + 3):
            check(lines, client, image)
    assert len(lines) == 2 and "a" not in lines._windows
    rows = lines._windows["c"][784].rows
    assert rows.shape == (WINDOW, 784) and rows.dtype == np.uint8
    rng = np.random.default_rng(1)
    seed, start = rng.random((2, 3, 64, 64), dtype=np.float32)  # a large input
    check(lines, "big", seed)
    check(lines, "big", start)
    big = lines._windows["big"][3 * 64 * 64]
    assert big.rows.shape == (WINDOW, KEPT) and big.filled == 2
    assert check(lines, "big", 0.5 * seed + 0.5 * start)  # pixels kept: still on the line
    assert not check(lines, "big", rng.random((3, 64, 64), dtype=np.float32))
    assert check(lines, "big", 0.75 * seed + 0.25 * start)  # another input size between:
    assert not check(lines, "big", digits(1)[0])  # each size has its own window
    assert check(lines, "big", 0.625 * seed + 0.375 * start)


def test_the_service_withholds_a_blend_as_a_probe_and_answers_the_honest() -> None:
    """Through ``observe`` and ``enforce``: the blend gets 403 reason ``probe``, counts as a
    probe against its sender, and its near-duplicates are refused after it; another client's
    pictures are answered."""
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30), Metrics(CollectorRegistry())
    )
    spec = defence.fingerprint_spec
    seed, start, other = digits(3, 20)

    def ask(client: str, image: np.ndarray, label: int = 0, shared: bool = False) -> str:
        image = image[None].astype(np.float32)
        prints = fingerprints(torch.from_numpy(image), spec).numpy()
        answer = np.eye(4, dtype=np.float32)[label : label + 1]
        observed = defence.observe(client, prints, ["clean"], image, answer, 7)
        try:
            defence.enforce(client, observed, None, shared)
        except Forbidden as exc:
            defence.settle(observed, served=False)
            return str(exc.details["reason"])
        defence.settle(observed, served=True)
        return "answered"

    assert [ask("attacker", seed, 0), ask("attacker", start, 1)] == ["answered", "answered"]
    blend = 0.5 * seed + 0.5 * start
    assert ask("attacker", blend) == "probe"
    assert defence.ladder.account("attacker").probes == 1
    assert ask("attacker", blend) == "probe"  # resent: refused again, no more evidence
    assert ask("fresh identity", blend) == "probe"  # a rotating attacker's resend
    assert defence.ladder.account("attacker").probes == 1
    assert [ask("honest", x) for x in (seed, other, start)] == ["answered"] * 3
    ask("tenants", seed, 0, shared=True)
    ask("tenants", start, 1, shared=True)
    assert ask("tenants", 0.75 * seed + 0.25 * start, shared=True) == "answered"


def test_the_service_links_a_young_identity_continuing_a_suspects_search_to_its_campaign() -> None:
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30), Metrics(CollectorRegistry())
    )
    spec = defence.fingerprint_spec
    seed, start = digits(2, 60)

    def ask(client: str, image: np.ndarray, label: int) -> str:
        image = image[None].astype(np.float32)
        prints = fingerprints(torch.from_numpy(image), spec).numpy()
        answer = np.eye(4, dtype=np.float32)[label : label + 1]
        observed = defence.observe(client, prints, ["clean"], image, answer, 7)
        try:
            defence.enforce(client, observed, None)
        except Forbidden as exc:
            defence.settle(observed, served=False)
            return str(exc.details["reason"])
        defence.settle(observed, served=True)
        return "answered"

    ask("walker", seed, 0)
    ask("walker", start, 1)
    alpha = 0.5
    while defence.ladder.rung("walker") == "observe":  # its blends: probes, until throttled
        assert ask("walker", (1 - alpha) * seed + alpha * start, 0) == "probe"
        alpha = (alpha + 1) / 2
    assert ask("fresh", 0.7 * seed + 0.3 * start, 1) == "probe"
    assert defence.ladder.root("fresh") == defence.ladder.root("walker")
    assert ask("bystander", digits(1, 90)[0], 2) == "answered"  # a young honest identity
    assert defence.ladder.account("bystander").probes == 0
