"""A bounded, expiring index of recent query fingerprints from every client (Blacklight's store).

Each remembered query occupies one slot of a ring of ``capacity`` slots (its ``top`` hashes in a
numpy row, the client, the time). An open-addressing hash table (numpy arrays, linear probing,
backward-shift deletion: Knuth, TAOCP vol. 3, algorithm 6.4R) maps each hash to the *latest*
slot holding it; ``match`` counts those slots over a new fingerprint's hashes and returns the
remembered query sharing the most. Keeping only the latest holder suits the attack it is for: an
attack's queries form a chain of small steps, so each query shares most hashes with the one
before. Memory is fixed at construction: the ring plus a table of at least 4/3 ``capacity * top``
entries (a power of two), 16 bytes each: 1.7 KB per remembered query at the default 100,000
queries and Blacklight's ``top`` of 50, plus 136 bytes for the answer a query got (the "repeat"
response; 32 floats: a classifier's logits and probabilities). When a
slot is reused its hashes leave the table; a slot older than ``ttl_s`` no longer matches.
"""

from __future__ import annotations

import time
from collections import Counter
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
        self._hashes = np.full((capacity, top), EMPTY, dtype=np.int64)
        self._times = np.full(capacity, -np.inf)
        self._clients: list[str | None] = [None] * capacity
        self._contents = np.zeros(capacity, dtype=np.int64)  # a hash of the raw input bytes
        # the answer each query got, for the "repeat" response: small outputs only (a
        # classifier's logits and probabilities); 0 in _answer_keys means none kept
        self._answers = np.zeros((capacity, answer_floats), dtype=np.float32)
        self._answer_keys = np.zeros(capacity, dtype=np.int64)
        self._next = 0
        # load factor at most 3/4: linear probing stays short (Knuth: ~2.5 probes per hit)
        size = 1 << max(4, (4 * capacity * top // 3 - 1).bit_length())
        self._mask = size - 1
        self._keys = np.full(size, EMPTY, dtype=np.int64)
        self._slots = np.full(size, -1, dtype=np.int64)

    def __len__(self) -> int:
        return int(np.isfinite(self._times).sum())

    def match(self, fingerprint: np.ndarray) -> Match | None:
        """The live remembered query sharing the most hashes (at least ``threshold``), else
        None. ``fingerprint`` is one row of ``fingerprints`` (int64, ``EMPTY``-padded)."""
        now = self._clock()
        counts: Counter[int] = Counter()
        for value in fingerprint.tolist():
            if value != EMPTY:
                position = self._find(value)
                if position >= 0:
                    counts[int(self._slots[position])] += 1
        for slot, shared in counts.most_common():
            if shared < self.threshold:
                return None
            age = now - float(self._times[slot])
            if age <= self.ttl_s:
                return Match(slot, shared, self._clients[slot], age, int(self._contents[slot]))
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

    def add(self, fingerprint: np.ndarray, client: str | None, content: int = 0) -> int:
        """Remembers a query; returns its slot (the oldest slot is reused when the ring is full,
        and its hashes leave the table unless a later query holds them)."""
        slot = self._next
        self._next = (self._next + 1) % self.capacity
        for value in self._hashes[slot].tolist():
            if value != EMPTY:
                position = self._find(value)
                if position >= 0 and self._slots[position] == slot:
                    self._delete(position)
        self._hashes[slot] = fingerprint
        self._times[slot] = self._clock()
        self._clients[slot] = client
        self._contents[slot] = content
        self._answer_keys[slot] = 0
        for value in fingerprint.tolist():
            if value != EMPTY:
                self._insert(value, slot)
        return slot

    def remembered(self, slot: int) -> np.ndarray:
        """The fingerprint a slot holds (a view: do not write to it)."""
        return self._hashes[slot]

    def _find(self, key: int) -> int:
        position = key & self._mask
        while True:
            found = int(self._keys[position])
            if found == key:
                return position
            if found == EMPTY:
                return -1
            position = (position + 1) & self._mask

    def _insert(self, key: int, slot: int) -> None:
        position = key & self._mask
        while True:
            found = int(self._keys[position])
            if found in (key, EMPTY):
                self._keys[position], self._slots[position] = key, slot
                return
            position = (position + 1) & self._mask

    def _delete(self, position: int) -> None:
        """Backward-shift deletion: later entries of the probe run move up, so no tombstones
        accumulate and lookups stay short."""
        mask = self._mask
        hole, probe = position, (position + 1) & mask
        while True:
            key = int(self._keys[probe])
            if key == EMPTY:
                break
            home = key & mask
            # move the entry into the hole unless its home lies cyclically in (hole, probe]
            if (probe - home) & mask >= (probe - hole) & mask:
                self._keys[hole], self._slots[hole] = key, self._slots[probe]
                hole = probe
            probe = (probe + 1) & mask
        self._keys[hole], self._slots[hole] = EMPTY, -1

    def memory_bytes(self) -> int:
        """What the index holds: fixed at construction."""
        arrays = (self._hashes, self._times, self._keys, self._slots, self._answers)
        arrays += (self._answer_keys, self._contents)
        return sum(a.nbytes for a in arrays) + 8 * self.capacity
