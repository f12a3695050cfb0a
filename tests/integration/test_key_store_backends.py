"""The key store's contract on both backends: SQLite (embedded) and a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from yoyo import read_migrations

from bastion.gateway.identity.keys import (
    KeyRing,
    KeyStore,
    PostgresKeyStore,
    SQLiteKeyStore,
    digest,
    open_key_store,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None: the SQLite file under tmp_path; else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_db")


def opened(url: str | None, tmp_path: Path) -> KeyStore:
    return open_key_store(url, tmp_path / "keys.db")


def test_both_backends_keep_the_same_records(url: str | None, tmp_path: Path) -> None:
    store = opened(url, tmp_path)
    assert isinstance(store, PostgresKeyStore if url else SQLiteKeyStore)
    assert store.active_digests() == ({}, False)
    first, key = store.create("orders", note="team A")
    second, _ = store.create("billing")
    assert [r.client for r in store.list()] == ["orders", "billing"]
    active, configured = store.active_digests()
    assert configured and active[first.id] == (digest(key), "orders")
    revoked = store.revoke(first.id)
    assert revoked.revoked_at is not None and store.revoke(first.id) == revoked  # idempotent
    assert set(store.active_digests()[0]) == {second.id}
    with pytest.raises(KeyError):
        store.revoke("0" * 12)
    with pytest.raises(ValueError, match="client"):
        store.create("has space")
    store.close()


def test_postgres_keeps_only_the_hash_of_a_key(postgres_db: str, tmp_path: Path) -> None:
    import psycopg

    store = PostgresKeyStore(postgres_db)
    record, key = store.create("orders")
    store.close()
    with psycopg.connect(postgres_db) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
    text = repr(rows).encode()
    secret = key[len(f"bst_{record.id}_") :]
    assert secret.encode() not in text and key.encode() not in text
    assert bytes(rows[0][3]) == digest(key)


def test_a_key_revoked_through_one_replica_stops_working_on_another(postgres_db: str) -> None:
    """Two gateways on one database: the revocation reaches the other within its refresh."""
    here = KeyRing(PostgresKeyStore(postgres_db), refresh_s=0.05, background=True)
    there = KeyRing(PostgresKeyStore(postgres_db), refresh_s=0.05, background=True)
    try:
        record, key = here.create("mallory")
        assert _eventually(lambda: there.client_of(key) == "mallory")
        here.revoke(record.id)
        assert here.client_of(key) is None
        assert _eventually(lambda: there.client_of(key) is None)
        assert there.enabled  # every key revoked: still locked (deny by default)
    finally:
        here.close()
        there.close()


def test_two_replicas_migrating_at_once_make_one_schema(postgres_db: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bastion.gateway.state import postgres

    with ThreadPoolExecutor(2) as pool:
        applied = list(pool.map(postgres.migrate, [postgres_db, postgres_db]))
    every = len(read_migrations(str(postgres.MIGRATIONS)))
    assert sorted(len(ids) for ids in applied) == [0, every]  # one applied them, the other none
    assert postgres.migrate(postgres_db) == []


def test_the_ring_keeps_its_keys_while_the_database_is_away(postgres_db: str) -> None:
    store = PostgresKeyStore(postgres_db)
    ring = KeyRing(store, refresh_s=0.05, background=True)
    _, key = ring.create("orders")
    store._url = "postgresql://bastion@127.0.0.1:1/nowhere"  # where no server listens
    store._conn.close()  # as when the server goes away: every re-read now fails
    try:
        assert not _eventually(lambda: ring.client_of(key) is None, seconds=0.5)
        assert ring.client_of(key) == "orders"  # the last keys read stay in force
    finally:
        ring._stop.set()


def _eventually(check: object, seconds: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False
