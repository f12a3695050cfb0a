"""Stateful defence against query-based attacks: fingerprints, the probe index, containment."""
