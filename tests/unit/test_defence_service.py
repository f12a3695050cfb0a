"""The defence on the request path: retries are not probes, the rungs answer 429 and 403."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from bastion.gateway.defence.evidence import OBSERVE, REFUSE, STRICT, THROTTLE
from bastion.gateway.defence.fingerprint import fingerprints
from bastion.gateway.defence.service import RECOUNTS, Contained, DefenceService
from bastion.gateway.errors import Forbidden, TooManyRequests
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings
from bastion.models.data import load_split, to_float


def service() -> DefenceService:
    return DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30), Metrics(CollectorRegistry())
    )


def test_a_retry_is_nothing_a_one_off_near_duplicate_is_no_probe_and_a_chain_is() -> None:
    defence = service()
    image = to_float(load_split("test")[0][:1])
    prints = fingerprints(torch.from_numpy(image), defence.fingerprint_spec).numpy()
    assert defence.observe("a", prints, ["clean"], image).probes == 0
    assert defence.observe("b", prints, ["clean"], image.copy()).probes == 0  # same bytes
    assert defence.ladder.account("b") is None  # a retry is not even evidence
    steps = []
    for i in range(3):  # a new pixel each, same quantised picture: an attack's next steps
        step = image.copy()
        step[0, 0, 0, i] = 0.02
        steps.append(step)
    observed = []
    for step in steps:
        step_prints = fingerprints(torch.from_numpy(step), defence.fingerprint_spec).numpy()
        observed.append(defence.observe("c", step_prints, ["clean"], step).probes)
    # the first near-duplicate of a fresh picture is a one-off (an honest re-encode looks the
    # same); every later link of the chain is a probe
    assert observed == [0, 1, 1]
    assert defence.ladder.account("c").probes == 2


def test_the_same_picture_however_encoded_is_a_retry_and_gets_its_earlier_answer() -> None:
    """FP32 pixels, their UINT8 levels, a change below half a level: one picture, sent again.
    A developer resending the sample digits in every encoding must not look like a prober."""
    defence = service()
    image = to_float(load_split("test")[0][:4])
    spec = defence.fingerprint_spec
    first = np.arange(4 * 20, dtype=np.float32).reshape(4, 20)
    prints = fingerprints(torch.from_numpy(image), spec).numpy()
    assert defence.observe("dev", prints, ["clean"] * 4, image, first, 7).probes == 0
    levels = np.rint(image * 255).astype(np.uint8).astype(np.float32) / 255
    nudged = np.clip(image + 0.001, 0, 1)  # a fifth of a level: the same 8-bit picture
    fresh = np.full((4, 20), -1.0, np.float32)
    for again in (levels, nudged, levels, image):
        again_prints = fingerprints(torch.from_numpy(again), spec).numpy()
        observed = defence.observe("dev", again_prints, ["clean"] * 4, again, fresh, 7)
        assert observed.probes == 0 and observed.rung == OBSERVE
        assert all(np.array_equal(observed.repeats[i], first[i]) for i in range(4))
    assert defence.ladder.account("dev").probes == 0


def blocked(defence: DefenceService, client: str, image: np.ndarray) -> str:
    """Sends one picture the screening blocks, refused; returns the client's rung."""
    prints = fingerprints(torch.from_numpy(image), defence.fingerprint_spec).numpy()
    observed = defence.observe(client, prints, ["adversarial"], image, np.zeros((1, 20)), 7)
    defence.settle(observed, served=False)
    return observed.rung


def test_a_blocked_picture_resent_counts_a_few_times_more_and_only_against_its_sender() -> None:
    """ART's Square re-asks its current point every iteration: a refused picture blocked again
    and resent by the client it was refused to counts at most ``RECOUNTS`` times more (the
    same pixels get the same verdict), so one picture retried forever, an honest false
    positive or a planted one, stays short of the throttle, and one more blocked picture
    throttles; from anyone else, nothing."""
    defence = service()
    images = to_float(load_split("test")[0][:3])
    first = images[:1]
    assert blocked(defence, "a", first) == OBSERVE
    for _ in range(4):
        assert blocked(defence, "b", first) == OBSERVE
    assert defence.ladder.account("b") is None  # a shared picture frames nobody
    for _ in range(10):
        assert blocked(defence, "a", first) == OBSERVE
    one = defence.ladder.spec.increment(True, False, adversarial=True)
    assert defence.ladder.account("a").statistic == pytest.approx((1 + RECOUNTS) * one)
    assert blocked(defence, "a", images[1:2]) == "throttle"  # one more blocked picture
    assert defence.ladder.account("a").probes == 0


