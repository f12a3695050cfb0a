"""A bounded, expiring index of recent query fingerprints from every client (Blacklight's store).

Each remembered query occupies one slot of a ring of ``capacity`` slots (where its ``top`` hashes
sit in the table, the client, the time). An open-addressing hash table (numpy arrays, linear
probing, backward-shift deletion: Knuth, TAOCP vol. 3, algorithm 6.4R) maps each hash to the
*latest* slot holding it and the hash's place in that slot's row, so a reused slot's entries are
found without a search; ``match`` counts those slots over a new fingerprint's hashes and returns the
remembered query sharing the most. Keeping only the latest holder suits the attack it is for: an
attack's queries form a chain of small steps, so each query shares most hashes with the one
before. Memory is fixed at construction: the ring plus a table of at least 4/3 ``capacity * top``
entries (a power of two), 12 bytes each, plus 4 bytes per hash of a slot's row of places:
1.1 KB per remembered query at the default 100,000
queries and Blacklight's ``top`` of 50, plus 136 bytes for the answer a query got (the "repeat"
response; 32 floats: a classifier's logits and probabilities). When a
slot is reused its hashes leave the table; a slot older than ``ttl_s`` no longer matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.defence.fingerprint import EMPTY


@dataclass(frozen=True)
class Match:
    """The remembered query a new one is a near-duplicate of."""

    slot: int
    shared: int  # hashes in common
    client: str | None
    age_s: float
    content: int  # the remembered query's raw-content hash: equal for an exact resend
    depth: int  # 0: the remembered query was fresh; k: it ended a chain of k near-duplicates


class ProbeIndex:
    """Not thread-safe: one owner (the screening path's single writer) calls it."""

    def __init__(
        self,
        capacity: int = 100_000,
        top: int = 50,
        threshold: int = 25,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        answer_floats: int = 32,
    ) -> None:
        if capacity < 1 or not 1 <= threshold <= top or ttl_s <= 0:
            raise ValueError("need capacity >= 1, 1 <= threshold <= top, ttl_s > 0")
        self.capacity, self.top, self.threshold = capacity, top, threshold
        self.ttl_s, self._clock = ttl_s, clock
        # where each of a slot's hashes sits in the table (-1: none); kept up to date as
        # deletions shift entries, so evicting a slot needs no lookups
        self._places = np.full((capacity, top), -1, dtype=np.int32)
        self._times = np.full(capacity, -np.inf)
        self._clients: list[str | None] = [None] * capacity
        self._contents = np.zeros(capacity, dtype=np.int64)  # a hash of the raw input bytes
        # the answer each query got, for the "repeat" response: small outputs only (a
        # classifier's logits and probabilities); 0 in _answer_keys means none kept
        self._answers = np.zeros((capacity, answer_floats), dtype=np.float32)
        self._answer_keys = np.zeros(capacity, dtype=np.int64)
        self._depths = np.zeros(capacity, dtype=np.uint8)
        self._next = 0
        self._searched: tuple[list[int], list[int]] | None = None  # match()'s, for add()
        # load factor at most 3/4: linear probing stays short (Knuth: ~2.5 probes per hit)
        size = 1 << max(4, (4 * capacity * top // 3 - 1).bit_length())
        self._mask = size - 1
        # a hash's home is its middle bits: its top bits are skewed (a fingerprint keeps the
        # largest hashes) and its lowest bits see only the window's first values
        self._shift = 16
        self._keys = np.full(size, EMPTY, dtype=np.int64)
        # which slot holds each entry, and which of its row's hashes it is: slot * top + column
        self._holders = np.full(size, -1, dtype=np.int32 if capacity * top < 2**31 else np.int64)
        # the probe loops read and write single entries: a memoryview's item access is several
        # times cheaper than a numpy scalar's, and writes go to the same memory
        self._key_view, self._holder_view = memoryview(self._keys), memoryview(self._holders)
        self._place_view = memoryview(self._places.reshape(-1))

    def __len__(self) -> int:
        return int(np.isfinite(self._times).sum())

    def match(self, fingerprint: np.ndarray) -> Match | None:
        """The live remembered query sharing the most hashes (at least ``threshold``), else
        None. ``fingerprint`` is one row of ``fingerprints`` (int64, ``EMPTY``-padded).

        It also frees the slot the next ``add`` takes and keeps where each hash sits or would
        go, so an ``add`` of the same fingerprint right after needs no second search.
        """
        self._evict(self._next)
        counts: dict[int, int] = {}
        keys, holders, mask, top = self._key_view, self._holder_view, self._mask, self.top
        shift = self._shift
        values = fingerprint.tolist()
        positions = []
        for value in values:
            if value == EMPTY:
                positions.append(-1)
                continue
            position = (value >> shift) & mask
            while True:  # linear probing, inlined: this loop is the defence's hot path
                found = keys[position]
                if found == value:
                    slot = holders[position] // top
                    counts[slot] = counts.get(slot, 0) + 1
                    break
                if found == EMPTY:
                    break
                position = (position + 1) & mask
            positions.append(position)
        self._searched = (values, positions)
        if not counts or max(counts.values()) < self.threshold:
            return None
        now = self._clock()
        for slot, shared in sorted(counts.items(), key=lambda item: -item[1]):
            if shared < self.threshold:
                return None
            age = now - float(self._times[slot])
            if age <= self.ttl_s:
                content, depth = int(self._contents[slot]), int(self._depths[slot])
                return Match(slot, shared, self._clients[slot], age, content, depth)
        return None

    def keep_answer(self, slot: int, key: int, answer: np.ndarray) -> bool:
        """Keeps the answer a slot's query got (``key`` names model, version and outputs);
        False when it does not fit ``answer_floats``."""
        if answer.size > self._answers.shape[1]:
            self._answer_keys[slot] = 0
            return False
        self._answers[slot, : answer.size] = answer.ravel()
        self._answer_keys[slot] = key
        return True

    def answer(self, slot: int, key: int, size: int) -> np.ndarray | None:
        """The answer kept for a slot under ``key``, else None."""
        if key == 0 or self._answer_keys[slot] != key or size > self._answers.shape[1]:
            return None
        return self._answers[slot, :size].copy()

    def add(
        self, fingerprint: np.ndarray, client: str | None, content: int = 0, depth: int = 0
    ) -> int:
        """Remembers a query (``depth``: the chain of near-duplicates it ends, 0 when fresh);
        returns its slot. The oldest slot is reused when the ring is full, and its hashes leave
        the table unless a later query holds them."""
        slot = self._next
        self._next = (self._next + 1) % self.capacity
        values = fingerprint.tolist()
        searched, self._searched = self._searched, None
        if searched is not None and searched[0] == values:
            positions = searched[1]  # match() freed this slot and searched these hashes
        else:
            self._evict(slot)
            positions = [(v >> self._shift) & self._mask for v in values]
        self._times[slot] = self._clock()
        self._clients[slot] = client
        self._contents[slot] = content
        self._answer_keys[slot] = 0
        self._depths[slot] = min(depth, 255)
        keys, holders, places = self._key_view, self._holder_view, self._place_view
        mask, base = self._mask, slot * self.top
        for column, (value, position) in enumerate(zip(values, positions, strict=True)):
            if value == EMPTY:
                continue
            while True:  # from where the search stopped (an earlier hash may have taken it)
                found = keys[position]
                if found in (value, EMPTY):
                    previous = holders[position] if found == value else -1
                    if previous >= 0:  # the hash moves to its latest holder
                        places[previous] = -1
                    keys[position], holders[position] = value, base + column
                    places[base + column] = position
                    break
                position = (position + 1) & mask
        return slot

    def _evict(self, slot: int) -> None:
        """Takes a slot's entries out of the table (those no later query holds)."""
        if self._times[slot] == -np.inf:
            return
        holders, places = self._holder_view, self._place_view
        base = slot * self.top
        for column in range(base, base + self.top):
            position = places[column]
            if position >= 0:
                if holders[position] == column:
                    self._delete(position)
                places[column] = -1
        self._times[slot] = -np.inf

    def _delete(self, position: int) -> None:
        """Backward-shift deletion: later entries of the probe run move up, so no tombstones
        accumulate and lookups stay short; a moved entry's place is updated in its slot's row."""
        keys, holders, places, mask = (
            self._key_view,
            self._holder_view,
            self._place_view,
            self._mask,
        )
        shift = self._shift
        hole, probe = position, (position + 1) & mask
        while True:
            key = keys[probe]
            if key == EMPTY:
                break
            home = (key >> shift) & mask
            # move the entry into the hole unless its home lies cyclically in (hole, probe]
            if (probe - home) & mask >= (probe - hole) & mask:
                holder = holders[probe]
                keys[hole], holders[hole] = key, holder
                places[holder] = hole
                hole = probe
            probe = (probe + 1) & mask
        keys[hole], holders[hole] = EMPTY, -1

    def memory_bytes(self) -> int:
        """What the index holds: fixed at construction."""
        arrays = (self._places, self._times, self._keys, self._holders, self._answers)
        arrays += (self._answer_keys, self._contents, self._depths)
        return sum(a.nbytes for a in arrays) + 8 * self.capacity
