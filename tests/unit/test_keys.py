"""Client API keys: shown once, stored hashed, checked in constant time, revoked at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.gateway.identity.keys import KeyRing, SQLiteKeyStore, digest, key_id


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_stored_only_as_its_hash(tmp_path: Path) -> None:
    store = SQLiteKeyStore(tmp_path / "keys.db")
    record, key = store.create("orders-service", note="team A")
    store.close()
    assert key.startswith(f"bst_{record.id}_") and len(key) == 4 + 12 + 1 + 43
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    secret = key[len(f"bst_{record.id}_") :]  # the secret itself may hold "_"
    assert secret.encode() not in raw and key.encode() not in raw
    assert digest(key) in raw  # what is kept instead


def test_the_ring_maps_a_valid_key_to_its_client_and_nothing_else_to_anyone() -> None:
    store = SQLiteKeyStore(":memory:")
    ring = KeyRing(store)
    assert not ring.enabled  # no key configured: the embedded default stays open
    _, key = ring.create("orders-service")
    assert ring.enabled
    assert ring.client_of(key) == "orders-service"
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")  # right id, wrong secret
    assert ring.client_of(forged) is None
    assert ring.client_of("bst_000000000000_" + "x" * 43) is None  # unknown id
    assert ring.client_of("Bearer " + key) is None and ring.client_of("") is None
    assert key_id(key) is not None and key_id(key + "x") is None


def test_revocation_is_immediate_here_and_within_the_refresh_elsewhere() -> None:
    store = SQLiteKeyStore(":memory:")
    clock = Clock()
    here, elsewhere = KeyRing(store, 1.0, clock), KeyRing(store, 1.0, clock)
    record, key = here.create("mallory")
    clock.now = 1.0
    assert elsewhere.client_of(key) == "mallory"
    here.revoke(record.id)
    assert here.client_of(key) is None  # at once in the process that revoked it
    assert elsewhere.client_of(key) == "mallory"  # another gateway: until it re-reads
    clock.now = 2.0
    assert elsewhere.client_of(key) is None
    assert here.revoke(record.id).revoked_at is not None  # again: no change, no error
    assert here.enabled  # every key revoked: still locked, not open (deny by default)
    with pytest.raises(KeyError):
        here.revoke("0" * 12)


@pytest.mark.parametrize("client", ["", "has space", "x" * 129, "semi;colon"])
def test_client_names_follow_the_client_id_charset(client: str) -> None:
    with pytest.raises(ValueError, match="client"):
        SQLiteKeyStore(":memory:").create(client)