def test_a_refused_picture_resent_with_a_milder_verdict_is_no_evidence() -> None:
    defence = service()
    image = to_float(load_split("test")[0][:1])
    blocked(defence, "a", image)
    prints = fingerprints(torch.from_numpy(image), defence.fingerprint_spec).numpy()
    before = defence.ladder.account("a").statistic
    for verdict in ("suspicious", "clean"):
        defence.observe("a", prints, [verdict], image, np.zeros((1, 20)), 7)
    assert defence.ladder.account("a").statistic == before


def test_the_rungs_answer_429_with_retry_after_then_403() -> None:
    defence = service()
    image = to_float(load_split("test")[0][:1])
    rungs = []
    for i in range(12):
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)  # every query a new step of the same walk
        prints = fingerprints(torch.from_numpy(step), defence.fingerprint_spec).numpy()
        rungs.append(defence.observe("walker", prints, ["clean"], step).rung)
        try:
            defence.admit("walker")
        except TooManyRequests as exc:
            assert int(exc.headers["Retry-After"]) >= 1 and exc.status == 429
        except Contained as exc:
            assert exc.status == 403 and exc.details["reason"] == "contained"
    assert rungs[0] == OBSERVE and rungs[-1] == REFUSE
    with pytest.raises(Contained):
        defence.admit("walker")
    defence.admit("somebody-else")  # untouched
    assert np.isfinite(defence.ladder.account("walker").statistic)


def test_repeat_answers_a_probe_with_the_remembered_answer() -> None:
    settings = Settings(fingerprint_salt=1, probe_response="repeat")
    defence = DefenceService(settings, Metrics(CollectorRegistry()))
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    first = np.arange(20, dtype=np.float32)[None]
    prints = fingerprints(torch.from_numpy(image), spec).numpy()
    assert defence.observe("a", prints, ["clean"], image, first, 7).repeats == {}
    step = image.copy()
    step[0, 0, 14, 10:14] += 0.01
    prints = fingerprints(torch.from_numpy(step), spec).numpy()
    fresh = np.full((1, 20), -1.0, np.float32)
    repeated = defence.observe("b", prints, ["clean"], step, fresh, 7).repeats
    np.testing.assert_array_equal(repeated[0], first[0])  # the prober learns nothing new
    other_model = defence.observe("b", prints, ["clean"], step + 0.001, fresh, 8).repeats
    assert other_model == {}  # an answer is repeated only to queries of the same model


def test_a_fresh_identity_linked_to_a_throttled_campaign_shares_its_interval() -> None:
    """A rotating attacker's new identity passes ``admit`` (nobody knows it yet); its first
    probe of a throttled campaign gets a repeat and throttles it at its own interval (its next
    query waits: 429 at the door); once an interval passed, its second probe binds it to the
    campaign: the campaign's 429."""
    defence = service()
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    observed, i = None, 0
    while observed is None or observed.rung == OBSERVE:  # one identity walks until throttled
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        observed = defence.observe("walker-0", prints, ["clean"], step)
        i += 1
    defence.enforce("walker-0", observed, defence.admit("walker-0"))  # its one admission
    step = image.copy()
    step.flat[i] = 0.5
    prints = fingerprints(torch.from_numpy(step), spec).numpy()
    charged = defence.admit("walker-1")  # unknown: admitted
    observed = defence.observe("walker-1", prints, ["clean"], step)
    assert "walker-0" in defence.ladder.campaign("walker-1")
    assert defence.ladder.campaign_rung("walker-1") != OBSERVE  # its probe: a repeat, if kept
    defence.enforce("walker-1", observed, charged)  # its own interval starts
    assert not defence.ladder.bound("walker-1")  # one probe binds no identity, but
    with pytest.raises(TooManyRequests):  # its next query waits its own interval
        defence.admit("walker-1")
    defence._last_admitted["walker-1"] -= defence.throttle_interval_s  # an interval later
    step.flat[i + 1] = 0.5
    prints = fingerprints(torch.from_numpy(step), spec).numpy()
    charged = defence.admit("walker-1")
    observed = defence.observe("walker-1", prints, ["clean"], step)
    assert defence.ladder.bound("walker-1")
    with pytest.raises((TooManyRequests, Contained)):  # its second binds it: the interval
        defence.enforce("walker-1", observed, charged)


def walk(image: np.ndarray, steps: int) -> list[np.ndarray]:
    """An attack's chain: every query a new small step from the last."""
    chain = []
    for i in range(steps):
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)
        chain.append(step)
    return chain


