"""The SQLite schema of the quarantine store, as numbered migration steps."""

from __future__ import annotations

_COLUMNS_V2 = (
    "seq, id, created_at, model, version, client_id, request_id, image_index, scores, "
    "thresholds, verdict, status, released_at, note, input_bytes, input"
)
_COLUMNS_V1 = (
    "seq, id, created_at, model, version, client_id, request_id, image_index, scores, "
    "thresholds, verdict, status, released_at, note"
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # ``input`` is the last column: SQLite decodes a row left to right, so listing without
        # the input never walks the blob's overflow pages.
        """CREATE TABLE quarantine (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            client_id TEXT,
            request_id TEXT,
            image_index INTEGER NOT NULL,
            scores TEXT NOT NULL,
            thresholds TEXT NOT NULL,
            verdict TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('quarantined', 'released')),
            released_at REAL,
            note TEXT,
            input BLOB NOT NULL
        )""",
        "CREATE INDEX quarantine_model_created ON quarantine (model, created_at)",
        "CREATE INDEX quarantine_status_created ON quarantine (status, created_at)",
        "CREATE INDEX quarantine_created ON quarantine (created_at)",
    ),
    (
        # Quotas. The table is rebuilt (SQLite's documented way to change a table) so that
        # ``input_bytes`` sits before the blob: summing it must not walk the overflow pages.
        # Totals live in a one-row table kept by triggers, so the quota check inside the insert
        # transaction reads two integers instead of scanning, and stays exact when several
        # processes share the file. Per-client counts use the client index (bounded by the
        # per-client quota).
        """CREATE TABLE quarantine_v2 (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            client_id TEXT,
            request_id TEXT,
            image_index INTEGER NOT NULL,
            scores TEXT NOT NULL,
            thresholds TEXT NOT NULL,
            verdict TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('quarantined', 'released')),
            released_at REAL,
            note TEXT,
            input_bytes INTEGER NOT NULL,
            input BLOB NOT NULL
        )""",
        f"INSERT INTO quarantine_v2 ({_COLUMNS_V1}, input_bytes, input)"
        f" SELECT {_COLUMNS_V1}, length(input), input FROM quarantine",
        "DROP TABLE quarantine",
        "ALTER TABLE quarantine_v2 RENAME TO quarantine",
        "CREATE INDEX quarantine_model_created ON quarantine (model, created_at)",
        "CREATE INDEX quarantine_status_created ON quarantine (status, created_at)",
        "CREATE INDEX quarantine_created ON quarantine (created_at)",
        "CREATE INDEX quarantine_client ON quarantine (client_id)",
        """CREATE TABLE quarantine_totals (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            records INTEGER NOT NULL,
            bytes INTEGER NOT NULL
        )""",
        "INSERT INTO quarantine_totals SELECT 1, COUNT(*), COALESCE(SUM(input_bytes), 0)"
        " FROM quarantine",
        """CREATE TRIGGER quarantine_totals_insert AFTER INSERT ON quarantine BEGIN
            UPDATE quarantine_totals SET records = records + 1, bytes = bytes + NEW.input_bytes;
        END""",
        """CREATE TRIGGER quarantine_totals_delete AFTER DELETE ON quarantine BEGIN
            UPDATE quarantine_totals SET records = records - 1, bytes = bytes - OLD.input_bytes;
        END""",
    ),
    (
        # Review records (served suspicious inputs, kept as evidence): a third status. SQLite
        # cannot alter a CHECK constraint, so the table is rebuilt again; dropping the old
        # table drops its triggers, which are recreated on the new one.
        """CREATE TABLE quarantine_v3 (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            client_id TEXT,
            request_id TEXT,
            image_index INTEGER NOT NULL,
            scores TEXT NOT NULL,
            thresholds TEXT NOT NULL,
            verdict TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('quarantined', 'released', 'review')),
            released_at REAL,
            note TEXT,
            input_bytes INTEGER NOT NULL,
            input BLOB NOT NULL
        )""",
        f"INSERT INTO quarantine_v3 ({_COLUMNS_V2}) SELECT {_COLUMNS_V2} FROM quarantine",
        "DROP TABLE quarantine",
        "ALTER TABLE quarantine_v3 RENAME TO quarantine",
        "CREATE INDEX quarantine_model_created ON quarantine (model, created_at)",
        "CREATE INDEX quarantine_status_created ON quarantine (status, created_at)",
        "CREATE INDEX quarantine_created ON quarantine (created_at)",
        # per-client quotas count review copies and withheld records apart (a client's honest
        # traffic must not use up the room its attacks' evidence needs): one covering index
        "CREATE INDEX quarantine_client_status ON quarantine (client_id, status)",
        # the review writer's share check sums review bytes from the index alone
        "CREATE INDEX quarantine_status_bytes ON quarantine (status, input_bytes)",
        """CREATE TRIGGER quarantine_totals_insert AFTER INSERT ON quarantine BEGIN
            UPDATE quarantine_totals SET records = records + 1, bytes = bytes + NEW.input_bytes;
        END""",
        """CREATE TRIGGER quarantine_totals_delete AFTER DELETE ON quarantine BEGIN
            UPDATE quarantine_totals SET records = records - 1, bytes = bytes - OLD.input_bytes;
        END""",
    ),
)
"""Schema steps; ``PRAGMA user_version`` counts how many have been applied. Append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)
