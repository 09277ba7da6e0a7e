-- seal_ledger keeps only the indexes its readers use.
--
-- Sealing appends one ledger row per event, so every index and constraint
-- on the ledger is paid once per sealed event. Measured on 1,000,000
-- entries, two of them cost more than the rest of the write together:
-- * seal_ledger_key, a B-tree on random text compared with the database's
--   collation, cost about three times the insert itself. Looking an event
--   up by its key goes through audit_log's own (idempotency_key,
--   event_time) index and then the ledger's (event_time, row_id) index.
-- * the deferred foreign key to snapshots queued one check per entry for
--   COMMIT. The sealing transaction writes the entries and their snapshot
--   row together, and `verify` walks the ledger by the snapshots' leaf
--   ranges and reports any entry beyond the last signed checkpoint.
-- seal_ledger_snapshot (snapshot_id) served only that foreign key.
DROP INDEX IF EXISTS seal_ledger_key;
DROP INDEX IF EXISTS seal_ledger_snapshot;
ALTER TABLE seal_ledger DROP CONSTRAINT IF EXISTS seal_ledger_snapshot_id_fkey;
