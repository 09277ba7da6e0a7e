-- audit_salts keyed by the audit row's id instead of its idempotency key.
--
-- Every ingested event with personal values adds one salts row, so this
-- table's index is maintained once per event. Keyed by (idempotency_key,
-- event_time) its primary key was a B-tree on random text, compared with
-- the database's collation, and the ingest statement had to find each new
-- row's salts by joining on that text key. audit_log's `id` comes from a
-- sequence: keyed by it, new entries land at the right edge of the index,
-- and the ingest statement numbers each input row (nextval) before the
-- INSERT, so it finds the salts of the rows it inserted by that number.
-- seal_ledger already names rows by (event_time, id).

ALTER TABLE audit_salts ADD COLUMN audit_id bigint;

UPDATE audit_salts s SET audit_id = a.id
  FROM audit_log a
 WHERE a.idempotency_key = s.idempotency_key AND a.event_time = s.event_time;

-- Salts whose row no longer exists (an unsealed row deleted before the log
-- became append-only) open nothing: drop them rather than keep them keyless.
DELETE FROM audit_salts WHERE audit_id IS NULL;

ALTER TABLE audit_salts DROP CONSTRAINT audit_salts_pkey;
ALTER TABLE audit_salts DROP COLUMN idempotency_key, DROP COLUMN event_time;
ALTER TABLE audit_salts ALTER COLUMN audit_id SET NOT NULL;
ALTER TABLE audit_salts ADD PRIMARY KEY (audit_id);
COMMENT ON COLUMN audit_salts.audit_id IS 'audit_log.id of the row these salts belong to';
