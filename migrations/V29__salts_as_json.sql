-- audit_salts.salts becomes `json` (the text as the worker writes it)
-- instead of `jsonb`.
--
-- Why: every ingested event with personal values adds one salts row, and
-- PostgreSQL converted each one into jsonb's binary form on insert; `json`
-- only checks the text's syntax and stores it as it is. Measured with
-- benches/write_paths.sh, 200,000 events: the rows and their salts took
-- 2.63 s with jsonb salts against 2.18 s with json ones (the sink now also
-- takes them from its input rather than joining them with the inserted
-- rows), the rows alone 1.91 s. `json` still refuses text that is not
-- JSON, so an export's `salts` stays well-formed; the reader checks it is
-- an object of 64-hex-digit salts.
-- Nothing filters or indexes by the salts' content: sealing, `verify` and
-- exports read the object whole, and only the erasure below edits it.
--
-- Rows stored before keep their content, rendered as PostgreSQL renders
-- jsonb (`{"a": "b"}`); the worker reads both spellings. The conversion
-- rewrites the table once.
ALTER TABLE audit_salts DROP CONSTRAINT IF EXISTS audit_salts_salts_check;
ALTER TABLE audit_salts ALTER COLUMN salts TYPE json USING salts::json;
ALTER TABLE audit_salts ADD CONSTRAINT audit_salts_salts_check CHECK (json_typeof(salts) = 'object');

-- gdpr_erase_rows (V27) unchanged but for the one statement that edits
-- salts: json has no `-` operator, so the object goes through jsonb there.
DO $outer$
BEGIN
    -- Row i: p_ids[i]/p_times[i] name it; p_principals[i], p_targets[i]
    -- are the pseudonyms replacing the principal and target (NULL: keep);
    -- p_sessions[i], p_details[i] are JSON objects merged into
    -- sessionContext and details (NULL: keep); p_commitments[i] maps each
    -- erased path to its commitment, p_paths[i] lists those paths (a JSON
    -- array, sorted); p_salts_emptied[i] says no salt of the row is left.
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.gdpr_erase_rows(
    p_request text, p_at timestamptz, p_ids bigint[], p_times timestamptz[],
    p_principals text[], p_targets text[], p_sessions text[], p_details text[],
    p_commitments text[], p_paths text[], p_salts_emptied boolean[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = %1$I, pg_temp
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_memoize = off
SET work_mem = '64MB' AS $$
DECLARE
    n bigint := cardinality(p_ids);
    rewritten bigint;
    hold record;
    entry jsonb := jsonb_build_object('request', p_request, 'at', p_at);
BEGIN
    IF n IS DISTINCT FROM cardinality(p_times)
       OR n IS DISTINCT FROM cardinality(p_principals)
       OR n IS DISTINCT FROM cardinality(p_targets)
       OR n IS DISTINCT FROM cardinality(p_sessions)
       OR n IS DISTINCT FROM cardinality(p_details)
       OR n IS DISTINCT FROM cardinality(p_commitments)
       OR n IS DISTINCT FROM cardinality(p_paths)
       OR n IS DISTINCT FROM cardinality(p_salts_emptied) THEN
        RAISE EXCEPTION 'gdpr_erase_rows: the row arrays differ in length';
    END IF;
    -- No hold may be placed while the erasure commits, and none may cover
    -- the rows (the worker checks first; this is the guard against races).
    LOCK TABLE legal_holds IN SHARE MODE;
    SELECT h.id, h.reason INTO hold
      FROM legal_holds h
      JOIN unnest(p_ids, p_times) AS u(id, event_time) ON true
      JOIN audit_log a ON a.id = u.id AND a.event_time = u.event_time
     WHERE h.released_at IS NULL
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
        principal_id = COALESCE(u.principal, a.principal_id),
        target_resource_id = COALESCE(u.target, a.target_resource_id),
        session_context = CASE WHEN u.session IS NOT NULL AND jsonb_typeof(a.session_context) = 'object'
            THEN a.session_context || u.session::jsonb ELSE a.session_context END,
        details = CASE WHEN u.details IS NOT NULL AND jsonb_typeof(a.details) = 'object'
            THEN a.details || u.details::jsonb ELSE a.details END
      FROM unnest(p_ids, p_times, p_principals, p_targets, p_sessions, p_details)
           AS u(id, event_time, principal, target, session, details)
     WHERE a.id = u.id AND a.event_time = u.event_time;
    GET DIAGNOSTICS rewritten = ROW_COUNT;
    PERFORM set_config('audit_worker.gdpr_erasure', 'off', true);
    IF rewritten <> n THEN
        RAISE EXCEPTION 'gdpr_erase_rows: %% of %% rows exist', rewritten, n;
    END IF;
    -- The salts of the erased paths are destroyed (other paths keep theirs).
    -- Salts are only ever removed, so a row the worker saw with no other
    -- salt has none left now: its salt row goes.
    DELETE FROM audit_salts s
     USING unnest(p_ids, p_salts_emptied) AS u(id, emptied)
     WHERE u.emptied AND s.audit_id = u.id;
    UPDATE audit_salts s
       SET salts = (s.salts::jsonb - ARRAY(SELECT jsonb_array_elements_text(u.paths::jsonb)))::json
      FROM unnest(p_ids, p_paths, p_salts_emptied) AS u(id, paths, emptied)
     WHERE NOT u.emptied AND s.audit_id = u.id;
    INSERT INTO audit_erasures AS e (audit_id, event_time, commitments, requests)
    SELECT u.id, u.event_time, u.c::jsonb,
           jsonb_build_array(entry || jsonb_build_object('paths', u.paths::jsonb))
      FROM unnest(p_ids, p_times, p_commitments, p_paths) AS u(id, event_time, c, paths)
    ON CONFLICT (audit_id) DO UPDATE
       SET commitments = e.commitments || EXCLUDED.commitments,
           requests = e.requests || EXCLUDED.requests;
    RETURN n;
END
$$ $f$, current_schema());

END
$outer$;
