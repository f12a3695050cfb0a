"""PostgreSQL, where replicas keep the state they share: connections and schema migrations.

The schema is a directory of numbered SQL migrations (``migrations/``) applied by yoyo
(``yoyo-migrations``), which records what it applied in the database and takes a lock while it
applies, so replicas starting together migrate once. Every store opens its connection through
``connect``: autocommit (each statement its own transaction unless a store opens one), and a
short connect timeout, so a gateway whose database is down says so instead of hanging.

Needs the ``postgres`` extra: ``pip install 'bastion-gateway[postgres]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
CONNECT_TIMEOUT_S = 5


def connect(url: str) -> Any:
    """An autocommit ``psycopg.Connection`` to ``url`` (``postgresql://`` or ``postgres://``).
    Raises ``psycopg.OperationalError`` when the server cannot be reached in time."""
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


def migrate(url: str) -> list[str]:
    """Applies the migrations this database lacks, under yoyo's lock; returns their ids."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(yoyo_url(url))
    try:
        migrations = read_migrations(str(MIGRATIONS))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def yoyo_url(url: str) -> str:
    """The same database for yoyo, through psycopg 3 (``postgresql+psycopg://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("a PostgreSQL URL starts with postgresql:// or postgres://")
    return f"postgresql+psycopg://{rest}"
