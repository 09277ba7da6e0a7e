-- Replicas starting together raced in audit_log_ensure_partition: after
-- waiting for the advisory lock, to_regclass could still answer from a
-- stale catalog cache (an advisory lock does not process catalog
-- invalidations, a relation or namespace lock does), so the second caller
-- tried CREATE TABLE again and failed with "relation already exists".
-- CREATE TABLE IF NOT EXISTS locks the namespace first and so sees the
-- committed table; duplicate_table is caught as well, for any other path.
CREATE OR REPLACE FUNCTION audit_log_ensure_partition(month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    part      text := format('audit_log_y%sm%s', to_char(first_day, 'YYYY'), to_char(first_day, 'MM'));
BEGIN
    IF to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL THEN
        RETURN part;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('audit_log_partitions:' || current_schema()));
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
            current_schema(), part,
            first_day::text || ' 00:00:00+00',
            (first_day + interval '1 month')::date::text || ' 00:00:00+00');
    EXCEPTION WHEN duplicate_table THEN
        NULL;
    END;
    RETURN part;
END
$$;
