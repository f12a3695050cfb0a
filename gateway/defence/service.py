"""The stateful defence on the request path: admit or refuse by rung, then weigh each image.

Before a request is decoded, ``admit`` looks up the client's rung: ``throttle`` lets one request
through per ``throttle_interval_s`` per campaign (the others get 429 with ``Retry-After``),
``refuse`` answers 403 with reason ``contained``. After the batch ran, ``observe`` takes each
image's fingerprint (computed on the device in the batch), finds the remembered query it nearly
duplicates, scores its embedding against the client's history (k-NN), records the evidence
(verdict flagged, probe, near, the client it links to) and remembers the query; ``enforce``
then applies the rung to this response, so a fresh identity whose first query links it to a
contained campaign is refused (or throttled with the campaign) before it is answered.

A resend of the same picture (the same 8-bit pixels: FP32, UINT8, PNG) is a retry: neither
evidence nor remembered. A served picture is found by its content hash whoever resends it and
gets its earlier answer; a refused one is a retry when the fingerprints' best match is that very
query, then decided afresh (a release or a policy change takes effect); blocked again and
resent by the client it was refused to, it counts against that client again, at most
``RECOUNTS`` times a picture (ART's Square re-asks its current point every iteration; five
blocked steps of one picture stay short of throttling, so no single picture, an honest false
positive retried forever or one planted on a client, throttles it). A near-duplicate of a
lone remembered query is a one-off (an honest re-encode of a picture, a popular picture sent
again): remembered, and the two are linked, but it is not a probe. A near-duplicate of a query
that already has a link is a probe: an attack's queries form a chain (each a step from the
last: HopSkipJump, Boundary) or a star (candidates around one point: Square, SimBA), and every
query after the second lands on a linked one. An attack loses one query of evidence; an honest
client's occasional re-encode is none.

A probe is answered with what the query it nearly duplicates got (the repeat, Blacklight's
"respond with the earlier answer"): its remembered prediction, or a 403 (reason ``repeat``)
when that query was refused, so an attack learns nothing new from its first probe on, while an
honest re-encode gets the answer its picture got before. ``probe_response = "repeat"`` extends
this to every near-duplicate, one-offs too; a suspect's one-offs are repeated as well: from a
client that has probed (no honest one did in 100,000 requests) or is throttled or above.

A query on the straight line through two of its client's recent pictures that were answered
differently (``line_search``: a decision-based attack's binary or geometric search across the
decision boundary) is a probe and is withheld (403, reason ``probe``), and so is an exact
resend of it by its client or by a young identity (fewer than ``alert_young_images`` images:
a rotating attacker's; an established client's resend of a picture planted this way is
decided afresh). HopSkipJump's first blends land inside the threat ball before any
near-duplicate exists, and an answer to one is an adversarial example. A young identity's
query is also scanned against the windows of the last ``SUSPECTS`` identities of suspect
campaigns: a rotating attacker's next identity continues the search, and joins the campaign.
A shared identity (a peer address) is not refused for it: its co-tenants' pictures share one
window.

A young identity's query that matches nothing remembered (HopSkipJump's far steps at the
start of an iteration) can still continue a campaign through its embedding (``knn.Histories``);
an identity whose one query continued a contained campaign is throttled at its own interval
(``Ladder.rung``), so its next step waits.

With ``alert_s`` > 0 (off by default), a campaign that reaches a rung raises an **alert**
(``alert_s`` after its last decision): policy is tightened for young identities (fewer than
``alert_young_images`` images), whose suspicious images are withheld as on the strict rung.
Clients established before the attack are untouched, but an honest newcomer during an alert
loses every suspicious picture: its photos are suspicious far more often than the review
tier's calibrated rate (measured: 20 % of an honest newcomer's requests refused, RESULTS §10a).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bastion.gateway.defence import knn, line_search, probe_table
from bastion.gateway.defence.decisions import Decisions
from bastion.gateway.defence.evidence import OBSERVE, REFUSE, STRICT, THROTTLE, Ladder, LadderSpec
from bastion.gateway.defence.fingerprint import FingerprintSpec, picture_hash
from bastion.gateway.defence.knn import Histories
from bastion.gateway.defence.line_search import LineSearches
from bastion.gateway.defence.observation import Embedded, Evidence, Observation
from bastion.gateway.defence.probe_index import ProbeIndex
from bastion.gateway.errors import Forbidden, TooManyRequests
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings

FLAGGED = frozenset({"suspicious", "adversarial"})
RECOUNTS = 4  # resends of one blocked picture counted: five steps, short of throttling
SUSPECTS = 8  # recent identities of suspect campaigns whose line-search windows are scanned
log = logging.getLogger(__name__)


class Contained(Forbidden):
    """The client, or the campaign it belongs to, is refused."""


def throttled(wait_s: float) -> TooManyRequests:
    """The 429 of the throttle rung, ``Retry-After`` rounded up to whole seconds."""
    wait = max(1, math.ceil(wait_s))
    return TooManyRequests(
        f"this client is throttled: its queries probe the model; retry in {wait} s",
        wait,
        {"reason": "throttled", "retry_after_s": wait},
    )


class DefenceService:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        spec: LadderSpec | None = None,
        audit: Callable[[str, str, dict[str, Any]], object] | None = None,
    ):
        """``audit(kind, subject, body)`` takes each decision for the incident log (it must not
        block: it is called under the defence's lock)."""
        salt = settings.fingerprint_salt
        self.fingerprint_spec = FingerprintSpec(salt=secrets.randbits(62) if salt is None else salt)
        self.index = ProbeIndex(
            settings.probe_capacity,
            self.fingerprint_spec.top,
            self.fingerprint_spec.threshold,
            settings.probe_ttl_s,
        )
        self.ladder = Ladder(spec or LadderSpec(), max_clients=settings.max_tracked_clients)
        self.histories = Histories(settings.knn_clients)
        self.lines = LineSearches(settings.line_search_clients, self.fingerprint_spec.salt)
        for state in ("linked", "contained"):
            metrics.defence_campaigns.labels(state).set_function(partial(self._campaigns, state))
        probe_table.warm_up()  # numba compiles (or loads) the loops now, not on a query
        knn.warm_up()
        line_search.warm_up()
        self.metrics = metrics
        self.throttle_interval_s = settings.throttle_interval_s
        self.repeat = settings.probe_response == "repeat"
        self._last_admitted: OrderedDict[str, float] = OrderedDict()
        self._suspects: OrderedDict[str, None] = OrderedDict()  # see _note_suspect
        self.lock = threading.Lock()  # the admin routes hold it too, to read a consistent view
        # slot -> (the refused picture, how often its resends were counted there)
        self._recounted: dict[int, tuple[int, int]] = {}
        self.audit = audit
        self.decisions = Decisions(self.ladder, metrics, audit)
        self.alert_s = settings.alert_s
        self.young_images = settings.alert_young_images
        self._alert_until = 0.0  # time.monotonic() when the alert lapses
        self._alert_by: str | None = None  # the campaign that raised it (None: no alert)
        metrics.defence_alert.set_function(lambda: float(self.alert_active()))
        # another replica's share: each request's evidence, a refusal's queries, a release
        # (gateway.defence.replication sets these when replicas share Redis)
        self.on_evidence: Callable[[list[Evidence]], None] | None = None
        self.on_refusal: Callable[[int, list[int]], None] | None = None
        self.on_release: Callable[[str], None] | None = None
        self._knn_specs: dict[str, knn.KnnSpec] = {}  # per embedding space, for replays

    def refuse(self, campaign: bool = False) -> None:
        """Withholds a computed answer from a contained client, or (``campaign``) from a
        request whose query continues a contained campaign's probing, whoever sends it."""
        self.metrics.defence_refused.labels(REFUSE).inc()
        if campaign:
            raise Contained(
                "this request continues the probing of a contained campaign (its queries nearly "
                "duplicate the campaign's); an operator can release it (bastion clients release)",
                {"reason": "contained"},
            )
        raise Contained(
            "this client is contained: its queries probe the model; an operator can release it "
            "(bastion clients release)",
            {"reason": "contained"},
        )

    def release(self, client: str, replicate: bool = True) -> list[str]:
        """Lifts containment from a client and its campaign; returns who was released. The
        caller holds ``lock``. ``replicate``: tell the other replicas (not when replaying)."""
        if replicate and self.on_release is not None:
            self.on_release(client)
        members = self.ladder.campaign(client)
        self.decisions.forget(self.ladder.root(client), members)
        self.ladder.release(client)
        self._last_admitted.pop(self.ladder.root(client), None)
        for member in members:
            self._last_admitted.pop(member, None)
            self.histories.forget(member)
            self.lines.forget(member)
            self._suspects.pop(member, None)
        if self._alert_by is not None and self.ladder.root(client) in (self._alert_by, client):
            self._alert_by = None  # the campaign that raised the alert was judged honest
        log.warning("containment lifted by an admin: %s", ", ".join(members[:20]))
        return members

    def alert_active(self) -> bool:
        """Whether policy is tightened for young identities now."""
        return self._alert_by is not None and time.monotonic() < self._alert_until

    def _raise_alert(self, root: str, request_id: str | None, audit: bool = True) -> None:
        """A campaign's decision starts or extends the alert (caller holds ``lock``);
        ``audit``: log its start (not for another replica's evidence: that replica logs it)."""
        if self.alert_s <= 0:
            return
        active = self.alert_active()
        self._alert_until = time.monotonic() + self.alert_s
        if active or not audit:
            self._alert_by = self._alert_by or root
            return
        self._alert_by = root
        log.warning(
            "alert: campaign %s at request %r; young identities' suspicious images withheld",
            root,
            request_id,
        )
        if self.audit is not None:
            body = {"event": "alert", "campaign": root, "request": request_id}
            body |= {"young_images": self.young_images, "for_s": self.alert_s}
            self.audit("policy_change", root, body)

    def _suspect_campaign(self, client: str) -> str | None:
        """The campaign of a client throttled or worse (by its own evidence or its campaign's),
        else None: whose recent queries a young identity's may continue (caller holds ``lock``)."""
        if self.ladder.rung(client) == OBSERVE and self.ladder.campaign_rung(client) == OBSERVE:
            return None
        return self.ladder.root(client)

    def _note_suspect(self, client: str) -> None:
        """Keeps the last ``SUSPECTS`` identities (and their campaigns' roots) seen while their
        campaign was throttled or worse: whose line-search windows a young identity's query is
        also scanned against (caller holds ``lock``)."""
        root = self._suspect_campaign(client)
        if root is None:
            return
        for who in (root, client):
            self._suspects[who] = None
            self._suspects.move_to_end(who)
        while len(self._suspects) > SUSPECTS:
            self._suspects.popitem(last=False)

    def _young(self, client: str) -> bool:
        """A young identity while the alert is on: its suspicious images are withheld."""
        if not self.alert_active():
            return False
        account = self.ladder.account(client)
        return account is None or account.images < self.young_images

    def _campaigns(self, state: str) -> float:
        """Linked campaigns, or those at the refuse rung (read at scrape time)."""
        with self.lock:
            return float(self.ladder.campaign_count(contained=state == "contained"))

    def admit(self, client: str | None, shared: bool = False) -> str | None:
        """Raises ``Contained`` (403) or ``TooManyRequests`` (429) for a contained client;
        returns the campaign charged for a throttled client's admission (for ``enforce``). A
        ``shared`` identity (a peer address) is never refused at the door: its honest
        co-tenants would be refused with it."""
        if client is None or shared:
            return None
        with self.lock:
            rung = self.ladder.rung(client)
            if rung == REFUSE:
                self.refuse()
            if rung == OBSERVE:
                return None
            campaign = self.ladder.throttle_key(client)
            self._charge(campaign)
            return campaign

    def _charge(self, campaign: str) -> None:
        """One admission of a throttled campaign per interval: 429 for the rest (caller holds
        ``lock``)."""
        now = time.monotonic()
        last = self._last_admitted.get(campaign)
        wait = 0.0 if last is None else last + self.throttle_interval_s - now
        if wait > 0:
            self.metrics.defence_refused.labels(THROTTLE).inc()
            raise throttled(wait)
        self._admitted(campaign, now)

    def _admitted(self, campaign: str, now: float) -> None:
        """Starts the campaign's (or client's) throttle interval at ``now``, monotonic s
        (caller holds ``lock``)."""
        self._last_admitted[campaign] = now
        self._last_admitted.move_to_end(campaign)
        if len(self._last_admitted) > self.ladder.max_clients:
            self._last_admitted.popitem(last=False)

    def enforce(
        self, client: str | None, observed: Observation, charged: str | None, shared: bool = False
    ) -> None:
        """Applies the rung ``observe`` returned to this response: 403 when the client (or the
        campaign its queries just linked it to) is refused; when throttled, the admission is
        charged to the campaign unless ``admit`` already did (a fresh identity's first query
        shares its campaign's interval: 429). A request carrying a probe that continues a contained
        campaign is refused whoever sends it (the campaign's queries stay contained, its
        identities or not). For a ``shared`` identity only a request with a probe is refused,
        from the strict rung up (below it, its probes get repeats)."""
        if client is None:
            return
        rung = observed.rung
        if observed.contained:  # a contained campaign's query, under any identity
            with self.lock:  # an unbound sender is throttled: its interval starts now
                self._admitted(self.ladder.throttle_key(client), time.monotonic())
            self.refuse(campaign=self.ladder.rung(client) != REFUSE)
        if observed.refused:
            self.metrics.defence_refused.labels("repeat").inc()
            raise Forbidden(
                f"images {list(observed.refused)} withheld: each repeats or nearly duplicates "
                "an earlier query that was refused, and gets the same answer",
                {"reason": "repeat", "withheld": list(observed.refused)},
            )
        if observed.lines and not shared:
            self.metrics.defence_refused.labels("probe").inc()
            raise Forbidden(
                f"request refused: images {list(observed.lines)} probe the model's decisions",
                {"reason": "probe", "withheld": list(observed.lines)},
            )
        if shared:
            if rung in (STRICT, REFUSE) and observed.probes:
                self.refuse()
            return
        if rung == REFUSE:
            self.refuse()
        if rung in (THROTTLE, STRICT):
            with self.lock:
                campaign = self.ladder.throttle_key(client)
                if charged != campaign:
                    self._charge(campaign)

    def observe(
        self,
        client: str | None,
        prints: np.ndarray,
        verdicts: list[str],
        inputs: np.ndarray,
        answers: np.ndarray | None = None,
        answer_key: int = 0,
        flag_rate: float | None = None,
        embedded: Embedded | None = None,
        block_rate: float | None = None,
        request_id: str | None = None,
        model: str | None = None,
        pending: bool = False,
    ) -> Observation:
        """Weighs one request's images: ``prints`` (n, S) int64, one verdict per image, and the
        input rows (n, ...) whose raw bytes tell an exact resend (a retry, by anyone: the same
        picture sent again) from an attack's next step (a near-duplicate with new pixels).
        ``answers`` (n, A) float32 are the predictions about to be served, kept for the
        ``repeat`` response under ``answer_key`` (model, version, outputs); ``flag_rate`` is
        the model's honest rate of suspicious-or-worse verdicts (its review tier's FPR),
        ``block_rate`` of adversarial ones (its block tier's);
        ``embedded`` carries the embeddings for the model's k-NN detector, if it has one.
        Each probe is logged at debug level with the request's id and what it was given;
        ``model`` ("name:version", the one that answered) goes into the decisions logged.
        ``pending``: ``answers`` are not what will be served (a remote model's upstream answers
        later, ``answered``): none is kept or shared now, so nothing repeats them."""
        key = client or "(anonymous)"
        rung, probes, nears, contained, repeats = OBSERVE, 0, 0, 0, {}
        refused: list[int] = []
        lines: list[int] = []  # on the line through two of the client's pictures: withheld
        slots: list[tuple[int, int]] = []
        indices: list[int] = []  # the image of each slot
        shared: list[Evidence] = []  # for the other replicas
        with self.lock:
            young = self._young(key)
            account = self.ladder.account(key)
            new_sender = account is None or account.images < self.young_images
            if embedded is not None:
                self._knn_specs[embedded.model] = embedded.spec
            for i, (row, verdict, image) in enumerate(zip(prints, verdicts, inputs, strict=True)):
                content = picture_hash(image)
                owner = self.lines.refused_to(content)
                if owner is not None and (owner == key or new_sender):
                    lines.append(i)  # a refused line search resent (by a fresh identity too)
                    continue
                same = self.index.resent(content)
                if same is not None and not self.index.refused(same, answer_key):
                    # a retry of a served picture: no evidence, and the answer it got before;
                    # from a young identity, a picture served to a suspect campaign continues
                    # it (HopSkipJump re-asks its boundary point under each new identity)
                    owner = self.index.client(same)
                    if new_sender and owner not in (None, key) and self._suspect_campaign(owner):
                        probes += 1
                        self.ladder.observe(
                            key, verdict in FLAGGED, True, owner, flag_rate,
                            adversarial=verdict == "adversarial", block_rate=block_rate,
                        )  # fmt: skip
                        log.debug(
                            "probe: client %s request %r image %d: repeated (a resend; "
                            "campaign of %s)", key, request_id, i, self.ladder.root(key),
                        )  # fmt: skip
                    if answers is not None:
                        given = self.index.answer(same, answer_key, answers.shape[1])
                        if given is not None:
                            repeats[i] = given
                    continue
                match = self.index.match(row)
                if match is not None and match.content == content:
                    # a retry of a refused picture: decided afresh, no evidence, unless it is
                    # blocked again and resent by the client it was refused to (ART's Square
                    # resends its image when a step fails): then it counts against that client
                    # again, at most RECOUNTS times a picture (the same pixels get the same
                    # verdict, so this is no likelihood ratio: the cap keeps any one picture,
                    # an honest false positive retried forever or a planted one, short of the
                    # throttle; ART's Square re-asks its current point every iteration)
                    if (
                        match.client == key
                        and verdict == "adversarial"
                        and self._recount(key, match.slot, content, flag_rate, block_rate)
                        and self.on_evidence is not None
                    ):
                        shared.append(Evidence.resent(key, row, content, flag_rate, block_rate))
                    continue
                label = int(np.argmax(answers[i])) if answers is not None else line_search.REFUSED
                suspects = tuple(self._suspects) if new_sender else ()
                partner = self.lines.check(key, image, label, content, suspects)
                on_line = partner is not None
                probe = match is not None and match.links > 0
                linked = match.client if probe and match is not None else None
                if linked is None and partner not in (None, key):
                    linked = partner  # a young identity continuing a suspect's line search
                probe = probe or on_line
                near = None
                if embedded is not None:
                    vector = embedded.embeddings[i : i + 1]
                    sybil = self.histories.link(
                        key, embedded.model, embedded.spec, vector, self._suspect_campaign
                    )
                    if sybil is not None and not probe:  # a young identity's query sits next
                        probe, linked = True, sybil  # to another client's: the same campaign
                    near = bool(self.histories.near(key, embedded.model, embedded.spec, vector)[0])
                    nears += near
                probes += probe
                joins = linked is not None and self.ladder.root(linked) != self.ladder.root(key)
                rung = self.ladder.observe(
                    key,
                    verdict in FLAGGED,
                    probe,
                    linked,
                    flag_rate,
                    near,
                    embedded.spec.fpr if embedded is not None else None,
                    verdict == "adversarial",
                    block_rate,
                )
                if joins and self.audit is not None:  # probes linked it to another client
                    size = len(self.ladder.campaign(key))
                    if size <= 100 or size % 100 == 0:  # a sybil flood: every 100th after
                        body = {"joined": key, "via": linked, "size": size}
                        self.audit("campaign", self.ladder.root(key), body)
                campaign = self.ladder.campaign_rung(key) if probe else OBSERVE
                self._note_suspect(key)
                if campaign != OBSERVE:
                    self.decisions.campaign(key, campaign, request_id, model)
                    self._raise_alert(self.ladder.root(key), request_id)
                contained += campaign == REFUSE  # it continues a contained campaign: refused
                given = None
                if on_line:
                    lines.append(i)
                # a probe gets the remembered answer (``repeat``: every near-duplicate does), and
                # so does any near-duplicate once its sender or the campaign it continues is
                # throttled or worse, or has sent a probe: a suspect learns nothing new from a
                # near-duplicate (an attack's step that lands on a lone query is a one-off)
                suspect = rung != OBSERVE or campaign != OBSERVE or self.ladder.probed(key)
                repeatable = match is not None and answers is not None and not on_line
                if (self.repeat or probe or suspect) and repeatable:
                    if self.index.refused(match.slot, answer_key):
                        refused.append(i)
                    else:
                        given = self.index.answer(match.slot, answer_key, answers.shape[1])
                    if given is not None:
                        repeats[i] = given
                if match is not None:
                    self.index.link(match.slot)
                if (probe or given is not None) and log.isEnabledFor(logging.DEBUG):
                    given_as = "refused again" if refused and refused[-1] == i else "answered"
                    given_as = "refused on a line" if on_line else given_as
                    log.debug(
                        "%s: client %s request %r image %d: %s (campaign of %s)",
                        "probe" if probe else "one-off",  # a suspect's one-off is repeated too
                        key,
                        request_id,
                        i,
                        "repeated" if given is not None else given_as,
                        self.ladder.root(key),
                    )
                slot = self.index.add(row, key, content, int(match is not None))
                slots.append((slot, content))
                indices.append(i)
                kept = None
                if answers is not None and not pending:  # what it is answered: the repeat, if any
                    kept = answers[i] if given is None else given
                    self.index.keep_answer(slot, answer_key, kept)
                elif given is not None:  # a repeat is served as it is: keep it now
                    kept = given
                    self.index.keep_answer(slot, answer_key, kept)
                if self.on_evidence is not None:
                    shared.append(
                        Evidence(
                            key,
                            row,
                            content,
                            verdict in FLAGGED,
                            verdict == "adversarial",
                            probe,
                            linked,
                            near,
                            flag_rate,
                            block_rate,
                            embedded.spec.fpr if embedded is not None else None,
                            answer_key if kept is not None else 0,
                            kept,
                            embedded.model if embedded is not None else None,
                            embedded.embeddings[i] if embedded is not None else None,
                        )
                    )
            rung = self.ladder.rung(key)
            self.decisions.client(key, rung, request_id, model)
        if probes:
            self.metrics.defence_probes.inc(probes)
        if shared and self.on_evidence is not None:
            self.on_evidence(shared)
        tightened = young and rung == OBSERVE
        return Observation(
            rung,
            probes,
            repeats,
            nears,
            contained,
            tuple(refused),
            tuple(slots),
            answer_key,
            tightened,
            tuple(lines),
            key,
            tuple(indices),
        )

    def answered(self, observed: Observation, answers: np.ndarray) -> None:
        """Keeps what a remote model's upstream answered (``answers`` (n, A) float32, laid out
        as ``served_answers``) for the queries ``observe`` remembered with the local screening
        model's answers (``observe`` with ``pending``), so a later repeat gives what was
        served, never the local model's answer. Rows given a remembered answer keep it; a
        slot reused or refused since is left alone. Other replicas get no answer for these
        queries (they forward their repeats rather than repeat a local answer)."""
        if not observed.answer_key:
            return
        with self.lock:
            for (slot, content), i in zip(observed.slots, observed.rows, strict=True):
                if i not in observed.repeats:
                    self.index.keep_served(slot, observed.answer_key, content, answers[i])

    def _recount(
        self,
        client: str,
        slot: int | None,
        content: int,
        flag_rate: float | None,
        block_rate: float | None,
        cap: bool = True,
    ) -> bool:
        """Counts a blocked picture that ``client`` resent once more against it, at most
        ``RECOUNTS`` times at ``slot`` (``cap``: False applies another replica's count, already
        capped there); returns whether it counted (caller holds ``lock``)."""
        kept, times = self._recounted.get(slot, (content, 0)) if slot is not None else (content, 0)
        times = times if kept == content else 0
        if cap and times >= RECOUNTS:
            return False
        if slot is not None:
            self._recounted[slot] = (content, times + 1)
        self.ladder.observe(
            client, True, False, flag_rate=flag_rate, adversarial=True, block_rate=block_rate
        )
        return True

    def settle(self, observed: Observation, served: bool) -> None:
        """Records whether the request's answers were served: when it was refused (withheld,
        throttled, contained) its queries are remembered as refused, so a near-duplicate of one
        is refused in turn rather than given the answer it was denied."""
        if served or not observed.answer_key:
            return
        with self.lock:
            for slot, content in observed.slots:
                self.index.keep_refusal(slot, observed.answer_key, content)
            if observed.client is not None:
                contents = [content for _, content in observed.slots]
                self.lines.refused(observed.client, contents)
        if self.on_refusal is not None and observed.slots:
            self.on_refusal(observed.answer_key, [content for _, content in observed.slots])

    def replay(self, batch: list[Evidence]) -> None:
        """Applies another replica's evidence as if this replica had weighed it: the queries
        are remembered (with what they were answered) and the ladder observes what that
        replica decided (probe, link, k-NN), so a client or campaign contained through one
        replica is contained on all. Nothing is logged: the replica that saw it logs it."""
        with self.lock:
            for e in batch:
                if e.resend:  # a blocked picture its client resent: the ladder's only
                    slot = self.index.resent(e.content)
                    self._recount(e.client, slot, e.content, e.flag_rate, e.block_rate, cap=False)
                    continue
                match = self.index.match(e.fingerprint)
                if match is not None:
                    self.index.link(match.slot)
                slot = self.index.add(e.fingerprint, e.client, e.content, int(match is not None))
                if e.answer is not None and e.answer_key:
                    self.index.keep_answer(slot, e.answer_key, e.answer)
                spec = self._knn_specs.get(e.model) if e.model is not None else None
                if spec is not None and e.embedding is not None:
                    vector = e.embedding.reshape(1, -1)
                    self.histories.link(e.client, e.model, spec, vector)  # type: ignore[arg-type]
                    self.histories.near(e.client, e.model, spec, vector)  # type: ignore[arg-type]
                self.ladder.observe(
                    e.client,
                    e.flagged,
                    e.probe,
                    e.linked,
                    e.flag_rate,
                    e.near,
                    e.near_rate,
                    e.adversarial,
                    e.block_rate,
                )
                if e.probe and self.ladder.campaign_rung(e.client) != OBSERVE:
                    self._raise_alert(self.ladder.root(e.client), None, audit=False)

    def replay_refusal(self, answer_key: int, contents: list[int]) -> None:
        """Another replica refused these queries: a near-duplicate of one is refused here too."""
        with self.lock:
            for content in contents:
                slot = self.index.resent(content)
                if slot is not None:
                    self.index.keep_refusal(slot, answer_key, content)
