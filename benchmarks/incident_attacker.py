"""The attacker of the incident benchmark (``benchmarks.incident``): its seeds and its oracles.

Seeds are correctly classified test digits the screening passes; a decision-based attack starts
from the nearest such digit of another class, and no two seeds share a start (a shared start
would link two attacks through the fingerprints before either has probed anything).

An oracle is what an attack library calls to classify a batch: it sends each image alone (under
the attacker's current identity, a fresh random name every ``rotate`` queries), reads the reply
as the attacker would, and keeps the ledger the attacker cannot: whether each answer was fresh
(equal to the model's own output for the image sent) or a repeat, when the campaign was first
acted on (a repeat, a refusal as a repeat, 429 or 403 contained) and first throttled or
contained, and the closest misclassified image that got a fresh answer. It ends the
attack by raising ``StopAttack`` when the seed's query budget is spent, ``after_detection``
queries have followed the detection, or the seed's time is up.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.benchmarks.adversarial.blackbox import eligible_digits
from bastion.benchmarks.adversarial.through_gateway import gateway_rule, offline_scores
from bastion.benchmarks.incident_clients import (
    AGAIN,
    CONTAINED,
    DEFENCE_ACTIONS,
    OK,
    PROBED,
    REFUSED_AGAIN,
    REPEAT,
    SHAPE,
    THROTTLED,
    TRACE,
    WITHHELD,
    GatewayClient,
    Reply,
)
from bastion.gateway.defence.fingerprint import picture_hash

L2_BOUND, LINF_BOUND = 4.0, 0.3  # the threat balls (MNIST's usual: Carlini & Wagner; Madry et al.)
FRESH_TOLERANCE = 1e-4  # max-abs difference of probabilities that marks an answer as a repeat
REQUESTS = itertools.count()  # request ids, unique across oracles (next() is atomic in CPython)
REFUSALS = (THROTTLED, CONTAINED, REFUSED_AGAIN, PROBED)  # the defence's, not the screening's


def choose_seeds(count: int, seed: int, beyond: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``count`` correctly classified test digits the screening passes, each with its own
    start (the nearest such digit of another class, used by no other seed, farther than
    ``beyond`` in L2: a start inside the threat ball is another digit, not an adversarial
    example, and would count as one won without a query); and the test digits left for
    honest clients."""
    x, labels, eligible = eligible_digits()
    order = np.random.default_rng(seed).permutation(eligible)
    chosen: list[int] = []
    used, starts = set(), []
    for i in order:
        if len(chosen) == count:
            break
        if int(i) in used:
            continue
        others = np.array([j for j in eligible if labels[j] != labels[i] and j not in used])
        distances = np.linalg.norm((x[others] - x[i]).reshape(len(others), -1), axis=1)
        if distances.min() <= beyond:
            continue
        chosen.append(int(i))
        starts.append(int(others[distances.argmin()]))
        used.update((int(i), starts[-1]))
    index = np.array(chosen)
    honest = np.setdiff1d(np.arange(len(x)), np.array(sorted(used)))
    picked = {"index": index, "x": x[index], "y": labels[index], "start": x[np.array(starts)]}
    return picked, x[honest]


def screening_alone(images: np.ndarray) -> int:
    """How many of these images the per-image screening withholds by itself, scored offline
    (a plain 403 under the defence's ``strict`` rung may also be a suspicious image)."""
    return int(withheld_alone(images).sum())


def withheld_alone(images: np.ndarray) -> np.ndarray:
    """Per image (N, 1, 28, 28) float32: would the per-image screening withhold it by itself,
    scored offline in batches of 250 (bool, (N,))."""
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    if not len(images):
        return np.zeros(0, dtype=bool)
    combined, threshold = offline_scores({"sent": images}, 250, DEFAULT_REPOSITORY)
    return np.asarray(gateway_rule(combined["sent"][:, -1], threshold), dtype=bool)


class StopAttack(Exception):
    """Ends an attack from inside the oracle (ART and foolbox let it propagate)."""