def test_from_its_first_probe_a_chain_gets_the_remembered_answer_without_repeat() -> None:
    defence = service()  # probe_response "evidence": one-offs are answered fresh
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    given = []
    for i, step in enumerate(walk(image, 4)):
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        fresh = np.full((1, 4), float(i), np.float32)
        observed = defence.observe("walker", prints, ["clean"], step, fresh, 7)
        given.append(observed.repeats.get(0, fresh[0])[0])
    # a fresh picture, its one-off near-duplicate: fresh answers; then each probe gets what
    # the query it continues got, so the walk learns nothing after its second query
    assert given == [0.0, 1.0, 1.0, 1.0]
    assert defence.ladder.account("walker").probes == 2


def test_after_its_first_probe_a_clients_one_offs_get_the_remembered_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attack's step that lands next to a lone remembered query (not a chain: a one-off,
    the honest re-encode's allowance) is answered with that query's answer once its sender has
    probed, and the debug log says so in the line the incident benchmark reads; a client that
    never probed gets its one-off answered fresh."""
    from bastion.benchmarks.incident_report import ONE_OFF_LINE

    caplog.set_level(logging.DEBUG, logger="bastion.gateway.defence.service")
    defence = service()
    spec = defence.fingerprint_spec
    images = to_float(load_split("test")[0][:3])
    for i, step in enumerate(walk(images[:1], 3)):  # a fresh picture, a one-off, a probe
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        defence.observe("walker", prints, ["clean"], step, np.full((1, 4), float(i), np.float32), 7)
    assert defence.ladder.probed("walker")
    given = {}
    for client, lone in (("walker", images[1:2]), ("honest", images[2:3])):
        prints = fingerprints(torch.from_numpy(lone), spec).numpy()
        defence.observe("someone", prints, ["clean"], lone, np.full((1, 4), 5.0, np.float32), 7)
        step = walk(lone, 2)[1]  # a near-duplicate of that lone picture
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        fresh = np.full((1, 4), 9.0, np.float32)
        observed = defence.observe(client, prints, ["clean"], step, fresh, 7, request_id=client)
        given[client] = (observed.probes, observed.repeats.get(0, fresh[0])[0])
    assert given == {"walker": (0, 5.0), "honest": (0, 9.0)}
    assert [m[:2] for m in ONE_OFF_LINE.findall(caplog.text)] == [("walker", "walker")]
    assert not defence.ladder.probed("honest")


def test_a_probe_of_a_refused_query_is_refused_again_with_reason_repeat() -> None:
    defence = service()
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    outcomes = []
    for i, step in enumerate(walk(image, 3)):
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        fresh = np.full((1, 4), float(i), np.float32)
        observed = defence.observe("walker", prints, ["clean"], step, fresh, 7)
        try:
            defence.enforce("walker", observed, None)
        except Forbidden as exc:
            outcomes.append(exc.details["reason"])
            continue
        finally:
            defence.settle(observed, served=i != 1)  # the second query was withheld
        outcomes.append("answered")
    # the third continues the second, which got no answer: it gets none either
    assert outcomes == ["answered", "answered", "repeat"]


def test_a_refused_picture_sent_again_is_decided_afresh() -> None:
    """A retry of a withheld picture is screened again (a release or a policy change takes
    effect), and is no evidence."""
    defence = service()
    image = to_float(load_split("test")[0][:1])
    prints = fingerprints(torch.from_numpy(image), defence.fingerprint_spec).numpy()
    answer = np.zeros((1, 4), np.float32)
    first = defence.observe("a", prints, ["adversarial"], image, answer, 7)
    defence.settle(first, served=False)  # withheld
    again = defence.observe("fresh-identity", prints, ["clean"], image.copy(), answer, 7)
    assert again.refused == () and again.repeats == {} and again.probes == 0
    defence.enforce("fresh-identity", again, None)  # nothing to refuse: the verdict decides
    assert defence.ladder.account("fresh-identity") is None


def test_the_gauges_count_clients_per_rung_and_campaigns() -> None:
    metrics = Metrics(CollectorRegistry())
    defence = DefenceService(Settings(fingerprint_salt=1, throttle_interval_s=30), metrics)
    image = to_float(load_split("test")[0][:1])
    for i in range(12):  # a walk over three identities: linked into one campaign
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)
        prints = fingerprints(torch.from_numpy(step), defence.fingerprint_spec).numpy()
        defence.observe(f"walker-{i // 4}", prints, ["clean"], step)
    sample = metrics.private_registry.get_sample_value
    assert sample("bastion_defence_clients", {"rung": "refuse"}) >= 1
    assert sample("bastion_defence_campaigns", {"state": "linked"}) == 1
    assert sample("bastion_defence_campaigns", {"state": "contained"}) == 1
    with defence.lock:
        defence.release("walker-0")
    assert sample("bastion_defence_clients", {"rung": "refuse"}) == 0
    assert sample("bastion_defence_campaigns", {"state": "contained"}) == 0


def test_an_honest_client_an_attacker_probed_around_is_neither_bound_nor_throttled() -> None:
    """The attacker walks around the honest client's picture, then the honest client resends
    that picture re-encoded and sends new ones: that one resend continues the contained
    campaign and is refused, but one probe among its honest images binds the client to
    nothing: its new pictures are served, never charged the attacker's throttle interval."""
    defence = service()
    digits = to_float(load_split("test")[0][:8])
    spec = defence.fingerprint_spec

    def send(client: str, image: np.ndarray) -> None:
        prints = fingerprints(torch.from_numpy(image), spec).numpy()
        charged = defence.admit(client)
        defence.enforce(client, defence.observe(client, prints, ["clean"], image), charged)

    for digit in digits[:4]:
        send("honest", digit[None])
    for i in range(12):  # the attacker probes around the honest client's first picture
        step = digits[:1].copy()
        step.flat[300 + i] += 0.003 * (i + 1)
        with contextlib.suppress(TooManyRequests, Contained):
            send(f"mallory-{i // 3}", step)
    assert defence.ladder.rung("mallory-3") != OBSERVE
    reencoded = digits[:1].copy()
    reencoded.flat[500] += 0.004  # the honest client's own resend, slightly re-encoded
    with pytest.raises(Contained):
        send("honest", reencoded)
    assert "honest" in defence.ladder.campaign("mallory-0")
    for digit in digits[4:]:
        send("honest", digit[None])  # never 429 nor 403
    assert defence.ladder.rung("honest") == OBSERVE


