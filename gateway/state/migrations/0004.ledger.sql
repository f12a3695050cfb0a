-- The served-prediction ledger shared by replicas (gateway/incidents/ledger.py): one row per
-- screened image, the same columns as the SQLite file's; ids in insertion order.
CREATE TABLE served (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time DOUBLE PRECISION NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    request_id TEXT,
    outcome TEXT NOT NULL,
    input_hash BIGINT NOT NULL,
    sketch BYTEA NOT NULL,
    predicted BIGINT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    tier TEXT NOT NULL
);
CREATE INDEX served_client ON served (client, time);
