-- Client API keys: the id and the SHA-256 of the key, never the key (gateway/identity/keys.py).
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    note TEXT,
    digest BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
