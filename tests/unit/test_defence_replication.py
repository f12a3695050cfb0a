"""A replica's evidence survives the trip through the stream's fields, and nothing else does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from bastion.gateway.defence.answers import answer_key
from bastion.gateway.defence.fingerprint import fingerprints
from bastion.gateway.defence.observation import Evidence
from bastion.gateway.defence.replication import decode_evidence, encode_evidence
from bastion.gateway.defence.service import RECOUNTS, DefenceService
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float


def evidence(n: int = 3, top: int = 50) -> list[Evidence]:
    rng = np.random.default_rng(0)
    return [
        Evidence(
            f"client-{i}",
            rng.integers(-(2**62), 2**62, top, dtype=np.int64),
            int(rng.integers(-(2**62), 2**62)),
            i % 2 == 0,
            i == 0,
            i > 0,
            "client-0" if i > 0 else None,
            None if i == 0 else bool(i % 2),
            0.05,
            0.005,
            0.001,
            answer_key(("digits", 1), (("probabilities", 10),)),
            rng.random(10).astype(np.float32),
            "digits:1",
            rng.random(64).astype(np.float32),
        )
        for i in range(n)
    ]


def as_stream_fields(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    return {k.encode(): v for k, v in fields.items()}


def test_evidence_round_trips_through_the_entry_fields() -> None:
    batch = evidence()
    decoded = decode_evidence(as_stream_fields(encode_evidence("r1", batch)), 50)
    for sent, got in zip(batch, decoded, strict=True):
        for name in ("client", "content", "flagged", "adversarial", "probe", "linked", "near",
                     "flag_rate", "block_rate", "near_rate", "answer_key", "model"):  # fmt: skip
            assert getattr(sent, name) == getattr(got, name), name
        np.testing.assert_array_equal(sent.fingerprint, got.fingerprint)
        np.testing.assert_array_equal(sent.answer, got.answer)
        np.testing.assert_array_equal(sent.embedding, got.embedding)


def test_the_answer_key_is_the_same_in_every_process() -> None:
    """Python's str hash is salted per process; replicas must agree on which answers match."""
    code = (
        "from bastion.gateway.defence.answers import answer_key;"
        "print(answer_key(('digits', 1), (('probabilities', 10),)))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {str(answer_key(("digits", 1), (("probabilities", 10),)))}


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.update({b"prints": f[b"prints"][:-8]}),  # a fingerprint cut short
        lambda f: f.update({b"scalars": b"[]"}),  # no images
        lambda f: f.update({b"scalars": json.dumps([[1] * 12] * 3).encode()}),  # a number name
        lambda f: f.update({b"answers": f[b"answers"][:-4]}),  # answers of the wrong size
        lambda f: f.update({b"scalars": f[b"scalars"].replace(b"0.05", b"7.0")}),  # a bad rate
        lambda f: f.pop(b"scalars"),
    ],
)
def test_a_malformed_entry_is_refused(damage) -> None:  # type: ignore[no-untyped-def]
    fields = as_stream_fields(encode_evidence("r1", evidence()))
    damage(fields)
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_evidence(fields, 50)


def two_replicas() -> tuple[DefenceService, DefenceService, list[list[Evidence]]]:
    """Replicas A and B with one salt; what A shares for the stream lands in the list."""
    settings = Settings(fingerprint_salt=3, throttle_interval_s=30)
    a = DefenceService(settings, Metrics(CollectorRegistry()))
    b = DefenceService(settings, Metrics(CollectorRegistry()))
    shared: list[list[Evidence]] = []
    a.on_evidence = shared.append
    return a, b, shared


def test_a_replayed_walk_moves_the_other_replicas_ladder_as_its_own() -> None:
    """Replica A weighs a walk; replica B replays A's evidence: same rung, same campaign, and
    B remembers A's queries (a near-duplicate sent to B is a probe there)."""
    a, b, shared = two_replicas()
    image = to_float(load_split("test")[0][:1])
    for i in range(16):
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)
        prints = fingerprints(torch.from_numpy(step), a.fingerprint_spec).numpy()
        a.observe(f"walker-{i}", prints, ["clean"], step)
    for batch in shared:
        b.replay(batch)
    assert b.ladder.campaign_rung("walker-15") == a.ladder.campaign_rung("walker-15") != "observe"
    assert b.ladder.campaign("walker-15") == a.ladder.campaign("walker-15")
    step = image.copy()
    step.flat[40] = 0.5
    prints = fingerprints(torch.from_numpy(step), b.fingerprint_spec).numpy()
    assert b.observe("walker-new", prints, ["clean"], step).probes == 1


def test_a_poisoned_entry_is_counted_and_the_follower_goes_on() -> None:
    """Whatever a stream entry holds (an integer past int64, JSON nested past the recursion
    limit, an unknown kind), applying it neither raises nor stops the entries after it."""
    from bastion.gateway.defence.replication import Replication

    metrics = Metrics(CollectorRegistry())
    defence = DefenceService(Settings(fingerprint_salt=3), metrics)
    follower = Replication(None, defence, metrics)
    good = as_stream_fields(encode_evidence("elsewhere", evidence()))
    huge = dict(good)
    scalars = json.loads(good[b"scalars"])
    scalars[0][1] = 2**63
    huge[b"scalars"] = json.dumps(scalars).encode()
    deep = {b"origin": b"x", b"kind": b"refusal", b"body": b"[" * 100_000 + b"]" * 100_000}
    for entry in (huge, deep, {b"origin": b"x", b"kind": b"nonsense"}, good):
        follower._apply(entry)
    assert follower.applied == 1  # the good one, after the three bad
    assert metrics.shared_state_errors.labels("redis", "defence_malformed")._value.get() == 3
    assert defence.ladder.account("client-2") is not None


def test_a_resent_blocked_picture_reaches_the_other_replica_once() -> None:
    """Replica A counts a blocked picture its client resent (at most ``RECOUNTS`` times a
    picture); B applies those counts too, and once they are spent a resend of the same picture
    to B is not counted there. An entry from
    a replica that predates the flag (12 scalars) reads as no resend."""
    a, b, shared = two_replicas()
    image = to_float(load_split("test")[0][:1])
    prints = fingerprints(torch.from_numpy(image), a.fingerprint_spec).numpy()
    for _ in range(2 + RECOUNTS):
        observed = a.observe("sq", prints, ["adversarial"], image, np.zeros((1, 20)), 7)
        a.settle(observed, served=False)
        b.replay_refusal(7, [content for _, content in observed.slots])
    entries = [decode_evidence(as_stream_fields(encode_evidence("a", e)), 50) for e in shared]
    assert [e.resend for batch in entries for e in batch] == [False] + [True] * RECOUNTS
    for batch in entries:
        b.replay(batch)
    assert b.ladder.account("sq").statistic == pytest.approx(a.ladder.account("sq").statistic)
    b.observe("sq", prints, ["adversarial"], image, np.zeros((1, 20)), 7)
    assert b.ladder.account("sq").statistic == pytest.approx(a.ladder.account("sq").statistic)
    fields = as_stream_fields(encode_evidence("old", evidence(1)))
    fields[b"scalars"] = json.dumps([json.loads(fields[b"scalars"])[0][:12]]).encode()
    assert decode_evidence(fields, 50)[0].resend is False
