-- report_jobs: one row per compliance report (`report.compliance` jobs).
--
-- Like export_jobs, the row is the job's durable state: the validated
-- request (with the organisations its requester may see), the lease, and
-- the result (artifact keys and digests). A report is one streaming pass
-- over its period, so a failed attempt starts again from the beginning.

CREATE TABLE report_jobs (
    id                 text        PRIMARY KEY,
    -- Message identity that created the job (stream:..., bullmq:...,
    -- cli:..., api:...): a redelivered message finds its job again.
    source             text        NOT NULL UNIQUE,
    -- 'queue' jobs are run by the workers' executors, 'cli' jobs by the
    -- `audit-worker report` process that created them.
    origin             text        NOT NULL DEFAULT 'queue' CHECK (origin IN ('queue', 'cli')),
    kind               text        NOT NULL
                       CHECK (kind IN ('hipaa-audit-trail', 'gdpr-processing', 'integrity')),
    requester_id       text        NOT NULL,
    -- NULL: every organisation.
    organization_id    text,
    -- The organisations the requester may see (NULL: all); the report's
    -- queries never read a row outside them.
    allowed_orgs       text[],
    period_from        timestamptz NOT NULL,
    period_to          timestamptz NOT NULL,
    formats            text[]      NOT NULL,
    -- Canonical request JSON and its SHA-256: the deduplication key of
    -- in-progress jobs (with the requester).
    request            jsonb       NOT NULL,
    request_hash       text        NOT NULL,
    status             text        NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    artifact_prefix    text        NOT NULL,
    leased_by          text,
    lease_expires_at   timestamptz,
    attempts           integer     NOT NULL DEFAULT 0,
    last_error         text,
    -- Result: {"<format>": {"key", "sizeBytes", "sha256"}} and the manifest.
    artifacts          jsonb,
    manifest_key       text,
    manifest_sha256    text,
    rows_scanned       bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    completed_at       timestamptz,
    -- Download links are valid until then.
    expires_at         timestamptz,
    -- The `audit.report.created` event and the notification were sent.
    notified_at        timestamptz
);

CREATE UNIQUE INDEX report_jobs_one_in_progress
    ON report_jobs (requester_id, request_hash)
    WHERE status IN ('queued', 'running');
CREATE INDEX report_jobs_status ON report_jobs (status, created_at);

DO $outer$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.report_jobs TO audit_worker_writer', current_schema());
    EXECUTE format('GRANT SELECT ON %I.report_jobs TO audit_worker_reader', current_schema());
END
$outer$;