def test_a_fresh_identity_refused_for_continuing_a_contained_campaign_waits_an_interval() -> None:
    """Its first query continues the contained campaign: 403; its next request, within the
    interval, is 429 at the door (a rotating attacker's far step is not answered); once the
    interval has passed it is admitted, and an honest picture leaves it observed."""
    defence = service()
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    chain = walk(image, 24)
    for n, step in enumerate(chain[:20]):  # a campaign of rotating identities, contained
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        with contextlib.suppress(TooManyRequests, Contained):
            client = f"rotating-{n // 2}"
            charged = defence.admit(client)
            defence.enforce(client, defence.observe(client, prints, ["clean"], step), charged)
    assert defence.ladder.campaign_rung("rotating-9") == REFUSE
    prints = fingerprints(torch.from_numpy(chain[20]), spec).numpy()
    charged = defence.admit("fresh")
    with pytest.raises(Contained):
        defence.enforce("fresh", defence.observe("fresh", prints, ["clean"], chain[20]), charged)
    with pytest.raises(TooManyRequests):
        defence.admit("fresh")
    defence._last_admitted["fresh"] -= 31  # the 30 s interval has passed
    other = to_float(load_split("test")[0][40:41])
    prints = fingerprints(torch.from_numpy(other), spec).numpy()
    charged = defence.admit("fresh")
    defence.enforce("fresh", defence.observe("fresh", prints, ["clean"], other), charged)
    assert defence.ladder.rung("fresh") == OBSERVE


def test_a_shared_peer_address_has_only_its_probing_queries_refused() -> None:
    """Behind one address many clients may hide: the address is never refused at the door,
    only its requests that carry probes once it is strict."""
    defence = service()
    image = to_float(load_split("test")[0][:1])
    spec = defence.fingerprint_spec
    refused = []
    for i in range(12):
        step = image.copy()
        step.flat[i] = 0.002 * (i + 1)
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        assert defence.admit("10.0.0.1", shared=True) is None
        observed = defence.observe("10.0.0.1", prints, ["clean"], step)
        try:
            defence.enforce("10.0.0.1", observed, None, shared=True)
            refused.append(False)
        except Contained:
            refused.append(True)
    assert defence.ladder.rung("10.0.0.1") == REFUSE and refused[-1]
    fresh = to_float(load_split("test")[0][5:6])  # a co-tenant's new picture: answered
    prints = fingerprints(torch.from_numpy(fresh), spec).numpy()
    defence.enforce("10.0.0.1", defence.observe("10.0.0.1", prints, ["clean"], fresh), None, True)


