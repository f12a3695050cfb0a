"""Evidence against a client or a campaign, tested sequentially, and the containment ladder.

Every screened image of a client is one Bernoulli observation per evidence stream: was it
flagged (a ``suspicious`` or ``adversarial`` verdict; honest rate: the review tier's clean FPR),
was it a probe (a content-fingerprint near-duplicate of a remembered query that was itself a
near-duplicate: a chain, not an exact retry nor a one-off re-encode; honest rate:
``probe_rate``), and was it near (the per-client k-NN embedding distance below its calibrated
threshold; honest rate: that threshold's clean FPR). Page's CUSUM (Page, Biometrika 1954)
accumulates the log-likelihood ratio of an attack rate against the honest rate, never going
below zero:

    S <- max(0, S + x log(p1 / p0) + (1 - x) log((1 - p1) / (1 - p0)))

For an honest client the statistic drifts down and sits at zero (each clean image that is not a
probe takes 1.3 off); an attack's probes push it up by ``log(p1 / p0)`` each (6.2 for a probe at
p0 = 0.1 %, p1 = 50 %), its blocked images by 3.9 (a 0.5 % block tier). A rung is
reached when S crosses its threshold ``h``. For CUSUM the average number of honest observations
before a false crossing is at least ``exp(h)`` (Lorden 1971), so a threshold ``h`` reaches an
honest client with probability at most ``n exp(-h)`` over ``n`` of its images. The defaults bound
it, over 100,000 honest images, by 1e-3 for throttling (``h`` = ln 1e8: one request a second,
reached by an attack's third or fourth probe), 1e-6 for strict and 1e-9 for refusal
(containment).

Clients whose probes match each other's queries are linked into one campaign (union-find). A
campaign has its own CUSUM over its members' pooled observations (on linking, the larger of the
two), so a rotating attacker's identities add up to one attacker's stream, while honest clients
linked by chance pool honest rates and stay at zero. The campaign's rung applies to a member
only when most of the member's own images were probes: an attacker that makes its probes match
an honest client's pictures links that client, but cannot frame it. Before a member is bound
(two probes), a contained campaign throttles it while most of its images were probes: a
rotating attacker's fresh identity waits after its first query, an honest one is free again
after its next honest picture.

The CUSUM forgives: clean images pull it down, so an attacker who pads every attack image with
a dozen fresh clean ones keeps it at zero. A second test does not forgive: the probes among a
client's (and a campaign's) last ``window`` images, against a Poisson count at the honest probe
rate (mean 1 in 1,000 images): 10 or more throttle (P = 1e-7 per window for an honest client),
12 strict, 14 refuse (1e-11). Padding only dilutes the attacker's probes within the window.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

OBSERVE, THROTTLE, STRICT, REFUSE = "observe", "throttle", "strict", "refuse"
EVICTION_SCAN = 64  # clients looked at for one eviction, contained ones kept
RUNGS = (OBSERVE, THROTTLE, STRICT, REFUSE)


@dataclass(frozen=True)
class LadderSpec:
    """Rates and thresholds (natural log units) of the sequential test and the ladder."""

    flag_rate: float = 0.05  # honest rate of suspicious-or-worse verdicts: the review tier's FPR
    flag_attack_rate: float = 0.5
    block_rate: float = 0.005  # honest rate of adversarial verdicts: the block tier's FPR
    block_attack_rate: float = 0.25
    probe_rate: float = 0.001  # honest rate of linked near-duplicates (not retries)
    probe_attack_rate: float = 0.5
    near_rate: float = 0.001  # honest rate of k-NN hits: the detector's calibrated clean FPR
    near_attack_rate: float = 0.5
    near_blocked_attack_rate: float = 0.05  # of blocked images (an L-inf attack's, far apart)
    throttle_at: float = math.log(1e8)
    strict_at: float = math.log(1e11)
    refuse_at: float = math.log(1e14)
    window: int = 1000  # images the probe count looks back over
    window_counts: tuple[int, int, int] = (10, 12, 14)  # probes in it: throttle, strict, refuse

    def __post_init__(self) -> None:
        for p0, p1 in (
            (self.flag_rate, self.flag_attack_rate),
            (self.block_rate, self.block_attack_rate),
            (self.probe_rate, self.probe_attack_rate),
            (self.near_rate, self.near_attack_rate),
            (self.near_rate, self.near_blocked_attack_rate),
        ):
            if not 0 < p0 < p1 < 1:
                raise ValueError(f"need 0 < honest rate < attack rate < 1, got {p0}, {p1}")
        if not (
            self.block_rate < self.flag_rate and self.block_attack_rate < self.flag_attack_rate
        ):
            raise ValueError("adversarial verdicts are a part of the flagged ones")
        if not 0 < self.throttle_at <= self.strict_at <= self.refuse_at:
            raise ValueError("need 0 < throttle_at <= strict_at <= refuse_at")
        if self.window < 1 or not 1 <= self.window_counts[0] <= self.window_counts[1]:
            raise ValueError("need window >= 1 and 1 <= throttle count <= strict count")
        if self.window_counts[1] > self.window_counts[2]:
            raise ValueError("need strict count <= refuse count")

    def increment(
        self,
        flagged: bool,
        probe: bool,
        flag_rate: float | None = None,
        near: bool | None = None,
        near_rate: float | None = None,
        adversarial: bool = False,
        block_rate: float | None = None,
    ) -> float:
        """One image's log-likelihood ratio, the streams together. The verdict is one of three
        outcomes: clean, suspicious (``flagged``), adversarial (``flagged`` and
        ``adversarial``), at the honest rates of the model the image went to (its review and
        block tiers' FPRs ``flag_rate`` and ``block_rate``, else the spec's): a run of blocked
        images says far more than a run of suspicious ones. ``near`` is None where the model has
        no k-NN detector (or the client no history yet), ``near_rate`` that detector's
        calibrated FPR, else the spec's. For a blocked image the attack hypothesis takes a k-NN
        hit to be rare (``near_blocked_attack_rate``: an L-inf attack's large early steps,
        which the block tier withholds, are far apart in embedding space), so "not near" costs
        it almost nothing and a run of blocked images is throttled by its sixth, not its eighth,
        while a blocked image that is near still weighs more. Each step is a likelihood ratio
        (mean 1 for an honest client), so Lorden's bound holds."""
        r = self.flag_rate if flag_rate is None else min(flag_rate, self.flag_attack_rate / 2)
        b = self.block_rate if block_rate is None else block_rate
        b = min(b, r / 2, self.block_attack_rate / 2)
        if adversarial and flagged:
            step = math.log(self.block_attack_rate / b)
        elif flagged:
            step = math.log((self.flag_attack_rate - self.block_attack_rate) / (r - b))
        else:
            step = math.log((1 - self.flag_attack_rate) / (1 - r))
        step += _llr(probe, self.probe_rate, self.probe_attack_rate)
        if near is not None:
            blocked = adversarial and flagged
            q1 = self.near_blocked_attack_rate if blocked else self.near_attack_rate
            q0 = self.near_rate if near_rate is None else min(near_rate, q1 / 2)
            step += _llr(near, q0, q1)
        return step

    def window_rung(self, window: ProbeWindow) -> str:
        """The rung the probes among the last ``window`` images reach."""
        if len(window.probes) < self.window_counts[0]:
            return OBSERVE  # too few probes ever to reach a rung (an honest client's case)
        count = window.count(self.window)
        for rung, at in zip((REFUSE, STRICT, THROTTLE), reversed(self.window_counts), strict=True):
            if count >= at:
                return rung
        return OBSERVE

    def rung(self, statistic: float) -> str:
        if statistic >= self.refuse_at:
            return REFUSE
        if statistic >= self.strict_at:
            return STRICT
        return THROTTLE if statistic >= self.throttle_at else OBSERVE

    def false_containment_bound(self, images: int, rung: str = REFUSE) -> float:
        """Upper bound on the chance an honest client reaches ``rung`` within ``images``."""
        at = {THROTTLE: self.throttle_at, STRICT: self.strict_at, REFUSE: self.refuse_at}[rung]
        return min(1.0, images * math.exp(-at))


