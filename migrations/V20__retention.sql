-- Retention: dropping monthly partitions of audit_log whose every row may
-- go, while the verifiable log stays provable (README, "Retention").
--
-- audit_log stays append-only for every role: the row trigger still refuses
-- UPDATE and DELETE, and each partition still refuses TRUNCATE. The one way
-- rows leave is a whole partition dropped by
-- audit_log_drop_expired_partition, a SECURITY DEFINER function that only
-- the audit_worker_retention role may execute. It checks, under locks that
-- keep the answer true until COMMIT, that:
--   * the partition's month is over;
--   * every row is past its retention_policy (per-policy day counts passed
--     in by the caller; a row without a policy uses the default; a policy
--     the caller does not know keeps the row);
--   * every row is sealed (has a seal_ledger entry);
--   * no active legal hold covers any row;
-- then records the drop in retention_prunes, deletes the salts of the
-- partition's rows, and detaches and drops it. The seal ledger (each
-- dropped leaf keeps its record digest) and the tiles are untouched, so
-- the signed roots and every proof of the remaining events stay valid
-- (tlog pruning), and `verify` reports the dropped leaves as pruned.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_worker_retention') THEN
        BEGIN
            CREATE ROLE audit_worker_retention NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            -- Another schema's migration created it at the same moment.
            NULL;
        END;
    END IF;
END
$$;

-- One row per dropped partition: what `verify` needs to tell a pruned leaf
-- from a deleted one. A ledger entry whose event_time lies in
-- [range_from, range_to) and whose leaf_index is below tree_size (the log's
-- size when the partition went; every row of it was sealed by then) names
-- a row removed by retention.
CREATE TABLE retention_prunes (
    partition   text        NOT NULL,
    range_from  timestamptz NOT NULL,
    range_to    timestamptz NOT NULL CHECK (range_from < range_to),
    dropped_at  timestamptz NOT NULL DEFAULT now(),
    -- The role that ran the drop (session_user).
    dropped_by  text        NOT NULL,
    row_count   bigint      NOT NULL,
    leaf_count  bigint      NOT NULL,
    first_leaf  bigint,
    last_leaf   bigint,
    tree_size   bigint      NOT NULL,
    -- The retention settings the drop was decided with.
    policies    jsonb       NOT NULL,
    default_days integer    NOT NULL,
    PRIMARY KEY (partition, dropped_at)
);

-- The record of what was pruned is as append-only as the ledger.
CREATE TRIGGER retention_prunes_append_only
    BEFORE UPDATE OR DELETE ON retention_prunes
    FOR EACH ROW EXECUTE FUNCTION seal_ledger_append_only();
CREATE TRIGGER retention_prunes_no_truncate
    BEFORE TRUNCATE ON retention_prunes
    FOR EACH STATEMENT EXECUTE FUNCTION seal_ledger_append_only();

