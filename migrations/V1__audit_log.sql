-- audit_log: one row per stored audit event, range-partitioned by month on
-- the event's own timestamp (retention and exports work month by month, and
-- a month's partition can be detached or dropped without touching others).
--
-- Every column named in DESIGN.md section 4 has a column of its own; keys
-- outside the schema are kept in `details`. The hashed fields are stored
-- exactly as received (with the original timestamp string beside the
-- timestamptz) so any row can be re-verified against `hash` later.

CREATE SEQUENCE audit_log_id_seq AS bigint CACHE 100;

CREATE TABLE audit_log (
    id                    bigint      NOT NULL DEFAULT nextval('audit_log_id_seq'),
    event_time            timestamptz NOT NULL,
    timestamp_raw         text        NOT NULL,
    idempotency_key       text        NOT NULL,
    event_id              text,
    action                text        NOT NULL,
    status                text        NOT NULL CHECK (status IN ('attempt', 'success', 'failure')),
    principal_id          text,
    organization_id       text,
    target_resource_type  text,
    target_resource_id    text,
    outcome_description   text,
    hash                  text        NOT NULL,
    hash_algorithm        text        NOT NULL DEFAULT 'SHA-256',
    hash_provided         boolean     NOT NULL,
    signature             text,
    signature_algorithm   text,
    signature_key_id      text,
    event_version         text,
    correlation_id        text,
    data_classification   text CHECK (data_classification IN ('PUBLIC', 'INTERNAL', 'CONFIDENTIAL', 'PHI')),
    retention_policy      text,
    session_context       jsonb,
    details               jsonb,
    source                text        NOT NULL,
    ingested_at           timestamptz NOT NULL DEFAULT now(),
    -- Time order: serves time-range filters and the (event_time, id) keyset
    -- order that exports and snapshots read in.
    PRIMARY KEY (event_time, id),
    -- Idempotency: a redelivered entry or a re-sent eventId never becomes a
    -- second row. A unique constraint on a partitioned table must include
    -- the partition key, so the key is unique per event_time.
    CONSTRAINT audit_log_idempotency UNIQUE (idempotency_key, event_time)
) PARTITION BY RANGE (event_time);

ALTER SEQUENCE audit_log_id_seq OWNED BY audit_log.id;

-- Indexes: every index costs ingest speed, so only these two beyond the keys.
-- * organization: "all events of org X in March" is the common compliance
--   export; (organization_id, event_time) answers it without a scan.
-- * principal: "what did user Y do" is the common investigation;
--   (principal_id, event_time) likewise.
-- Action and status filters are applied within the time range (or the org /
-- principal range): their values repeat too often for an index to pay for
-- its write cost.
CREATE INDEX audit_log_org_time ON audit_log (organization_id, event_time);
CREATE INDEX audit_log_principal_time ON audit_log (principal_id, event_time);

-- Creates the month's partition if it does not exist yet and returns its
-- name. Called by the worker ahead of time and for any month a batch needs;
-- the advisory lock makes concurrent callers (several replicas) safe.
CREATE FUNCTION audit_log_ensure_partition(month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    part      text := format('audit_log_y%sm%s', to_char(first_day, 'YYYY'), to_char(first_day, 'MM'));
BEGIN
    IF to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL THEN
        RETURN part;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('audit_log_partitions:' || current_schema()));
    IF to_regclass(format('%I.%I', current_schema(), part)) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I.%I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
            current_schema(), part,
            first_day::text || ' 00:00:00+00',
            (first_day + interval '1 month')::date::text || ' 00:00:00+00');
    END IF;
    RETURN part;
END
$$;
