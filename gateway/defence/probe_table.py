"""The probe index's hash-table loops: linear probing with backward-shift deletion.

The table is three flat arrays: ``keys`` (int64 hashes, ``empty`` where free), ``holders``
(``slot * top + column``: which remembered query holds the hash, and which of its hashes it is)
and ``places`` (per remembered query and column, where that hash sits in the table, -1 when it
sits nowhere): a deletion that shifts an entry updates its place, so evicting a query needs no
search. Knuth, TAOCP vol. 3, §6.4, algorithm R (deletion with linear probing).

Each loop touches one entry at a time, which Python does slowly (about 1 µs an entry). With
numba installed (``pip install 'bastion-gateway[fast]'``) the same functions are compiled to
machine code (``JIT``); without it they run as written, on memoryviews (several times cheaper
per item than numpy scalars). The test suite runs both on the same operations and compares
the tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.gateway.defence.jit import JIT, compiled


def search(keys: Any, holders: Any, times: Any, values: Any, positions: Any, shift: int,
           mask: int, top: int, empty: int, now: float, ttl: float) -> tuple[int, int]:  # fmt: skip
    """For each hash of ``values`` (one fingerprint, ``empty``-padded): where it sits, or the
    free cell its search ended at (``positions``; -1 for padding). Returns the live remembered
    query (``now - times[slot] <= ttl``) holding the most of them, and how many: (-1, 0) for
    none."""
    held = np.empty(len(values), np.int64)
    count = 0
    for i in range(len(values)):
        value = values[i]
        if value == empty:
            positions[i] = -1
            continue
        position = (value >> shift) & mask
        while True:
            key = keys[position]
            if key == value:
                slot = holders[position] // top
                if now - times[slot] <= ttl:
                    held[count] = slot
                    count += 1
                break
            if key == empty:
                break
            position = (position + 1) & mask
        positions[i] = position
    if count == 0:
        return -1, 0
    ordered = np.sort(held[:count])
    best, most, run = -1, 0, 1
    for i in range(1, count + 1):
        if i < count and ordered[i] == ordered[i - 1]:
            run += 1
            continue
        if run > most:
            best, most = int(ordered[i - 1]), run
        run = 1
    return best, most


def insert(keys: Any, holders: Any, places: Any, values: Any, positions: Any, base: int,
           mask: int, empty: int) -> None:  # fmt: skip
    """Makes ``base + i`` (``slot * top + column``) the holder of hash ``values[i]``, starting
    from the cell its search ended at (a free cell another of the same query's hashes may have
    taken since: then probing on). A hash already held moves to its latest holder."""
    for i in range(len(values)):
        value, position, holder = values[i], positions[i], base + i
        if value == empty:
            continue
        while True:
            key = keys[position]
            if key == value:
                previous = holders[position]
                if previous >= 0:
                    places[previous] = -1
                break
            if key == empty:
                break
            position = (position + 1) & mask
        keys[position] = value
        holders[position] = holder
        places[holder] = position


def evict(keys: Any, holders: Any, places: Any, base: int, top: int, shift: int, mask: int,
          empty: int) -> None:  # fmt: skip
    """Takes out of the table the entries of ``places[base : base + top]`` (one remembered
    query) that no later query holds, by backward-shift deletion: later entries of the probe
    run move into the hole unless their home lies cyclically in (hole, probe], so no
    tombstones accumulate and a moved entry's place follows it."""
    for column in range(base, base + top):
        position = places[column]
        if position < 0:
            continue
        places[column] = -1
        if holders[position] != column:
            continue  # a later query holds this hash now
        hole = position
        probe = (position + 1) & mask
        while True:
            key = keys[probe]
            if key == empty:
                break
            home = (key >> shift) & mask
            if ((probe - home) & mask) >= ((probe - hole) & mask):
                holder = holders[probe]
                keys[hole] = key
                holders[hole] = holder
                places[holder] = hole
                hole = probe
            probe = (probe + 1) & mask
        keys[hole] = empty
        holders[hole] = -1


__all__ = ["FAST", "JIT", "PLAIN"]
PLAIN = {"search": search, "insert": insert, "evict": evict}
FAST = {name: compiled(function) for name, function in PLAIN.items()}


def warm_up() -> None:
    """Compiles (or loads from the disk cache) the loops for the index's array types, so the
    first query does not wait for numba; a no-op without it."""
    if not JIT:
        return
    empty = np.iinfo(np.int64).min
    keys = np.full(16, empty, np.int64)
    places = np.full(4, -1, np.int32)
    values, positions = np.array([1, 2, empty], np.int64), np.zeros(3, np.int64)
    for holders in (np.full(16, -1, np.int32), np.full(16, -1, np.int64)):
        times = np.zeros(2)
        FAST["search"](keys, holders, times, values, positions, 0, 15, 2, empty, 0.0, 1.0)
        FAST["insert"](keys, holders, places, values, positions, 0, 15, empty)
        FAST["evict"](keys, holders, places, 0, 2, 0, 15, empty)
