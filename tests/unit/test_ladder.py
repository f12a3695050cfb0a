"""The sequential test and the containment ladder: honest clients stay observed, an attack climbs
the rungs within a handful of probes, a campaign is contained whatever identity it uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bastion.gateway.defence.evidence import OBSERVE, REFUSE, STRICT, THROTTLE, Ladder, LadderSpec


def test_simulated_honest_clients_are_never_contained() -> None:
    """400 honest clients x 2,500 images, flagged at the review tier's rate and sending
    near-duplicates (re-encodes) at the honest probe rate: none leaves ``observe``, and the
    highest statistic any reached stays far below the throttle threshold. The test is set for at
    most 1e-3 false throttlings and 1e-9 false containments per client over 100,000 images
    (Lorden's bound)."""
    rng = np.random.default_rng(0)
    spec = LadderSpec()
    ladder = Ladder(spec)
    highest = 0.0
    for client in range(400):
        flags = rng.random(2500) < spec.flag_rate
        probes = rng.random(2500) < spec.probe_rate
        for flagged, probe in zip(flags.tolist(), probes.tolist(), strict=True):
            assert ladder.observe(f"c{client}", flagged, probe) == OBSERVE
            highest = max(highest, ladder.account(f"c{client}").statistic)
    assert highest < spec.throttle_at - math.log(100), highest  # 100x margin in odds
    assert spec.false_containment_bound(100_000, THROTTLE) == pytest.approx(1e-3)
    assert spec.false_containment_bound(100_000) == pytest.approx(1e-9)


def test_an_attack_climbs_every_rung_within_a_few_probes() -> None:
    ladder = Ladder()
    rungs = [ladder.observe("mallory", flagged=True, probe=True) for _ in range(12)]
    assert rungs[0] == OBSERVE
    order = {rung: i for i, rung in enumerate((OBSERVE, THROTTLE, STRICT, REFUSE))}
    first = {
        rung: next(i + 1 for i, r in enumerate(rungs) if order[r] >= order[rung])
        for rung in (THROTTLE, STRICT, REFUSE)
    }
    assert first[THROTTLE] <= 3 and first[THROTTLE] <= first[STRICT] <= first[REFUSE] <= 5, first
    assert rungs == sorted(rungs, key=order.__getitem__)  # the ladder only climbs


def test_probes_alone_contain_even_when_every_verdict_is_clean() -> None:
    """A decision-based attack's queries often pass screening; their sameness gives them away."""
    ladder = Ladder()
    rungs = [ladder.observe("eve", flagged=False, probe=True) for _ in range(20)]
    assert rungs[-1] == REFUSE and rungs.index(THROTTLE) < 5


def test_a_campaign_is_contained_across_rotating_identities() -> None:
    ladder = Ladder()
    for i in range(40):  # a new identity every two queries, each probe linked to the last
        client, previous = f"sybil-{i // 2}", f"sybil-{max(i // 2 - 1, 0)}"
        ladder.observe(client, flagged=False, probe=True, linked=previous)
    assert ladder.rung("sybil-19") == REFUSE  # fresh identity, two probes of its own
    assert ladder.account("sybil-19").statistic < LadderSpec().throttle_at
    assert len(ladder.campaign("sybil-0")) == 20
    assert ladder.rung("honest") == OBSERVE


def test_release_lifts_the_client_and_its_campaign() -> None:
    ladder = Ladder()
    for _ in range(10):
        ladder.observe("a", True, True, linked="b")
        ladder.observe("b", True, True)
    assert ladder.rung("a") == REFUSE
    ladder.release("a")
    assert ladder.rung("a") == OBSERVE and ladder.rung("b") == OBSERVE
    assert ladder.account("a").released_at is not None


def test_the_ladder_forgets_the_least_recently_seen_client_past_its_bound() -> None:
    ladder = Ladder(max_clients=3)
    for client in "abcd":
        ladder.observe(client, True, True)
    assert ladder.account("a") is None and ladder.account("d") is not None


def test_a_flood_of_fresh_identities_does_not_push_a_contained_client_out() -> None:
    """Refused requests do not refresh a contained client; fresh ids cost nothing without
    keys. Eviction passes over clients at strict or refuse, so containment stays."""
    ladder = Ladder(max_clients=10)
    for _ in range(6):
        ladder.observe("mallory", True, True)
    assert ladder.rung("mallory") == REFUSE
    for n in range(200):
        ladder.observe(f"fresh-{n}", False, False)
    assert ladder.rung("mallory") == REFUSE
    assert len(ladder.clients()) == 10  # the bound holds all the same


@pytest.mark.parametrize(
    "kwargs",
    [{"flag_rate": 0.6}, {"probe_rate": 0.0}, {"throttle_at": 10.0, "strict_at": 5.0}],
)
def test_nonsense_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LadderSpec(**kwargs)


def test_a_model_with_a_looser_review_tier_needs_more_flags_to_contain() -> None:
    """The verdict stream's honest rates are the model's own tiers: a suspicious verdict on a
    model whose review tier is 10 % weighs less than on one at 5 % (block tier 0.5 % both)."""
    strict_model, loose_model = Ladder(), Ladder()
    for _ in range(2):
        strict_model.observe("c", flagged=True, probe=True, flag_rate=0.05)
        loose_model.observe("c", flagged=True, probe=True, flag_rate=0.10)
    probe = math.log(0.5 / 0.001)  # each image is also a probe on the other stream
    suspicious = 0.5 - 0.25  # an attack's share of suspicious-but-not-blocked verdicts
    expected_strict = 2 * (math.log(suspicious / (0.05 - 0.005)) + probe)
    expected_loose = 2 * (math.log(suspicious / (0.10 - 0.005)) + probe)
    assert strict_model.account("c").statistic == pytest.approx(expected_strict)
    assert loose_model.account("c").statistic == pytest.approx(expected_loose)


def test_a_run_of_blocked_images_weighs_more_than_suspicious_ones() -> None:
    """An adversarial verdict happens to an honest client at the block tier's 0.5 %: a run of
    them is evidence even when no query repeats another (Square's first queries)."""
    blocked, suspicious = Ladder(), Ladder()
    for _ in range(8):
        blocked.observe("c", flagged=True, probe=False, adversarial=True)
        suspicious.observe("c", flagged=True, probe=False)
    assert blocked.rung("c") != OBSERVE
    assert suspicious.rung("c") == OBSERVE


def test_a_run_of_blocked_images_is_throttled_by_its_sixth_whatever_the_k_nn_says() -> None:
    """Square's early queries are each blocked and far apart in embedding space: the k-NN
    stream's "not near" must not cancel the block tier's evidence (it took eight before)."""
    ladder = Ladder()
    rungs = [
        ladder.observe("c", True, False, near=False, near_rate=0.001, adversarial=True)
        for _ in range(6)
    ]
    assert rungs[4] == OBSERVE and rungs[5] == THROTTLE
    spec = LadderSpec()
    near, far = (spec.increment(True, False, near=n, adversarial=True) for n in (True, False))
    assert near > far + 3  # a blocked image near the client's history still weighs more


def test_honest_clients_blocked_at_six_times_the_calibrated_rate_stay_observed() -> None:
    """Augmented photos are blocked at about 3 % where the block tier was calibrated at 0.5 %
    (the incident benchmark's honest clients): 40 such clients x 2,500 images, 8 % more
    suspicious, each with a k-NN verdict, never leave ``observe``."""
    rng = np.random.default_rng(1)
    ladder = Ladder()
    for client in range(40):
        draws = rng.random(2500)
        for u in draws.tolist():
            rung = ladder.observe(
                f"c{client}", u < 0.11, False, near=False, near_rate=0.001, adversarial=u < 0.03
            )
            assert rung == OBSERVE


def test_a_linked_honest_client_is_not_framed_by_the_campaign_that_linked_it() -> None:
    """An attacker whose probes match an honest client's pictures links that client into its
    campaign; the campaign's rung binds only members that sent probes themselves."""
    ladder = Ladder()
    ladder.observe("honest", flagged=False, probe=False)
    for i in range(12):  # every probe of the attacker matches the honest client's query
        ladder.observe(f"sybil-{i}", flagged=False, probe=True, linked="honest")
    assert "honest" in ladder.campaign("sybil-0")
    assert ladder.campaign_rung("sybil-11") == REFUSE  # its query is refused (the service)
    assert ladder.rung("sybil-11") == STRICT  # one probe binds no identity: it waits, strict
    ladder.observe("sybil-11", flagged=False, probe=True, linked="honest")
    assert ladder.rung("sybil-11") == REFUSE  # its second: most of its images are probes
    assert ladder.rung("honest") == OBSERVE


def test_honest_clients_linked_by_chance_pool_honest_rates_and_stay_observed() -> None:
    """200 honest clients linked by chance into campaigns (popular pictures) keep one pooled
    CUSUM per campaign at the honest rates: it stays at the bottom, as a sum of the members'
    statistics would not."""
    rng = np.random.default_rng(1)
    spec = LadderSpec()
    ladder = Ladder(spec)
    highest = 0.0
    for step in range(40_000):
        client = f"c{rng.integers(200)}"
        probe = bool(rng.random() < spec.probe_rate)
        linked = f"c{rng.integers(200)}" if probe or step < 400 else None
        rung = ladder.observe(client, bool(rng.random() < spec.flag_rate), probe, linked)
        assert rung == OBSERVE
        highest = max(highest, ladder.campaign_statistic(client))
    assert max(len(ladder.campaign(f"c{i}")) for i in range(200)) >= 100
    assert highest < spec.throttle_at - math.log(100), highest


def test_the_k_nn_stream_adds_evidence_only_where_a_detector_answered() -> None:
    spec = LadderSpec()
    with_near, without = Ladder(spec), Ladder(spec)
    for _ in range(8):
        with_near.observe("c", flagged=False, probe=False, near=True, near_rate=0.001)
        without.observe("c", flagged=False, probe=False, near=None)
    assert with_near.account("c").near == 8 and without.account("c").statistic == 0.0
    # eight k-NN hits at a 0.1 % clean rate contain even a walk the fingerprints miss
    assert with_near.rung("c") != OBSERVE


def test_padding_every_probe_with_clean_images_still_contains() -> None:
    """The CUSUM forgives (each clean image pulls it down); the probe window does not: one
    probe in every 13 images still reaches the refuse count within the window."""
    ladder = Ladder()
    rungs = []
    for _ in range(20):
        rungs.append(ladder.observe("padder", flagged=False, probe=True))
        for _ in range(12):
            ladder.observe("padder", flagged=False, probe=False)
    assert ladder.account("padder").statistic < LadderSpec().throttle_at  # the CUSUM forgave
    assert rungs[9] == THROTTLE and ladder.rung("padder") == REFUSE


def test_a_fresh_identity_whose_first_query_continued_a_suspect_campaign_waits_then_is_free() -> (
    None
):
    """Before it is bound (two probes), an identity that probed and whose images were mostly
    probes or flagged takes its campaign's rung, at most strict, while the campaign is
    throttled or worse (its next query waits an interval); an honest newcomer whose first
    picture happened to continue the campaign is free after one clean picture, an attacker's
    identity whose next images are flagged (OARS-style noisy steps) is not."""
    ladder = Ladder()
    sybils = 0
    while ladder.campaign_rung("early-0") == OBSERVE:
        sybils += 1
        ladder.observe(f"early-{sybils}", flagged=False, probe=True, linked="early-0")
    assert ladder.campaign_rung("early-0") == THROTTLE
    ladder.observe("switched", flagged=True, probe=True, linked="early-1")
    assert not ladder.bound("switched")
    assert ladder.rung("switched") == ladder.campaign_rung("switched") != OBSERVE
    ladder.observe("switched", flagged=True, probe=False)  # a noisy step: suspicious
    assert ladder.rung("switched") != OBSERVE
    for i in range(12):
        ladder.observe(f"sybil-{i}", flagged=False, probe=True, linked=f"sybil-{max(i - 1, 0)}")
    assert ladder.campaign_rung("sybil-0") == REFUSE
    ladder.observe("newcomer", flagged=False, probe=True, linked="sybil-11")
    assert not ladder.bound("newcomer") and ladder.rung("newcomer") == STRICT  # never refuse
    ladder.observe("newcomer", flagged=False, probe=False)
    assert ladder.rung("newcomer") == OBSERVE
    ladder.observe("stranger", flagged=False, probe=True, linked="honest-peer")
    assert ladder.rung("stranger") == OBSERVE  # its campaign is not contained: nothing to wait
