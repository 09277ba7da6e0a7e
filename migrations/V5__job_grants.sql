-- Rights for the job kinds added in V2 (snapshots) and V3 (exports), in the
-- least-privilege scheme of V4.
--
-- * audit_worker_writer (every replica): record and run export jobs, record
--   snapshot requests. Still no UPDATE or DELETE on audit_log.
-- * audit_worker_sealer (replicas that run snapshots): seal rows. It may
--   UPDATE only the two seal columns of audit_log, and the V2 trigger
--   refuses any change to a row once sealed; it appends to the seal ledger
--   and the snapshots table (themselves append-only by trigger) and moves
--   the log head.
-- * audit_worker_reader (exports, auditors): read the log and its proofs.
DO $outer$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_worker_sealer') THEN
        BEGIN
            CREATE ROLE audit_worker_sealer NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created concurrently by another schema's migration
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO audit_worker_sealer', current_schema());

    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.export_jobs TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.export_jobs TO audit_worker_reader', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.snapshot_jobs TO audit_worker_writer, audit_worker_sealer', current_schema());

    EXECUTE format('GRANT SELECT, UPDATE (snapshot_id, leaf_index) ON %I.audit_log TO audit_worker_sealer', current_schema());
    EXECUTE format('GRANT SELECT, INSERT ON %I.seal_ledger TO audit_worker_sealer', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.snapshots TO audit_worker_sealer', current_schema());
    EXECUTE format('GRANT SELECT, UPDATE ON %I.snapshot_log_head TO audit_worker_sealer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.snapshots, %I.seal_ledger, %I.snapshot_log_head TO audit_worker_reader',
                   current_schema(), current_schema(), current_schema());
END
$outer$;
