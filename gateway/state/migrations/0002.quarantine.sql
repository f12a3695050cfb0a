-- The quarantine store shared by replicas (gateway/quarantine/postgres.py): the SQLite file's
-- columns and indexes (gateway/quarantine/schema.py). scores and thresholds are JSON text, not
-- jsonb: a score may be Infinity, which JSON lacks. seq orders the records of one request and
-- ties of created_at; ids are uuid4 hex, unique across replicas (and checked so).
CREATE TABLE quarantine (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    client_id TEXT,
    request_id TEXT,
    image_index BIGINT NOT NULL,
    scores TEXT NOT NULL,
    thresholds TEXT NOT NULL,
    verdict TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('quarantined', 'released', 'review')),
    released_at DOUBLE PRECISION,
    note TEXT,
    input_bytes BIGINT NOT NULL,
    input BYTEA NOT NULL
);
CREATE INDEX quarantine_model_created ON quarantine (model, created_at);
CREATE INDEX quarantine_status_created ON quarantine (status, created_at);
CREATE INDEX quarantine_created ON quarantine (created_at);
CREATE INDEX quarantine_client_status ON quarantine (client_id, status);
CREATE INDEX quarantine_status_bytes ON quarantine (status, input_bytes);
-- The totals the quotas are checked against: one row, kept by statement triggers. Every write
-- locks it first (SELECT ... FOR UPDATE), so writers on every replica take turns and none can
-- overshoot a quota. refused: a record was dropped for a global quota since the last deletion
-- (the over-quota alarm every replica reports).
CREATE TABLE quarantine_totals (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    records BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    refused BOOLEAN NOT NULL DEFAULT FALSE
);
INSERT INTO quarantine_totals (records, bytes) VALUES (0, 0);
CREATE FUNCTION quarantine_totals_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE quarantine_totals
        SET records = records + n, bytes = bytes + b
        FROM (SELECT COUNT(*) AS n, COALESCE(SUM(input_bytes), 0) AS b FROM added) AS batch
        WHERE n > 0;
    RETURN NULL;
END
$$;
CREATE FUNCTION quarantine_totals_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE quarantine_totals
        SET records = records - n, bytes = bytes - b, refused = FALSE
        FROM (SELECT COUNT(*) AS n, COALESCE(SUM(input_bytes), 0) AS b FROM removed) AS batch
        WHERE n > 0;
    RETURN NULL;
END
$$;
CREATE FUNCTION quarantine_totals_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE quarantine_totals SET records = 0, bytes = 0, refused = FALSE;
    RETURN NULL;
END
$$;
CREATE TRIGGER quarantine_totals_insert AFTER INSERT ON quarantine
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION quarantine_totals_insert();
CREATE TRIGGER quarantine_totals_delete AFTER DELETE ON quarantine
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION quarantine_totals_delete();
CREATE TRIGGER quarantine_totals_truncate AFTER TRUNCATE ON quarantine
    FOR EACH STATEMENT EXECUTE FUNCTION quarantine_totals_truncate();
