-- GDPR erasure and restriction (README "GDPR: erasure, restriction and
-- legal holds").
--
-- Erasure replaces a subject's personal values in audit_log by stable
-- pseudonyms and destroys their salts, while every leaf, checkpoint and
-- proof stays valid: a leaf covers each personal value only through its
-- commitment SHA-256(salt || value), and that commitment (which reveals
-- nothing once the salt is gone) is kept here, per row and path. The
-- record digest of an erased row is computed with the kept commitment in
-- place of the salted value.
--
-- The one path through the append-only trigger is gdpr_erase_rows below, a
-- SECURITY DEFINER function; the worker's roles may EXECUTE it and nothing
-- more. It writes only the personal columns, removes only the erased
-- paths' salts, and records every change in audit_erasures.

-- One row per erasure request. The subject is kept only as its pseudonym:
-- this table must not hold the value it erased.
CREATE TABLE gdpr_erasures (
    id                text        PRIMARY KEY,
    -- Message identity that created it (stream:..., bullmq:..., api:...,
    -- cli:...): a redelivered request finds its erasure again.
    source            text        NOT NULL UNIQUE,
    requester_id      text        NOT NULL,
    -- NULL: every organisation.
    organization_id   text,
    subject_pseudonym text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('completed', 'refused')),
    -- Rows whose personal values were replaced.
    rows_erased       bigint      NOT NULL DEFAULT 0,
    -- Why it was refused (the legal hold that covers the rows).
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    -- When its `gdpr.erasure.completed` audit event was sent: a retried
    -- request sends it only if this is still NULL.
    announced_at      timestamptz
);

-- The erasure record of each erased row: which paths were erased, their
-- kept commitments, and by which request(s) and when. A row can be erased
-- more than once (its principal, later its target); the maps grow.
CREATE TABLE audit_erasures (
    audit_id     bigint      PRIMARY KEY,
    event_time   timestamptz NOT NULL,
    -- {"<path>": "<64 hex digits: SHA-256(salt || value)>"}
    commitments  jsonb       NOT NULL CHECK (jsonb_typeof(commitments) = 'object'),
    -- [{"request": id, "at": time, "paths": [...]}], oldest first.
    requests     jsonb       NOT NULL CHECK (jsonb_typeof(requests) = 'array')
);
COMMENT ON COLUMN audit_erasures.audit_id IS 'audit_log.id of the erased row';

