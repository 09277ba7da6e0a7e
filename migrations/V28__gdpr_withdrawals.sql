-- Artifacts withdrawn by a GDPR erasure (README "GDPR: erasure, restriction
-- and legal holds").
--
-- The erasure's transaction marks each export or report job whose artifacts
-- may hold the subject's rows as expired, and lists it here. Its objects are
-- deleted and its requester notified after the commit; only then is the row
-- marked done. The same erasure request sent again finishes the rows still
-- open, so an object store or Redis failure in between leaves no artifact
-- behind and no requester unnotified. Holds no subject value: job ids,
-- requester ids and object keys only.
CREATE TABLE gdpr_withdrawals (
    erasure_id   text        NOT NULL REFERENCES gdpr_erasures (id),
    kind         text        NOT NULL CHECK (kind IN ('export', 'report')),
    job_id       text        NOT NULL,
    requester_id text        NOT NULL,
    -- Objects to delete, and prefixes under which every object goes.
    object_keys  text[]      NOT NULL,
    prefixes     text[]      NOT NULL,
    -- When the objects were gone and the requester notified.
    done_at      timestamptz,
    PRIMARY KEY (erasure_id, kind, job_id)
);

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT ON %I.gdpr_withdrawals TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT UPDATE (done_at) ON %I.gdpr_withdrawals TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.gdpr_withdrawals TO audit_worker_reader', current_schema());
END
$$;
