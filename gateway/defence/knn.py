"""Per-client k-nearest-neighbour distance on the model's own embeddings.

Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks" (SPAI 2020,
arXiv 1907.05587): a query-based attack sends many queries close to each other, so the mean
distance from a client's new query to the ``k`` nearest of its earlier queries falls far below
what natural images show. The paper encodes queries with a separately trained similarity
encoder; here the encoder is the served model's penultimate layer (the embedding the screening
already computes), and the threshold is calibrated at ``bastion calibrate`` on clean images at
a target false-positive rate (the paper's 0.1th percentile of benign distances).

The benign distances are measured against histories of the *same predicted class*: an honest
client that only ever sends one kind of picture (a cheque reader's sevens) is the hardest
honest case for this test, and the threshold is set for it. The history is per client (an
attacker with many identities escapes it, so a young identity's queries are also compared with
every client's last ``recent`` queries, and one within ``link_threshold`` of another client's
query links the two: a sybil's next query sits next to its previous identity's),
and a young identity's query whose ``k`` nearest queries of a suspect campaign (throttled or
worse, under any of its identities) lie closer on average than ``threshold`` continues that
campaign: the paper's own test with the campaign as the one user it is),
a ring of ``history`` float32 embeddings, for at most ``clients`` clients (least recently seen
forgotten): memory is bounded by configuration. With numba (the ``fast`` extra) one query's
distances are a compiled loop (``nearest_mean``), else numpy's ``mean_knn_distance``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bastion.gateway.defence.jit import JIT, compiled

FILENAME = "knn.json"
CANDIDATES = 64  # recent queries nearest a young identity's, searched for a suspect campaign's


@dataclass(frozen=True)
class KnnSpec:
    """A calibrated detector: ``threshold`` on the mean L2 distance (embedding units) to the
    ``k`` nearest of the client's last ``history`` queries, set at clean FPR ``fpr``."""

    k: int
    history: int
    threshold: float
    fpr: float
    samples: int  # benign distances the threshold was taken from
    # a young identity's query this close (L2) to another client's recent query is linked to it
    # (a sybil's next query); the nearest-other distance of clean images at ``fpr``
    link_threshold: float | None = None

    def __post_init__(self) -> None:
        if not (1 <= self.k <= self.history and self.threshold > 0 and 0 < self.fpr < 1):
            raise ValueError(f"invalid k-NN detector {self}")
        if self.link_threshold is not None and not self.link_threshold > 0:
            raise ValueError(f"invalid k-NN detector {self}")

    def save(self, folder: Path) -> Path:
        path = folder / FILENAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> KnnSpec | None:
        """The version's calibrated detector, or None when it has none (calibrated before the
        detector existed: the fingerprints still guard it). Raises ``ValueError`` when the file
        is unreadable."""
        path = folder / FILENAME
        if not path.is_file():
            return None
        try:
            fields = json.loads(path.read_text())
            optional = {"link_threshold"}
            return cls(
                **{
                    name: fields[name]
                    for name in cls.__dataclass_fields__
                    if name in fields or name not in optional
                }
            )
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def mean_knn_distance(history: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(m, E) earlier embeddings, (n, E) new ones -> (n,) mean L2 distance from each new one to
    its ``k`` nearest earlier ones (all of them when fewer than ``k``; inf when none)."""
    if len(history) == 0:
        return np.full(len(queries), np.inf)
    h, q = history.astype(np.float32), queries.astype(np.float32)
    squared = (q * q).sum(1)[:, None] - 2 * q @ h.T + (h * h).sum(1)[None, :]
    distances = np.sqrt(np.maximum(squared, 0))
    k = min(k, distances.shape[1])
    nearest = np.partition(distances, k - 1, axis=1)[:, :k]
    return nearest.mean(axis=1)


def nearest_mean(ring: np.ndarray, filled: int, query: np.ndarray, k: int) -> float:
    """One query (E,) against the first ``filled`` rows of ``ring`` (H, E), float32: the mean
    L2 distance to its ``k`` nearest. The loop ``compiled`` runs when numba is installed."""
    distances = np.empty(filled, np.float64)
    for j in range(filled):
        total = 0.0
        for e in range(query.shape[0]):
            step = ring[j, e] - query[e]
            total += step * step
        distances[j] = np.sqrt(total)
    distances.sort()
    k = min(k, filled)
    return distances[:k].sum() / k


FAST_NEAREST_MEAN = compiled(nearest_mean)


def warm_up() -> None:
    """Compiles (or loads from the disk cache) the distance loop; a no-op without numba."""
    if JIT:
        FAST_NEAREST_MEAN(np.zeros((2, 2), np.float32), 2, np.zeros(2, np.float32), 1)


def calibrate(
    embeddings: np.ndarray,
    classes: np.ndarray,
    fpr: float = 0.001,
    k: int = 5,
    history: int = 100,
    draws: int = 4,
    seed: int = 0,
) -> KnnSpec:
    """The threshold at clean FPR ``fpr``: each clean embedding (N, E) is scored ``draws``
    times against ``history`` other clean embeddings of its own predicted class (``classes``,
    (N,) int). Raises ``ValueError`` when the data cannot support the rate (fewer than 1/fpr
    benign distances) or a class has fewer than ``k + 1`` images."""
    rng = np.random.default_rng(seed)
    scores = []
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        if len(members) <= k:
            raise ValueError(f"class {label} has {len(members)} clean images; need > {k}")
        for _ in range(draws):
            for i in members:
                others = members[members != i]
                past = rng.choice(others, size=min(history, len(others)), replace=False)
                scores.append(mean_knn_distance(embeddings[past], embeddings[i : i + 1], k)[0])
    if len(scores) * fpr < 1 or len(embeddings) * fpr < 1:
        raise ValueError(f"{len(scores)} benign distances cannot support a clean FPR of {fpr}")
    threshold = float(np.quantile(np.asarray(scores), fpr))
    nearest = [
        mean_knn_distance(np.delete(embeddings, i, axis=0), embeddings[i : i + 1], 1)[0]
        for i in range(len(embeddings))
    ]  # each clean image against all the others: how close distinct honest pictures come
    link = float(np.quantile(np.asarray(nearest), fpr))
    return KnnSpec(k, history, threshold, fpr, len(scores), link)


class Histories:
    """Each client's last embeddings per model, and every client's last ``recent`` ones
    together; bounded; not thread-safe (one owner)."""

    def __init__(self, clients: int = 1024, recent: int = 2048) -> None:
        self.clients = clients
        self._rings: OrderedDict[tuple[str, str], tuple[np.ndarray, list[int]]] = OrderedDict()
        self._recent: np.ndarray | None = None  # (recent, E) float32, every client's
        self._norms = np.zeros(recent, np.float32)
        self._owners: list[str | None] = [None] * recent
        self._owner_ids = np.zeros(recent, np.int64)  # hash of (client, model); 0: empty
        self._model_ids = np.zeros(recent, np.int64)
        self._next = 0

    def link(
        self,
        client: str,
        model: str,
        spec: KnnSpec,
        embedding: np.ndarray,
        suspect: Callable[[str], str | None] | None = None,
    ) -> str | None:
        """A young identity (fewer than ``k`` queries of its own: its own history says nothing
        yet) whose query lies within ``spec.link_threshold`` of another client's recent query on
        the same model: that client (a rotating attacker's previous identity); else, when
        ``suspect`` (client -> its campaign when throttled or worse, else None) names a campaign
        whose ``k`` recent queries nearest this one average closer than ``spec.threshold``: the
        campaign's member nearest it; else None. Every query is then remembered among the
        recent ones."""
        key = (client, model)
        owner_id, model_id = hash(key) or 1, hash(model) or 1
        vector = embedding.reshape(-1).astype(np.float32)
        if self._recent is None or self._recent.shape[1] != vector.shape[0]:
            self._recent = np.zeros((len(self._owners), vector.shape[0]), np.float32)
            self._norms = np.zeros(len(self._owners), np.float32)  # squared, per row
            self._owner_ids[:] = 0
        owner = None
        entry = self._rings.get(key)
        if spec.link_threshold is not None and (entry is None or entry[1][1] < spec.k):
            others = (self._model_ids == model_id) & (self._owner_ids != owner_id)
            others &= self._owner_ids != 0
            if others.any():  # |r - v|^2 = |r|^2 - 2 r.v + |v|^2: one matrix-vector product
                squared = self._norms - 2 * (self._recent @ vector) + vector @ vector
                squared[~others] = np.inf
                nearest = int(squared.argmin())
                if squared[nearest] < spec.link_threshold**2:
                    owner = self._owners[nearest]
                elif suspect is not None:
                    owner = self._continued(squared, int(others.sum()), spec, suspect)
        slot = self._next
        self._recent[slot], self._owners[slot] = vector, client
        self._norms[slot] = vector @ vector
        self._owner_ids[slot], self._model_ids[slot] = owner_id, model_id
        self._next = (slot + 1) % len(self._owners)
        return owner

    def _continued(
        self,
        squared: np.ndarray,
        candidates: int,
        spec: KnnSpec,
        suspect: Callable[[str], str | None],
    ) -> str | None:
        """The member of a suspect campaign nearest the query whose squared distances to the
        recent rows are ``squared`` (inf: not a candidate), when that campaign's ``k`` nearest
        rows among the ``CANDIDATES`` nearest average below ``spec.threshold``; else None."""
        count = min(CANDIDATES, candidates)
        rows = np.argpartition(squared, count - 1)[:count]
        rows = rows[np.argsort(squared[rows])]
        found: dict[str, list[int]] = {}
        roots: dict[str, str | None] = {}
        for row in rows:
            member = self._owners[row]
            if member is None:
                continue
            if member not in roots:
                roots[member] = suspect(member)
            root = roots[member]
            if root is None:
                continue
            nearest = found.setdefault(root, [])
            nearest.append(int(row))
            if len(nearest) == spec.k:
                distance = float(np.sqrt(np.maximum(squared[nearest], 0)).mean())
                if distance < spec.threshold:
                    return self._owners[nearest[0]]
        return None

    def near(self, client: str, model: str, spec: KnnSpec, embeddings: np.ndarray) -> np.ndarray:
        """(n, E) new embeddings of one request, in order -> (n,) bool: is each closer to the
        client's earlier queries than ``spec.threshold``? Each is then remembered, so the
        request's later images are compared with its earlier ones too. No verdict before the
        client has ``k`` earlier queries."""
        key = (client, model)
        entry = self._rings.get(key)
        if entry is None or entry[0].shape != (spec.history, embeddings.shape[1]):
            entry = (np.zeros((spec.history, embeddings.shape[1]), np.float32), [0, 0])
            self._rings[key] = entry
            if len(self._rings) > self.clients:
                self._rings.popitem(last=False)
        self._rings.move_to_end(key)
        ring, state = entry  # state: [next slot, how many filled]
        flags = np.zeros(len(embeddings), dtype=bool)
        for i, embedding in enumerate(embeddings):
            filled = state[1]
            if filled >= spec.k:
                if JIT:
                    query = np.ascontiguousarray(embedding, np.float32)
                    distance = FAST_NEAREST_MEAN(ring, filled, query, spec.k)
                else:
                    distance = mean_knn_distance(ring[:filled], embedding[None], spec.k)[0]
                flags[i] = distance < spec.threshold
            ring[state[0]] = embedding
            state[0] = (state[0] + 1) % spec.history
            state[1] = min(filled + 1, spec.history)
        return flags

    def forget(self, client: str) -> None:
        for key in [key for key in self._rings if key[0] == client]:
            del self._rings[key]
        for slot, owner in enumerate(self._owners):
            if owner == client:
                self._owners[slot], self._owner_ids[slot] = None, 0

    def memory_bytes(self, embedding_dims: int, history: int) -> int:
        """The most the histories can hold: ``clients`` rings and the recent ring, float32."""
        return (self.clients * history + len(self._owners)) * embedding_dims * 4