-- Restriction of processing (GDPR Art. 18): a flag per subject (a principal
-- or target resource id) within an organisation ('' : every organisation).
CREATE TABLE gdpr_restrictions (
    organization_id text        NOT NULL DEFAULT '',
    subject_id      text        NOT NULL CHECK (length(subject_id) > 0),
    reason          text        NOT NULL CHECK (length(reason) > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text        NOT NULL,
    PRIMARY KEY (organization_id, subject_id)
);

-- The append-only trigger lets exactly one thing through: an UPDATE made
-- by gdpr_erase_rows (which runs as the migration's owner and sets the
-- transaction-local flag below). Everything else is refused as before.
DO $outer$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.audit_log_refuse_sealed_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND current_user = %2$L
       AND current_setting('audit_worker.gdpr_erasure', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: %% of the event at (event_time %%, id %%) is refused',
        TG_OP, OLD.event_time, OLD.id
        USING ERRCODE = 'integrity_constraint_violation',
              HINT = 'audit events are never changed or removed; record a correcting event instead (personal data: use GDPR erasure)';
END
$$ $f$, current_schema(), current_user);

    -- p_ids / p_times name the rows; p_values[i] maps each erased path of
    -- row i to its pseudonym, p_commitments[i] each erased path to its
    -- commitment. One statement per table, over all rows at once.
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.gdpr_erase_rows(
    p_request text, p_at timestamptz, p_ids bigint[], p_times timestamptz[],
    p_values jsonb[], p_commitments jsonb[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp AS $$
DECLARE
    n bigint;
    hold record;
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_times)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_values)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_commitments) THEN
        RAISE EXCEPTION 'gdpr_erase_rows: the four row arrays differ in length';
    END IF;
    -- No hold may be placed while the erasure commits, and none may cover
    -- the rows (the worker checks first; this is the guard against races).
    LOCK TABLE legal_holds IN SHARE MODE;
    SELECT h.id, h.reason INTO hold
      FROM unnest(p_ids, p_times) AS u(id, event_time)
      JOIN audit_log a ON a.id = u.id AND a.event_time = u.event_time
      JOIN legal_holds h ON h.released_at IS NULL
       AND (h.organization_id IS NULL OR h.organization_id = a.organization_id)
       AND (h.subject_id IS NULL OR h.subject_id = a.principal_id OR h.subject_id = a.target_resource_id)
       AND (h.from_time IS NULL OR a.event_time >= h.from_time)
       AND (h.to_time IS NULL OR a.event_time < h.to_time)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'legal hold %% covers rows of this erasure: %%', hold.id, hold.reason
            USING ERRCODE = 'object_in_use', DETAIL = hold.id,
                  HINT = 'release the hold (audit-worker hold release) once the legal duty ends';
    END IF;
    PERFORM set_config('audit_worker.gdpr_erasure', 'on', true);
    UPDATE audit_log a SET
        principal_id = COALESCE(u.vals->>'principalId', a.principal_id),
        target_resource_id = COALESCE(u.vals->>'targetResourceId', a.target_resource_id),
        session_context = CASE WHEN jsonb_typeof(a.session_context) = 'object'
            THEN a.session_context || COALESCE((SELECT jsonb_object_agg(substr(k, 16), v)
                  FROM jsonb_each(u.vals) AS e(k, v) WHERE k LIKE 'sessionContext.%%'), '{}')
            ELSE a.session_context END,
        details = CASE WHEN jsonb_typeof(a.details) = 'object'
            THEN a.details || COALESCE((SELECT jsonb_object_agg(substr(k, 9), v)
                  FROM jsonb_each(u.vals) AS e(k, v) WHERE k LIKE 'details.%%'), '{}')
            ELSE a.details END
      FROM unnest(p_ids, p_times, p_values) AS u(id, event_time, vals)
     WHERE a.id = u.id AND a.event_time = u.event_time;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM set_config('audit_worker.gdpr_erasure', 'off', true);
    IF n <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'gdpr_erase_rows: %% of %% rows exist', n, cardinality(p_ids);
    END IF;
    -- The salts of the erased paths are destroyed (other paths keep theirs).
    UPDATE audit_salts s
       SET salts = s.salts - ARRAY(SELECT jsonb_object_keys(u.c))
      FROM unnest(p_ids, p_commitments) AS u(id, c)
     WHERE s.audit_id = u.id;
    DELETE FROM audit_salts WHERE audit_id = ANY (p_ids) AND salts = '{}'::jsonb;
    INSERT INTO audit_erasures AS e (audit_id, event_time, commitments, requests)
    SELECT u.id, u.event_time, u.c,
           jsonb_build_array(jsonb_build_object(
               'request', p_request, 'at', p_at,
               'paths', (SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(u.c) AS k)))
      FROM unnest(p_ids, p_times, p_commitments) AS u(id, event_time, c)
    ON CONFLICT (audit_id) DO UPDATE
       SET commitments = e.commitments || EXCLUDED.commitments,
           requests = e.requests || EXCLUDED.requests;
    RETURN n;
END
$$ $f$, current_schema());

    EXECUTE format('REVOKE ALL ON FUNCTION %I.gdpr_erase_rows(text, timestamptz, bigint[], timestamptz[], jsonb[], jsonb[]) FROM PUBLIC',
                   current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.gdpr_erase_rows(text, timestamptz, bigint[], timestamptz[], jsonb[], jsonb[]) TO audit_worker_writer',
                   current_schema());
    EXECUTE format('GRANT SELECT, INSERT ON %I.gdpr_erasures TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT UPDATE (status, rows_erased, error, completed_at, announced_at) ON %I.gdpr_erasures TO audit_worker_writer',
                   current_schema());
    EXECUTE format('GRANT SELECT ON %I.gdpr_erasures, %I.audit_erasures TO audit_worker_reader, audit_worker_sealer',
                   current_schema(), current_schema());
    EXECUTE format('GRANT SELECT ON %I.audit_erasures TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, DELETE, UPDATE ON %I.gdpr_restrictions TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.gdpr_restrictions TO audit_worker_reader', current_schema());
    -- Holds are placed and released by the API and the CLI (never deleted).
    EXECUTE format('GRANT SELECT, INSERT ON %I.legal_holds TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT UPDATE (released_at, released_by) ON %I.legal_holds TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.legal_holds TO audit_worker_reader, audit_worker_sealer', current_schema());
END
$outer$;