def _llr(event: bool, p0: float, p1: float) -> float:
    return math.log(p1 / p0) if event else math.log((1 - p1) / (1 - p0))


def higher(a: str, b: str) -> str:
    """The higher of two rungs."""
    return a if RUNGS.index(a) >= RUNGS.index(b) else b


@dataclass
class ProbeWindow:
    """Where the latest probes fell among a stream's images (enough of them for the refuse
    count): how many fell in the last ``width`` images."""

    images: int = 0
    probes: deque[int] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, probe: bool) -> None:
        self.images += 1
        if probe:
            self.probes.append(self.images)

    def count(self, width: int) -> int:
        start = self.images - width
        return sum(1 for i in self.probes if i > start)


@dataclass
class Account:
    """A client's evidence: its own CUSUM statistic and counts, for the audit."""

    statistic: float = 0.0
    images: int = 0
    flagged: int = 0
    probes: int = 0
    near: int = 0
    last_seen: float = 0.0
    released_at: float | None = None
    window: ProbeWindow = field(default_factory=ProbeWindow)


@dataclass
class Ladder:
    """Per-client CUSUM, campaigns by union-find, the rung in force; bounded LRU of clients.

    Not thread-safe: one owner calls it (the screening path, after each batch).
    """

    spec: LadderSpec = field(default_factory=LadderSpec)
    max_clients: int = 100_000
    clock: Callable[[], float] = time.time
    _accounts: OrderedDict[str, Account] = field(default_factory=OrderedDict)
    _parent: dict[str, str] = field(default_factory=dict)  # linked clients only
    _members: dict[str, set[str]] = field(default_factory=dict)  # root -> its campaign
    _pooled: dict[str, float] = field(default_factory=dict)  # root -> the campaign's CUSUM
    _windows: dict[str, ProbeWindow] = field(default_factory=dict)  # root -> its probe window

    def observe(
        self,
        client: str,
        flagged: bool,
        probe: bool,
        linked: str | None = None,
        flag_rate: float | None = None,
        near: bool | None = None,
        near_rate: float | None = None,
        adversarial: bool = False,
        block_rate: float | None = None,
    ) -> str:
        """Adds one image's evidence; ``linked`` is the client whose remembered query this one
        matched (same campaign), ``flag_rate`` and ``block_rate`` the model's honest rates of
        suspicious-or-worse and adversarial verdicts (its tiers; ``adversarial``: the image's
        verdict was the block tier's), ``near`` the k-NN verdict (None: no detector) at honest
        rate ``near_rate``. Returns the rung now in force for the client."""
        account = self._account(client)
        account.images += 1
        account.flagged += flagged
        account.probes += probe
        account.near += bool(near)
        account.last_seen = self.clock()
        step = self.spec.increment(
            flagged, probe, flag_rate, near, near_rate, adversarial, block_rate
        )
        account.statistic = max(0.0, account.statistic + step)
        account.window.add(probe)
        if linked is not None and linked != client:
            self._union(client, linked)
        root = self._find(client)
        if root in self._members:  # a linked client: the campaign's pooled stream moves too
            self._pooled[root] = max(0.0, self._pooled.get(root, 0.0) + step)
            self._windows.setdefault(root, ProbeWindow()).add(probe)
        return self.rung(client)

    def bound(self, client: str) -> bool:
        """Whether the campaign's rung binds the client: most of its own images were probes (a
        rotating attacker's identities), not one re-encode among honest pictures that an
        attacker's chain happened to, or was made to, run through."""
        account = self._accounts.get(client)
        return account is not None and account.probes >= 2 and 2 * account.probes > account.images

    def probed(self, client: str) -> bool:
        """Whether the client has sent a probe since it was last released."""
        account = self._accounts.get(client)
        return account is not None and bool(account.window.probes)  # a release empties it

    def rung(self, client: str) -> str:
        """The client's rung: its own, or its campaign's when the campaign binds it. Before
        it is bound, a client that probed and whose images so far were mostly probes or
        flagged (a rotating attacker's fresh identity after its first linked query) takes its
        campaign's rung, at its own interval and at most strict, while the campaign is
        throttled or worse: its next query (a step far from anything remembered, or an
        OARS-style attacker's next noisy step after a refusal made it switch identity) waits,
        and on the strict rung its suspicious images are withheld. An honest newcomer whose
        first picture happened to continue the campaign waits one interval, then is free (its
        next clean picture outweighs the probe)."""
        account = self._accounts.get(client)
        if account is None:
            return OBSERVE
        own = higher(self.spec.rung(account.statistic), self.spec.window_rung(account.window))
        if self.bound(client):
            return higher(own, self.campaign_rung(client))
        if account.probes and 2 * max(account.probes, account.flagged) > account.images:
            campaign = self.campaign_rung(client)
            if campaign != OBSERVE:
                return higher(own, THROTTLE if campaign == THROTTLE else STRICT)
        return own

    def campaign_rung(self, client: str) -> str:
        """The rung the client's campaign reached (observe for a client linked to nobody): what
        a query that continues the campaign meets, whoever sends it."""
        root = self._find(client)
        if root not in self._members:
            return OBSERVE
        window = self._windows.get(root)
        pooled = self.spec.rung(self._pooled.get(root, 0.0))
        return pooled if window is None else higher(pooled, self.spec.window_rung(window))

    def throttle_key(self, client: str) -> str:
        """Who shares a throttled client's interval: its campaign when bound to it, else itself
        alone (an honest client linked into a campaign is never charged for the attacker)."""
        return self._find(client) if self.bound(client) else client

    def campaign(self, client: str) -> list[str]:
        """The clients linked with ``client`` (itself included), sorted."""
        return sorted(self._members.get(self._find(client), {client}))

    def campaign_statistic(self, client: str) -> float:
        """The campaign's pooled CUSUM (0 for a client linked to nobody)."""
        return self._pooled.get(self._find(client), 0.0)

    def campaign_count(self, contained: bool = False) -> int:
        """Campaigns of two or more linked clients; ``contained``: those at the refuse rung."""
        if not contained:
            return len(self._members)
        return sum(self.campaign_rung(root) == REFUSE for root in self._members)

    def root(self, client: str) -> str:
        """The campaign's name: its union-find root (the client itself when unlinked)."""
        return self._find(client)

    def release(self, client: str) -> None:
        """An admin lifts containment: the client and its campaign start from zero evidence."""
        members = self.campaign(client)
        root = self._find(client)
        self._members.pop(root, None)
        self._pooled.pop(root, None)
        self._windows.pop(root, None)
        for member in members:
            account = self._accounts.get(member)
            if account is not None:
                account.statistic = 0.0
                account.window = ProbeWindow()
                account.released_at = self.clock()
            self._parent.pop(member, None)

    def account(self, client: str) -> Account | None:
        return self._accounts.get(client)

    def clients(self) -> list[str]:
        """Tracked clients, most recently seen first."""
        return list(reversed(self._accounts))

    def _account(self, client: str) -> Account:
        account = self._accounts.get(client)
        if account is None:
            account = self._accounts[client] = Account()
            if len(self._accounts) > self.max_clients:  # forget the least recently seen
                forgotten = self._evictable()
                root = self._find(forgotten)
                self._members.get(root, set()).discard(forgotten)
                self._pooled.pop(forgotten, None)
                self._windows.pop(forgotten, None)
                if root != forgotten:  # a linked member: its link goes with it
                    self._parent.pop(forgotten, None)
        self._accounts.move_to_end(client)
        return account

    def _evictable(self) -> str:
        """Takes out the least recently seen client that is not strict or contained: a flood
        of fresh identities must not push a contained client out of memory (and so out of
        containment). Contained clients met on the way go to the recent end; after
        ``EVICTION_SCAN`` of them the oldest goes anyway, so the bound holds."""
        for _ in range(EVICTION_SCAN):
            client = next(iter(self._accounts))
            if RUNGS.index(self.rung(client)) < RUNGS.index(STRICT):
                break
            self._accounts.move_to_end(client)
        else:
            client = next(iter(self._accounts))
        del self._accounts[client]
        return client

    def _find(self, client: str) -> str:
        root = client
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while self._parent.get(client, client) != root:  # path compression
            self._parent[client], client = root, self._parent[client]
        return root

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        merged = self._members.pop(ra, {ra}) | self._members.pop(rb, {rb})
        self._parent[ra] = rb
        self._parent.setdefault(rb, rb)
        self._members[rb] = merged
        # a campaign's evidence so far: the larger of the two (a lone client's is its own)
        pooled = [self._pooled.pop(r, None) for r in (ra, rb)]
        lone = [self._accounts[r].statistic if r in self._accounts else 0.0 for r in (ra, rb)]
        self._pooled[rb] = max(p if p is not None else s for p, s in zip(pooled, lone, strict=True))
        windows = [
            self._windows.pop(r, None)
            or (self._accounts[r].window if r in self._accounts else None)
            for r in (ra, rb)
        ]
        kept = [w for w in windows if w is not None]
        if kept:  # the window with more recent probes stands for the campaign
            self._windows[rb] = max(kept, key=lambda w: w.count(self.spec.window))
