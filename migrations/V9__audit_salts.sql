-- Salts of the personal fields of each event (leaf v2, README "Record
-- digest (leaf v2)"): personal values enter the record digest only as
-- SHA-256(salt || value). The salts live here, apart from audit_log, so
-- erasing a value together with its salt later leaves every leaf valid.
--
-- One row per stored event that has personal values, written in the same
-- statement as the row itself (src/sink/postgres.rs). `salts` maps each
-- committed path ("principalId", "sessionContext.ipAddress", ...) to its
-- 32-byte salt in lowercase hex. Keyed like audit_log's idempotency
-- constraint.
CREATE TABLE audit_salts (
    idempotency_key text        NOT NULL,
    event_time      timestamptz NOT NULL,
    salts           jsonb       NOT NULL CHECK (jsonb_typeof(salts) = 'object'),
    PRIMARY KEY (idempotency_key, event_time)
);

DO $outer$
BEGIN
    -- The writer stores salts with the rows; the sealer and auditors read
    -- them to compute record digests.
    EXECUTE format('GRANT SELECT, INSERT ON %I.audit_salts TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.audit_salts TO audit_worker_sealer, audit_worker_reader', current_schema());
END
$outer$;