@dataclass
class Ledger:
    """What one seed's attack sent and got: the attacker's view and the truth beside it."""

    x: np.ndarray  # the seed (1, 1, 28, 28)
    label: int
    start: np.ndarray | None
    norm: str  # "l2" or "linf"
    bound: float
    trace: list[str] = field(default_factory=list)
    detection: int | None = None  # 1-based query the defence first acted on (repeat, 429, 403)
    contained_at: int | None = None  # 1-based query first answered 429 or 403 contained
    identities: set[str] = field(default_factory=set)
    obtained: float | None = None  # distance of the closest fresh misclassified answer
    obtained_at: int | None = None  # 1-based query that obtained the first one
    believed: tuple[float, np.ndarray] | None = None  # the attacker's closest "adversarial"
    retries: int = 0
    answered: dict[int, np.ndarray] = field(default_factory=dict)  # picture hash -> answer
    withheld: list[np.ndarray] = field(default_factory=list)  # images answered a plain 403
    request_ids: list[str | None] = field(default_factory=list)  # one per query, in order
    ended: str = "finished"
    deadline: float = float("inf")  # time.monotonic() after which the attack is stopped

    def summary(self) -> dict[str, Any]:
        trace = "".join(self.trace)
        after = trace[self.detection :] if self.detection is not None else ""
        return {
            "ended": self.ended,
            "queries": len(trace),
            "detection": self.detection,
            "contained_at": self.contained_at,
            "after_detection": len(after),
            "after_answered": after.count(TRACE[OK]),
            "outcomes": {o: trace.count(c) for o, c in TRACE.items() if c in trace},
            "obtained_distance": self.obtained,
            "obtained_at": self.obtained_at,
            "identities": len(self.identities),
            "retries": self.retries,
            "trace": trace,
        }

    def distance(self, image: np.ndarray) -> float:
        delta = (image - self.x).ravel()
        return float(np.abs(delta).max() if self.norm == "linf" else np.linalg.norm(delta))

    def within(self, image: np.ndarray) -> bool:
        return self.distance(image) <= self.bound + 1e-6


class Oracle:
    """The attacker's classifier over HTTP. A refused query is read as "not adversarial": for a
    score-based attack uniform probabilities (ties broken towards the seed's label, else the
    argmax would read class 0 as a success), for a ``decision``-based one the seed's label (it
    gets one-hot answers). ``parallel`` queries are in flight at once, each alone in its
    request."""

    def __init__(self, url: str, net: Any, decision: bool, limits: dict[str, int], rng_seed: int):
        import torch

        self.url, self.net, self.decision, self.torch = url, net, decision, torch
        self.budget, self.after_detection = limits["budget"], limits["after_detection"]
        self.rotate, self.parallel = limits["rotate"], limits["parallel"]
        self.rng = np.random.default_rng(rng_seed)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="attacker")
        self.sent = 0
        self.identity = self._fresh_name()
        self.ledger: Ledger | None = None

    def begin(self, ledger: Ledger) -> Ledger:
        self.ledger, self.identity, self.sent = ledger, self._fresh_name(), 0
        return ledger

    def close(self) -> None:
        self._pool.shutdown()

    def _fresh_name(self) -> str:
        return f"u{secrets.token_hex(5)}"

    def _client(self) -> GatewayClient:
        if getattr(self._local, "client", None) is None:
            self._local.client = GatewayClient(self.url)
        return self._local.client

    def _allowance(self, ledger: Ledger) -> int:
        left = self.budget - len(ledger.trace)
        if ledger.detection is not None:
            left = min(left, ledger.detection + self.after_detection - len(ledger.trace))
        return left

    def _check(self, ledger: Ledger) -> None:
        if len(ledger.trace) >= self.budget:
            raise StopAttack("budget")
        if self._allowance(ledger) <= 0:
            raise StopAttack("after-detection")
        if time.monotonic() > ledger.deadline:
            raise StopAttack("time")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """ART's ``predict_fn``: one row per image, as this attacker reads the gateway."""
        ledger = self.ledger
        assert ledger is not None, "begin() a seed first"
        x = np.asarray(x, np.float32).reshape(-1, *SHAPE[1:])
        rows: list[np.ndarray] = []
        while len(rows) < len(x):
            self._check(ledger)
            window = x[len(rows) : len(rows) + min(self.parallel, self._allowance(ledger))]
            names = []
            with self._lock:
                for _ in window:
                    if self.sent and self.sent % self.rotate == 0:
                        self.identity = self._fresh_name()
                    names.append(self.identity)
                    self.sent += 1
            for sends in self._pool.map(self._query, window, names):
                rows.append([self._record(ledger, *send) for send in sends][-1])
        return np.stack(rows)

    def _query(self, image: np.ndarray, name: str) -> list[tuple[np.ndarray, Reply]]:
        """Sends one image; returns each request made for it: what was sent, and the reply."""
        self.ledger.identities.add(name)  # type: ignore[union-attr]
        return [(image, self._client().infer(image, name, self._request_id()))]

    def _request_id(self) -> str:
        """A request id the gateway's debug log names each probe by (its ground truth)."""
        return f"attack-{next(REQUESTS)}"

    def _fresh(self, image: np.ndarray, answer: np.ndarray) -> bool:
        with self.torch.no_grad():
            logits = self.net(self.torch.from_numpy(image.reshape(SHAPE)))
            own = self.torch.softmax(logits, dim=1).numpy()[0]
        return float(np.abs(own - answer).max()) <= FRESH_TOLERANCE

    def _record(self, ledger: Ledger, sent: np.ndarray, reply: Reply) -> np.ndarray:
        outcome = reply.outcome
        if outcome == OK and not self._fresh(sent, reply.probabilities):
            outcome = REPEAT
        if outcome == OK and reply.probabilities is not None:
            picture = picture_hash(sent)
            before = ledger.answered.get(picture)
            if before is not None and np.allclose(before, reply.probabilities, atol=1e-6):
                outcome = AGAIN  # a retry of a picture it already had: nothing new
            else:
                ledger.answered[picture] = reply.probabilities
        ledger.trace.append(TRACE[outcome])
        ledger.request_ids.append(reply.request_id)
        if outcome == WITHHELD:
            ledger.withheld.append(sent.reshape(SHAPE[1:]).copy())
        if outcome in DEFENCE_ACTIONS and ledger.detection is None:
            ledger.detection = len(ledger.trace)
        if outcome in (THROTTLED, CONTAINED) and ledger.contained_at is None:
            ledger.contained_at = len(ledger.trace)
        reading = self._read(ledger, reply)
        fooled = int(reading.argmax()) != ledger.label
        if fooled and ledger.within(sent):
            distance = ledger.distance(sent)
            fresh = outcome == OK and (
                ledger.start is None or not np.array_equal(sent, ledger.start)
            )
            if fresh and (ledger.obtained is None or distance < ledger.obtained):
                ledger.obtained = distance
                ledger.obtained_at = ledger.obtained_at or len(ledger.trace)
            if ledger.believed is None or distance < ledger.believed[0]:
                ledger.believed = (distance, sent.copy())
        return reading

    def _read(self, ledger: Ledger, reply: Reply) -> np.ndarray:
        if reply.probabilities is None:
            if self.decision:
                return np.eye(10, dtype=np.float32)[ledger.label]
            uniform = np.full(10, 1.0, np.float32)
            uniform[ledger.label] += 1e-3  # ties go to the seed's label: "not adversarial"
            return uniform / uniform.sum()
        if self.decision:
            return np.eye(10, dtype=np.float32)[int(reply.probabilities.argmax())]
        return reply.probabilities.astype(np.float32)


