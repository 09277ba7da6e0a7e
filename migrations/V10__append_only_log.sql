-- Append-only audit_log, and sealing that writes only the ledger (leaf v2).
--
-- Until now sealing UPDATEd each row (snapshot_id, leaf_index) and only
-- sealed rows were protected. From here on:
-- * audit_log refuses UPDATE and DELETE of every row, sealed or not, for
--   every role (and TRUNCATE, as before). Retention may still DROP a whole
--   partition (no trigger fires on DROP TABLE; see README, Retention).
-- * sealing appends (leaf_index, event reference, record digest, leaf
--   version) to seal_ledger and never touches audit_log: "sealed" means
--   "has a ledger entry".
-- * each ledger entry and each snapshot records its leaf version: 1 (the
--   event's hash v1, rows sealed before this migration, which keep their
--   snapshot_id / leaf_index and keep verifying) or 2 (the record digest).

CREATE OR REPLACE FUNCTION audit_log_refuse_sealed_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % of the event at (event_time %, id %) is refused',
        TG_OP, OLD.event_time, OLD.id
        USING ERRCODE = 'integrity_constraint_violation',
              HINT = 'audit events are never changed or removed; record a correcting event instead';
END
$$;

ALTER TABLE seal_ledger ADD COLUMN leaf_version smallint NOT NULL DEFAULT 1
    CHECK (leaf_version IN (1, 2));
COMMENT ON COLUMN seal_ledger.leaf IS
    'Merkle leaf data (32 bytes): the hash v1 (leaf_version 1) or the record digest (leaf_version 2)';
-- Late events: an event whose time lies in a range an earlier snapshot
-- already sealed is appended by the next snapshot; its entry records when
-- it arrived (its ingested_at), so `verify` lists it as late.
ALTER TABLE seal_ledger ADD COLUMN late_arrival timestamptz;
ALTER TABLE snapshots ADD COLUMN leaf_version smallint NOT NULL DEFAULT 1
    CHECK (leaf_version IN (1, 2));

-- Finding the unsealed rows (no ledger entry yet) and a row's entry.
CREATE INDEX seal_ledger_event ON seal_ledger (event_time, row_id);
-- `prove <eventId>` looks the event up in the ledger.
CREATE INDEX seal_ledger_key ON seal_ledger (idempotency_key);

-- Rows are no longer marked when sealed, so this index would hold every
-- row and cost every insert.
DROP INDEX IF EXISTS audit_log_unsealed;

DO $outer$
BEGIN
    -- The sealer no longer writes audit_log at all.
    EXECUTE format('REVOKE UPDATE ON %I.audit_log FROM audit_worker_sealer', current_schema());
    EXECUTE format('REVOKE UPDATE (snapshot_id, leaf_index) ON %I.audit_log FROM audit_worker_sealer', current_schema());
    -- Sealing numbers its snapshot with nextval on the snapshots id
    -- sequence, which V5 did not grant: a sealer-only login could not seal.
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO audit_worker_sealer',
                   pg_get_serial_sequence(format('%I.snapshots', current_schema()), 'id'));
    -- Exports (run by every replica) carry each event's ledger entry.
    EXECUTE format('GRANT SELECT ON %I.seal_ledger TO audit_worker_writer', current_schema());
END
$outer$;
