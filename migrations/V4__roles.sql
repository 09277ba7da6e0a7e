-- Least privilege: group roles for the worker and for export readers.
--
-- * audit_worker_writer: what ingestion needs and nothing more. It may read
--   and insert audit rows and create monthly partitions (through the
--   SECURITY DEFINER function below), but never UPDATE, DELETE or TRUNCATE
--   them, nor create anything in the schema. Someone who takes over the
--   worker's credentials can add events (which are still hash-checked) but
--   cannot erase or rewrite the trail.
-- * audit_worker_reader: SELECT only, for exports and investigations.
--
-- Both are NOLOGIN group roles: create a LOGIN role per deployment and
-- grant it the group (see README, "Database roles"). Roles are cluster-wide
-- and this migration runs once per schema (the schema is the connection's
-- search_path), so the roles are created only if missing (tolerating a
-- concurrent creator) and privileges are granted on the current schema,
-- named through current_schema() in dynamic SQL.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['audit_worker_writer', 'audit_worker_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- Another schema's migration created it at the same moment.
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- Partition creation runs with the rights of the migration owner, so the
-- writer needs no CREATE privilege on the schema. The search_path is fixed
-- to this schema (then pg_temp, last) so a caller cannot redirect the
-- function's unqualified names to objects of its own; its only input is a
-- date, and the partition name it builds is quoted with %I.
DO $outer$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.audit_log_ensure_partition(month date) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    part      text := format('audit_log_y%%sm%%s', to_char(first_day, 'YYYY'), to_char(first_day, 'MM'));
BEGIN
    IF to_regclass(format('%%I.%%I', current_schema(), part)) IS NOT NULL THEN
        RETURN part;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('audit_log_partitions:' || current_schema()));
    IF to_regclass(format('%%I.%%I', current_schema(), part)) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %%I.%%I PARTITION OF %%I.audit_log FOR VALUES FROM (%%L) TO (%%L)',
            current_schema(), part, current_schema(),
            first_day::text || ' 00:00:00+00',
            (first_day + interval '1 month')::date::text || ' 00:00:00+00');
        -- As in V2: a partition truncated directly must refuse too.
        EXECUTE format(
            'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %%I.%%I '
            'FOR EACH STATEMENT EXECUTE FUNCTION %%I.audit_log_refuse_truncate()',
            current_schema(), part, current_schema());
    END IF;
    RETURN part;
END
$$;
$f$, current_schema());

    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_log_ensure_partition(date) FROM PUBLIC', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_log_ensure_partition(date) TO audit_worker_writer', current_schema());

    EXECUTE format('GRANT USAGE ON SCHEMA %I TO audit_worker_writer, audit_worker_reader', current_schema());
    -- INSERT ... ON CONFLICT DO NOTHING RETURNING needs INSERT and SELECT;
    -- the id default needs the sequence.
    EXECUTE format('GRANT SELECT, INSERT ON %I.audit_log TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT USAGE ON SEQUENCE %I.audit_log_id_seq TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.audit_log TO audit_worker_reader', current_schema());
END
$outer$;