class AdaptiveOracle(Oracle):
    """OARS-style (Feng et al., CCS 2023): fresh uniform noise of amplitude ``sigma`` (L-inf) on
    every query to dodge the content fingerprints (x1.5 per 429 or 403 ``contained`` or
    ``repeat``, x0.95 per answer, within [0.005, 0.2]; a 403 from the per-image screening leaves
    it as it is, since more noise only gets more images withheld); on 429 it sleeps
    ``Retry-After`` and resends under a new identity, on the defence's 403 it resends under a new
    identity at once (one resend per query)."""

    SIGMA_MIN, SIGMA_MAX = 0.005, 0.2

    def __init__(self, *args: Any, sigma: float = 0.02, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sigma = self.sigma_start = sigma

    def begin(self, ledger: Ledger) -> Ledger:
        self.sigma = self.sigma_start
        return super().begin(ledger)

    def _noisy(self, image: np.ndarray) -> np.ndarray:
        with self._lock:
            sigma = self.sigma
            noise = self.rng.uniform(-sigma, sigma, size=image.shape).astype(np.float32)
        return np.clip(image + noise, 0, 1).astype(np.float32)

    def _adjust(self, factor: float) -> None:
        with self._lock:
            self.sigma = float(np.clip(self.sigma * factor, self.SIGMA_MIN, self.SIGMA_MAX))

    def _switch(self, ledger: Ledger, name: str) -> str:
        with self._lock:
            ledger.retries += 1
            if self.identity == name:  # another thread may have switched already
                self.identity = self._fresh_name()
            return self.identity

    def _query(self, image: np.ndarray, name: str) -> list[tuple[np.ndarray, Reply]]:
        ledger = self.ledger
        assert ledger is not None
        sends: list[tuple[np.ndarray, Reply]] = []
        while True:
            sent = self._noisy(image)
            ledger.identities.add(name)
            reply = self._client().infer(sent, name, self._request_id())
            sends.append((sent, reply))
            if reply.outcome in (OK, *REFUSALS):
                self._adjust(0.95 if reply.outcome == OK else 1.5)
            if reply.outcome not in REFUSALS or len(sends) > 1:
                return sends
            if reply.outcome == THROTTLED:
                time.sleep(min(reply.retry_after_s, max(0.0, ledger.deadline - time.monotonic())))
            name = self._switch(ledger, name)