DO $outer$
BEGIN
    -- Why a partition must stay, one row per reason (none: it may go).
    -- code: 'empty' (nothing to drop), 'month_open', 'retention',
    -- 'unknown_policy', 'unsealed', 'legal_hold' (hold_id names the hold).
    EXECUTE format($f$
-- The first day of a partition's month; refuses any name that is not a
-- monthly partition of this schema's audit_log.
CREATE FUNCTION %1$I.audit_log_partition_month(part text) RETURNS date
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
BEGIN
    IF part !~ '^audit_log_y[0-9]{4}m[0-9]{2}$' OR NOT EXISTS (
        SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = format('%%I.audit_log', current_schema())::regclass
           AND c.relname = part) THEN
        RAISE EXCEPTION '%% is not a monthly partition of audit_log', part
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'run `audit-worker retention --dry-run` to list the partitions';
    END IF;
    RETURN to_date(substring(part FROM 12 FOR 4) || substring(part FROM 17 FOR 2) || '01', 'YYYYMMDD');
END
$$;

CREATE FUNCTION %1$I.audit_log_retention_refusals(
    part text, policies jsonb, default_days integer, at timestamptz)
RETURNS TABLE (code text, detail text, hold_id text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
DECLARE
    first_day  date;
    qualified  text := format('%%I.%%I', current_schema(), part);
    total      bigint;
    unknown    bigint;
    unknown_names text;
    young      bigint;
    keep_until timestamptz;
    unsealed   bigint;
    h          record;
BEGIN
    first_day := audit_log_partition_month(part);
    IF default_days IS NULL OR default_days < 1 THEN
        RAISE EXCEPTION 'default retention must be at least one day, not %%', default_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format($q$
        SELECT count(*),
               count(*) FILTER (WHERE days IS NULL),
               string_agg(DISTINCT quote_literal(retention_policy), ', ') FILTER (WHERE days IS NULL),
               count(*) FILTER (WHERE days IS NOT NULL AND event_time + days * interval '1 day' > $3),
               max(event_time + days * interval '1 day') FILTER (WHERE days IS NOT NULL)
          FROM (SELECT event_time, retention_policy,
                       CASE WHEN coalesce(retention_policy, '') = '' THEN $2
                            WHEN jsonb_typeof($1 -> retention_policy) = 'number'
                            THEN ($1 ->> retention_policy)::integer END AS days
                  FROM %%s) r$q$, qualified)
        INTO total, unknown, unknown_names, young, keep_until
        USING policies, default_days, at;
    IF total = 0 THEN
        RETURN QUERY SELECT 'empty'::text, 'the partition holds no rows'::text, NULL::text;
        RETURN;
    END IF;
    IF (first_day + interval '1 month') > at THEN
        RETURN QUERY SELECT 'month_open'::text,
            format('its month ends at %%s, later than now', (first_day + interval '1 month')::date), NULL::text;
    END IF;
    IF young > 0 THEN
        RETURN QUERY SELECT 'retention'::text,
            format('%%s of its %%s rows are within their retention period (the last may go after %%s)',
                   young, total, to_char(keep_until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')), NULL::text;
    END IF;
    IF unknown > 0 THEN
        RETURN QUERY SELECT 'unknown_policy'::text,
            format('%%s rows have a retention policy the configuration does not know (%%s): unknown policies are kept; add them to retention.policies',
                   unknown, unknown_names), NULL::text;
    END IF;
    EXECUTE format($q$
        SELECT count(*) FROM %%s a
         WHERE NOT EXISTS (SELECT 1 FROM seal_ledger l
                            WHERE l.event_time = a.event_time AND l.row_id = a.id)$q$, qualified)
        INTO unsealed;
    IF unsealed > 0 THEN
        RETURN QUERY SELECT 'unsealed'::text,
            format('%%s rows are not sealed into the verifiable log yet (run a snapshot first)', unsealed), NULL::text;
    END IF;
    FOR h IN EXECUTE format($q$
        SELECT h.id, h.reason, h.owner, count(*) AS n
          FROM legal_holds h JOIN %%s a
            ON (h.organization_id IS NULL OR h.organization_id = a.organization_id)
           AND (h.subject_id IS NULL OR h.subject_id = a.principal_id OR h.subject_id = a.target_resource_id)
           AND (h.from_time IS NULL OR a.event_time >= h.from_time)
           AND (h.to_time IS NULL OR a.event_time < h.to_time)
         WHERE h.released_at IS NULL
         GROUP BY h.id, h.reason, h.owner ORDER BY h.id$q$, qualified) LOOP
        RETURN QUERY SELECT 'legal_hold'::text,
            format('legal hold %%s (owner %%s: %%s) covers %%s of its rows', h.id, h.owner, h.reason, h.n),
            h.id;
    END LOOP;
END
$$;

CREATE FUNCTION %1$I.audit_log_drop_expired_partition(
    part text, policies jsonb, default_days integer, lock_timeout_ms integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
DECLARE
    qualified text := format('%%I.%%I', current_schema(), part);
    first_day date;
    refusal   record;
    reasons   text;
    total     bigint;
BEGIN
    IF lock_timeout_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', lock_timeout_ms::text || 'ms', true);
    END IF;
    -- Validates the name before anything is locked.
    first_day := audit_log_partition_month(part);
    -- Until COMMIT no hold can be placed or released, no row can be added
    -- to the partition (a late event), and sealing cannot change the log.
    LOCK TABLE legal_holds IN SHARE MODE;
    EXECUTE format('LOCK TABLE %%s IN ACCESS EXCLUSIVE MODE', qualified);
    PERFORM 1 FROM snapshot_log_head FOR UPDATE;
    SELECT string_agg(r.detail, '; ')
      INTO reasons
      FROM audit_log_retention_refusals(part, policies, default_days, now()) r;
    IF reasons IS NOT NULL THEN
        RAISE EXCEPTION 'retention refuses to drop %%: %%', part, reasons
            USING ERRCODE = 'object_in_use';
    END IF;
    EXECUTE format($q$
        INSERT INTO retention_prunes (partition, range_from, range_to, dropped_by, row_count,
                                      leaf_count, first_leaf, last_leaf, tree_size, policies, default_days)
        SELECT $1, $2, $3, session_user, count(*), count(l.leaf_index), min(l.leaf_index),
               max(l.leaf_index), (SELECT tree_size FROM snapshot_log_head), $4, $5
          FROM %%s a
          LEFT JOIN seal_ledger l ON l.event_time = a.event_time AND l.row_id = a.id
        RETURNING row_count$q$, qualified)
        INTO total
        USING part, first_day::timestamp AT TIME ZONE 'UTC',
              (first_day + interval '1 month')::timestamp AT TIME ZONE 'UTC', policies, default_days;
    -- The salts of dropped rows open nothing any more: destroy them.
    EXECUTE format('DELETE FROM audit_salts s USING %%s a WHERE s.audit_id = a.id', qualified);
    EXECUTE format('ALTER TABLE %%I.audit_log DETACH PARTITION %%s', current_schema(), qualified);
    EXECUTE format('DROP TABLE %%s', qualified);
    RETURN total;
END
$$;
$f$, current_schema());
    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_log_partition_month(text) FROM PUBLIC', current_schema());
    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_log_retention_refusals(text, jsonb, integer, timestamptz) FROM PUBLIC', current_schema());
    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_log_drop_expired_partition(text, jsonb, integer, integer) FROM PUBLIC', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO audit_worker_retention', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_log_retention_refusals(text, jsonb, integer, timestamptz) TO audit_worker_retention', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_log_drop_expired_partition(text, jsonb, integer, integer) TO audit_worker_retention', current_schema());
    -- Listing the partitions and reading what was pruned (`verify` runs as
    -- any of the worker's roles).
    EXECUTE format('GRANT SELECT ON %I.retention_prunes TO audit_worker_retention, audit_worker_writer, audit_worker_reader, audit_worker_sealer', current_schema());
END
$outer$;
