-- The drift statistics of each served image (gateway/incidents/ledger.py), the window that
-- `bastion drift report` reads: NULL in rows written before them.
ALTER TABLE served ADD COLUMN margin DOUBLE PRECISION;
ALTER TABLE served ADD COLUMN pixel_mean DOUBLE PRECISION;
ALTER TABLE served ADD COLUMN pixel_std DOUBLE PRECISION;
ALTER TABLE served ADD COLUMN embedding BYTEA;
