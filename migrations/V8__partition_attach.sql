-- Partition DDL that never blocks inserts, with a lock timeout.
--
-- CREATE TABLE ... PARTITION OF takes an ACCESS EXCLUSIVE lock on
-- audit_log: it waits behind every open transaction that has read the
-- table (a long `verify` holds ACCESS SHARE until it ends), and while it
-- waits every insert queues behind it. ATTACH PARTITION needs only SHARE
-- UPDATE EXCLUSIVE on audit_log, which conflicts with neither reads (ACCESS
-- SHARE: verify, exports) nor inserts and sealing (ROW EXCLUSIVE). So a
-- month's table is now created on its own, LIKE audit_log (same columns,
-- defaults, NOT NULL and CHECK constraints), then attached: attaching
-- builds its indexes, clones the row triggers and checks the (empty) table
-- against the bound; the strong lock it takes is on the new table only.
--
-- The caller passes a lock timeout in milliseconds (NULL: the session's
-- own), in force until the function returns: a month that cannot get its
-- locks in time fails alone (SQLSTATE 55P03) and is tried again later,
-- instead of waiting without bound.
--
-- As in V4 and V6: SECURITY DEFINER with a fixed search_path, so the writer
-- role needs no CREATE right; each partition gets the TRUNCATE guard (V2).
-- The one-argument form stays for callers of earlier versions.
DO $outer$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.audit_log_ensure_partition(month date, lock_timeout_ms integer)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    part      text := format('audit_log_y%%sm%%s', to_char(first_day, 'YYYY'), to_char(first_day, 'MM'));
    qualified text := format('%%I.%%I', current_schema(), part);
BEGIN
    IF to_regclass(qualified) IS NOT NULL THEN
        RETURN part;
    END IF;
    IF lock_timeout_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', lock_timeout_ms::text || 'ms', true);
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('audit_log_partitions:' || current_schema()));
    BEGIN
        EXECUTE format(
            'CREATE TABLE %%s (LIKE %%I.audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
            qualified, current_schema());
    EXCEPTION WHEN duplicate_table THEN
        -- Made (and attached, in the same transaction) by another caller
        -- since the check above, which may have read a stale catalog.
        RETURN part;
    END;
    EXECUTE format(
        'ALTER TABLE %%I.audit_log ATTACH PARTITION %%s FOR VALUES FROM (%%L) TO (%%L)',
        current_schema(), qualified,
        first_day::text || ' 00:00:00+00',
        (first_day + interval '1 month')::date::text || ' 00:00:00+00');
    EXECUTE format(
        'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %%s '
        'FOR EACH STATEMENT EXECUTE FUNCTION %%I.audit_log_refuse_truncate()',
        qualified, current_schema());
    RETURN part;
END
$$;

CREATE OR REPLACE FUNCTION %1$I.audit_log_ensure_partition(month date) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
BEGIN
    RETURN %1$I.audit_log_ensure_partition(month, NULL);
END
$$;
$f$, current_schema());

    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_log_ensure_partition(date, integer) FROM PUBLIC', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_log_ensure_partition(date, integer) TO audit_worker_writer', current_schema());
END
$outer$;
