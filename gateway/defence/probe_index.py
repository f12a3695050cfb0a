"""A bounded, expiring index of recent query fingerprints from every client (Blacklight's store).

The hash-table loops live in ``probe_table`` (compiled by numba when it is installed).

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
queries and Blacklight's ``top`` of 50, plus 137 bytes for the answer a query got (the "repeat"
response; 32 floats: a classifier's logits and probabilities; or that it was refused) and about
100 for the map from a picture's content hash to its slot (resends). When a
slot is reused its hashes leave the table; a slot older than ``ttl_s`` no longer matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.gateway.defence import probe_table
from bastion.gateway.defence.fingerprint import EMPTY


@dataclass(frozen=True)
class Match:
    """The remembered query a new one is a near-duplicate of."""

    slot: int
    shared: int  # hashes in common
    client: str | None
    age_s: float
    content: int  # the remembered query's raw-content hash: equal for an exact resend
    links: int  # near-duplicate links the remembered query has already: 0 for a lone picture


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
        compiled: bool | None = None,
    ) -> None:
        """``compiled``: run the table loops compiled (numba); None: when numba is installed."""
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
        self._refused = np.zeros(capacity, dtype=bool)  # the query got no answer at all
        self._links = np.zeros(capacity, dtype=np.uint8)
        # the latest live slot of each picture (its content hash): a resend is found even when
        # the fingerprint table credits its hashes to a similar picture sent since
        self._by_content: dict[int, int] = {}
        self._next = 0
        # match()'s search (the row, its hashes, where each is or would go), for add()
        self._searched: tuple[Any, Any] | None = None
        # load factor at most 3/4: linear probing stays short (Knuth: ~2.5 probes per hit)
        size = 1 << max(4, (4 * capacity * top // 3 - 1).bit_length())
        self._mask = size - 1
        # a hash's home is its middle bits: its top bits are skewed (a fingerprint keeps the
        # largest hashes) and its lowest bits see only the window's first values
        self._shift = 16
        self._keys = np.full(size, EMPTY, dtype=np.int64)
        # which slot holds each entry, and which of its row's hashes it is: slot * top + column
        self._holders = np.full(size, -1, dtype=np.int32 if capacity * top < 2**31 else np.int64)
        self.compiled = probe_table.JIT if compiled is None else compiled
        if self.compiled and not probe_table.JIT:
            raise ValueError("compiled table loops need numba: pip install 'bastion-gateway[fast]'")
        self._ops = probe_table.FAST if self.compiled else probe_table.PLAIN
        arrays = (self._keys, self._holders, self._places.reshape(-1), self._times)
        if self.compiled:  # numba takes the arrays themselves
            self._table = arrays
        else:  # plain Python: a memoryview's item access is several times a numpy scalar's
            self._table = tuple(memoryview(a) for a in arrays)

    def __len__(self) -> int:
        return int(np.isfinite(self._times).sum())

    def match(self, fingerprint: np.ndarray) -> Match | None:
        """The live remembered query sharing the most hashes (at least ``threshold``), else
        None. ``fingerprint`` is one row of ``fingerprints`` (int64, ``EMPTY``-padded).

        It also frees the slot the next ``add`` takes and keeps where each hash sits or would
        go, so an ``add`` of the same fingerprint right after needs no second search.
        """
        self._evict(self._next)
        keys, holders, _, times = self._table
        values = fingerprint if self.compiled else fingerprint.tolist()
        positions = np.empty(len(values), np.int64) if self.compiled else [0] * len(values)
        now, search = self._clock(), self._ops["search"]
        slot, shared = search(keys, holders, times, values, positions, self._shift, self._mask,
                              self.top, EMPTY, now, self.ttl_s)  # fmt: skip
        self._searched = (fingerprint, values, positions)
        if shared < self.threshold:
            return None
        age = now - float(self._times[slot])
        content, links = int(self._contents[slot]), int(self._links[slot])
        return Match(slot, shared, self._clients[slot], age, content, links)

    def resent(self, content: int) -> int | None:
        """The live slot of an earlier query with the same picture (``content``), else None."""
        slot = self._by_content.get(content)
        if slot is None or self._clock() - float(self._times[slot]) > self.ttl_s:
            return None
        return slot

    def client(self, slot: int) -> str | None:
        """Who sent the query remembered at ``slot``."""
        return self._clients[slot]

    def link(self, slot: int) -> None:
        """Counts one more near-duplicate of a remembered query (it is now part of a cluster)."""
        self._links[slot] = min(int(self._links[slot]) + 1, 255)

    def keep_answer(self, slot: int, key: int, answer: np.ndarray) -> bool:
        """Keeps the answer a slot's query got (``key`` names model, version and outputs);
        False when it does not fit ``answer_floats``."""
        self._refused[slot] = False
        if answer.size > self._answers.shape[1]:
            self._answer_keys[slot] = 0
            return False
        self._answers[slot, : answer.size] = answer.ravel()
        self._answer_keys[slot] = key
        return True

    def keep_served(self, slot: int, key: int, content: int, answer: np.ndarray) -> None:
        """``keep_answer`` for a query answered after it was remembered (a remote upstream's
        answer): kept only while the slot still holds that query (raw-content hash
        ``content``) and it was not refused since."""
        if self._contents[slot] != content or self._times[slot] == -np.inf:
            return
        if self.refused(slot, key):
            return
        self.keep_answer(slot, key, answer)

    def keep_refusal(self, slot: int, key: int, content: int) -> None:
        """The slot's query (raw-content hash ``content``; a slot reused since holds another)
        was refused (withheld, throttled or contained): what a repeat of it gets is a refusal
        too, never the answer it was denied."""
        if self._contents[slot] != content or self._times[slot] == -np.inf:
            return
        self._answer_keys[slot] = key
        self._refused[slot] = True

    def refused(self, slot: int, key: int) -> bool:
        """Whether the slot's query was refused under ``key``."""
        return key != 0 and self._answer_keys[slot] == key and bool(self._refused[slot])

    def answer(self, slot: int, key: int, size: int) -> np.ndarray | None:
        """The answer kept for a slot under ``key``, else None (none kept, or refused)."""
        if key == 0 or self._answer_keys[slot] != key or size > self._answers.shape[1]:
            return None
        if self._refused[slot]:
            return None
        return self._answers[slot, :size].copy()

    def add(
        self, fingerprint: np.ndarray, client: str | None, content: int = 0, links: int = 0
    ) -> int:
        """Remembers a query (``links``: 1 when it nearly duplicates a remembered one, else 0);
        returns its slot. The oldest slot is reused when the ring is full, and its hashes leave
        the table unless a later query holds them."""
        searched, self._searched = self._searched, None
        if searched is None or searched[0] is not fingerprint:
            self.match(fingerprint)  # frees the slot and searches the hashes
            searched, self._searched = self._searched, None
        assert searched is not None
        _, values, positions = searched
        slot = self._next
        self._next = (self._next + 1) % self.capacity
        self._times[slot] = self._clock()
        self._clients[slot] = client
        self._contents[slot] = content
        self._by_content[content] = slot
        self._answer_keys[slot] = 0
        self._refused[slot] = False
        self._links[slot] = min(links, 255)
        keys, holders, places, _ = self._table
        self._ops["insert"](keys, holders, places, values, positions, slot * self.top,
                            self._mask, EMPTY)  # fmt: skip
        return slot

    def _evict(self, slot: int) -> None:
        """Takes a slot's entries out of the table (those no later query holds)."""
        if self._times[slot] == -np.inf:
            return
        content = int(self._contents[slot])
        if self._by_content.get(content) == slot:
            del self._by_content[content]
        keys, holders, places, _ = self._table
        self._ops["evict"](keys, holders, places, slot * self.top, self.top, self._shift,
                           self._mask, EMPTY)  # fmt: skip
        self._times[slot] = -np.inf

    def memory_bytes(self) -> int:
        """What the index holds: fixed at construction."""
        arrays = (self._places, self._times, self._keys, self._holders, self._answers)
        arrays += (self._answer_keys, self._contents, self._links, self._refused)
        # the content map: at most one entry per slot (a dict entry and two ints, ~100 bytes)
        return sum(a.nbytes for a in arrays) + 8 * self.capacity + 100 * self.capacity