def test_a_campaign_of_one_query_identities_is_logged_when_it_reaches_a_rung() -> None:
    """No identity of it ever sends twice, so none is bound to the campaign: the campaign's
    rise is the decision the incident log gets (and it opens the incident); an identity whose
    one query continued the contained campaign is throttled (it waits), never refused alone."""
    entries: list[tuple[str, str, dict]] = []
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30),
        Metrics(CollectorRegistry()),
        audit=lambda kind, subject, body: entries.append((kind, subject, body)),
    )
    image = to_float(load_split("test")[0][:1])
    for n, step in enumerate(walk(image, 16)):
        prints = fingerprints(torch.from_numpy(step), defence.fingerprint_spec).numpy()
        defence.observe(f"newbie-{n}", prints, ["clean"], step)
    decisions = [body for kind, _, body in entries if kind == "containment"]
    campaign = [body for body in decisions if body.get("scope") == "campaign"]
    assert campaign[-1]["rung"] == REFUSE and campaign[-1]["campaign_size"] >= 3
    assert len({body["rung"] for body in campaign}) == len(campaign)  # once per rung
    alone = [body for body in decisions if "scope" not in body]
    assert alone and all(body["rung"] in (THROTTLE, STRICT) for body in alone)
    assert all(body["probes"] == 1 for body in alone)  # one query each: waits, never refused


def test_a_campaign_tightens_policy_for_young_identities_until_the_alert_lapses() -> None:
    """While a campaign of rotating identities is throttled or worse, an identity with fewer
    than ``alert_young_images`` images is on the strict policy (its suspicious images withheld);
    an identity established before the attack is not, and the alert lapses after ``alert_s``."""
    entries: list[tuple[str, str, dict]] = []
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30, alert_s=900, alert_young_images=5),
        Metrics(CollectorRegistry()),
        audit=lambda kind, subject, body: entries.append((kind, subject, body)),
    )
    digits = to_float(load_split("test")[0][20:40])
    spec = defence.fingerprint_spec

    def send(client: str, image: np.ndarray):
        prints = fingerprints(torch.from_numpy(image), spec).numpy()
        return defence.observe(client, prints, ["suspicious"], image)

    for image in digits[:6]:  # an honest client with a history, before any attack
        assert not send("regular", image[None]).tightened
    assert not send("newcomer", digits[6:7]).tightened  # no alert: nobody is tightened
    for n, step in enumerate(walk(to_float(load_split("test")[0][:1]), 16)):
        send(f"rotating-{n}", step)
    assert defence.alert_active()
    alerts = [body for kind, _, body in entries if body.get("event") == "alert"]
    assert len(alerts) == 1 and alerts[0]["campaign"] == defence.ladder.root("rotating-15")
    assert send("fresh-identity", digits[7:8]).tightened
    assert not send("regular", digits[8:9]).tightened  # established before: untouched
    for image in digits[9:13]:
        send("newcomer", image[None])
    assert not send("newcomer", digits[13:14]).tightened  # five images: no longer young
    defence._alert_until = 0.0  # the alert's time is up
    assert not defence.alert_active() and not send("another", digits[14:15]).tightened


def test_a_young_identity_resending_a_suspect_campaigns_served_picture_joins_it() -> None:
    """HopSkipJump re-asks its boundary point under each new identity: the resend gets its
    earlier answer, and a young identity sending it joins the campaign it was served to (and
    waits); an established client's resend of it stays no evidence."""
    defence = DefenceService(
        Settings(fingerprint_salt=1, throttle_interval_s=30, alert_young_images=3),
        Metrics(CollectorRegistry()),
    )
    spec = defence.fingerprint_spec
    images = to_float(load_split("test")[0][:8])
    chain, observed = walk(images[:1], 30), None
    for step in chain:  # one identity walks until throttled; its steps were served
        prints = fingerprints(torch.from_numpy(step), spec).numpy()
        observed = defence.observe("walker", prints, ["clean"], step, np.ones((1, 4)), 7)
        if observed.rung != OBSERVE:
            break
    assert observed is not None and observed.rung != OBSERVE
    for image in images[4:7]:  # established: three pictures of its own
        one = image[None]
        own = fingerprints(torch.from_numpy(one), spec).numpy()
        defence.observe("regular", own, ["clean"], one)
    resent = chain[0]
    prints = fingerprints(torch.from_numpy(resent), spec).numpy()
    for client in ("fresh", "regular"):
        again = defence.observe(client, prints, ["clean"], resent.copy(), np.zeros((1, 4)), 7)
        assert 0 in again.repeats  # the answer the picture got before, either way
    assert defence.ladder.root("fresh") == defence.ladder.root("walker")
    assert defence.ladder.account("fresh").probes == 1 and defence.ladder.rung("fresh") != OBSERVE
    assert defence.ladder.account("regular").probes == 0
