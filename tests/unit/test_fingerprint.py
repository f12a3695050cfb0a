"""Query fingerprints (Blacklight) against the Python-integer reference, and the probe index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bastion.gateway.defence import probe_table
from bastion.gateway.defence.fingerprint import (
    EMPTY,
    FingerprintSpec,
    fingerprint_reference,
    fingerprints,
)
from bastion.gateway.defence.probe_index import ProbeIndex
from bastion.models import samples
from bastion.models.data import load_split, to_float

SPEC = FingerprintSpec(salt=20261130)


def digits(n: int = 16) -> np.ndarray:
    return to_float(load_split("test")[0][:: 1000 // n][:n])


def test_batched_fingerprints_equal_the_python_integer_reference() -> None:
    x = digits(6)
    batched = fingerprints(torch.from_numpy(x), SPEC).numpy()
    for i in range(len(x)):
        assert batched[i].tolist() == fingerprint_reference(x[i], SPEC)
    assert (batched != EMPTY).sum(axis=1).min() == SPEC.top


def test_a_blank_image_has_one_distinct_window_and_is_padded() -> None:
    blank = np.zeros((1, 1, 28, 28), np.float32)
    row = fingerprints(torch.from_numpy(blank), SPEC)[0].tolist()
    assert row[0] != EMPTY and set(row[1:]) == {int(EMPTY)}
    assert row == fingerprint_reference(blank[0], SPEC)


def test_the_salt_changes_every_hash() -> None:
    x = torch.from_numpy(digits(1))
    a = set(fingerprints(x, SPEC)[0].tolist())
    b = set(fingerprints(x, FingerprintSpec(salt=7))[0].tolist())
    assert not a & b


def shared(a: np.ndarray, b: np.ndarray) -> int:
    return len((set(a.tolist()) & set(b.tolist())) - {int(EMPTY)})


def test_attack_steps_match_and_distinct_digits_do_not() -> None:
    """A decision-based attack's next query is its last one plus a small step on a few pixels:
    most windows keep their quantised values. Different digits share almost nothing."""
    x = digits(16)
    rng = np.random.default_rng(0)
    step = x.copy()
    flip = rng.random(x.shape) < 0.02  # a sparse step: 2 % of the pixels move a lot
    step[flip] = np.clip(step[flip] + rng.choice([-0.4, 0.4], size=flip.sum()), 0, 1)
    fp = fingerprints(torch.from_numpy(np.concatenate([x, step])), SPEC).numpy()
    near = [shared(fp[i], fp[16 + i]) for i in range(16)]
    others = [shared(fp[i], fp[j]) for i in range(16) for j in range(16) if i != j]
    assert min(near) >= SPEC.threshold, near
    # Blacklight's false matches: a few pairs of distinct MNIST digits (ones, mostly) are
    # near-duplicates to it; over 20,000 pairs of the test split about 0.03 % reach T
    assert np.mean(np.array(others) >= SPEC.threshold) <= 0.01, sorted(others)[-5:]


def test_the_index_finds_the_closest_remembered_query_across_clients() -> None:
    clock = [0.0]
    index = ProbeIndex(
        capacity=64, top=SPEC.top, threshold=SPEC.threshold, ttl_s=60, clock=lambda: clock[0]
    )
    x = digits(16)
    fp = fingerprints(torch.from_numpy(x), SPEC).numpy()
    for i in range(16):
        assert index.match(fp[i]) is None  # nothing like it yet
        index.add(fp[i], f"client-{i}")
    found = index.match(fp[5])
    # hashes common to several digits point at their latest holder, so fewer than all 50 count
    assert found is not None and found.client == "client-5"
    assert SPEC.threshold <= found.shared <= SPEC.top
    clock[0] = 61.0
    assert index.match(fp[5]) is None  # expired


def test_a_reused_slot_forgets_its_old_query_and_memory_is_fixed() -> None:
    index = ProbeIndex(capacity=4, top=SPEC.top, threshold=SPEC.threshold)
    before = index.memory_bytes()
    fp = fingerprints(torch.from_numpy(digits(16)), SPEC).numpy()
    for row in fp:  # 16 queries through 4 slots
        index.add(row, None)
    assert len(index) == 4 and index.memory_bytes() == before
    occupied = int((index._keys != EMPTY).sum())
    assert occupied == len(set(fp[12:].ravel().tolist()) - {int(EMPTY)})  # no stale keys
    holders = index._holders[index._holders >= 0]
    assert (index._places.reshape(-1)[holders] >= 0).all()  # every entry knows its place
    assert index.match(fp[0]) is None  # overwritten
    assert index.match(fp[15]) is not None


def test_a_refusal_is_kept_only_while_the_slot_holds_that_query() -> None:
    index = ProbeIndex(capacity=2, top=SPEC.top, threshold=SPEC.threshold)
    fp = fingerprints(torch.from_numpy(digits(3)), SPEC).numpy()
    slot = index.add(fp[0], "a", content=11)
    index.keep_answer(slot, 7, np.ones(4, np.float32))
    index.keep_refusal(slot, 7, content=11)
    assert index.refused(slot, 7) and index.answer(slot, 7, 4) is None  # never the denied one
    assert not index.refused(slot, 8)  # another model's query
    index.add(fp[1], "b", content=12)
    reused = index.add(fp[2], "c", content=13)  # the ring came round: slot 0 holds another
    assert reused == slot and not index.refused(slot, 7)
    index.keep_refusal(slot, 7, content=11)  # a late settle for the old query changes nothing
    assert not index.refused(slot, 7)


def test_a_large_index_stays_within_two_kilobytes_per_query() -> None:
    index = ProbeIndex(capacity=100_000)
    assert index.memory_bytes() / 100_000 <= 2048


@pytest.mark.parametrize("kind", ["clean", "suspicious", "adversarial"])
def test_fingerprints_run_on_the_readme_samples(kind: str) -> None:
    x, _ = samples.load(kind)
    assert fingerprints(torch.from_numpy(x), SPEC).shape == (len(x), SPEC.top)


def test_a_window_that_cannot_pack_into_64_bits_is_refused() -> None:
    assert FingerprintSpec(step=50, window=20).bits == 3  # buckets 0..6
    with pytest.raises(ValueError):
        FingerprintSpec(step=10, window=20)  # 26 buckets: 5 bits x 20 values


@pytest.mark.skipif(not probe_table.JIT, reason="numba is not installed (the 'fast' extra)")
def test_the_compiled_table_loops_leave_the_same_table_as_the_plain_ones() -> None:
    """The numba-compiled loops against their plain-Python reference: the same queries (with
    evictions, shared hashes moving holder, near-duplicates) leave identical tables and give
    identical matches."""
    x = to_float(load_split("test")[0][:300])
    rng = np.random.default_rng(3)
    steps = np.clip(x[:100] + (rng.random(x[:100].shape) < 0.02) * 0.3, 0, 1)
    rows = fingerprints(torch.from_numpy(np.concatenate([x, steps])), SPEC).numpy()
    rows[5, 10:] = EMPTY  # a padded fingerprint too
    plain = ProbeIndex(capacity=128, compiled=False, clock=lambda: 0.0)
    fast = ProbeIndex(capacity=128, compiled=True, clock=lambda: 0.0)
    for row in rows:
        assert plain.match(row) == fast.match(row)
        assert plain.add(row, "c") == fast.add(row, "c")
    for name in ("_keys", "_holders", "_places"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(fast, name))
