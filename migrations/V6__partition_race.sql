-- Replicas starting together raced in audit_log_ensure_partition: after
-- waiting for the advisory lock, to_regclass could still answer from a
-- stale catalog cache (an advisory lock does not process catalog
-- invalidations, a relation or namespace lock does), so the second caller
-- tried CREATE TABLE again and failed with "relation already exists".
-- CREATE TABLE IF NOT EXISTS locks the namespace first and so sees the
-- committed table; duplicate_table is caught as well, for any other path.
--
-- The function keeps what V2 and V4 gave it: each new partition gets the
-- TRUNCATE guard (V2), and it runs as its owner with a fixed search_path so
-- the least-privilege writer role needs no CREATE right (V4).
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
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %%I.%%I PARTITION OF %%I.audit_log FOR VALUES FROM (%%L) TO (%%L)',
            current_schema(), part, current_schema(),
            first_day::text || ' 00:00:00+00',
            (first_day + interval '1 month')::date::text || ' 00:00:00+00');
    EXCEPTION WHEN duplicate_table THEN
        NULL;
    END;
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = format('%%I.%%I', current_schema(), part)::regclass
          AND tgname = 'audit_log_no_truncate'
    ) THEN
        EXECUTE format(
            'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %%I.%%I '
            'FOR EACH STATEMENT EXECUTE FUNCTION %%I.audit_log_refuse_truncate()',
            current_schema(), part, current_schema());
    END IF;
    RETURN part;
END
$$;
$f$, current_schema());
END
$outer$;
