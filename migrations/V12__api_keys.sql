-- API keys of the compliance HTTP API (/v1), and the organisation scope
-- that travels with every export job.
--
-- A key is stored as the SHA-256 of its token only: the token itself is
-- shown once, when the key is created. Keys live in the database (not in
-- each replica's configuration) so that a revocation reaches every
-- replica at its next request.
CREATE TABLE api_keys (
    id            text        PRIMARY KEY,
    name          text        NOT NULL,
    -- SHA-256 of the whole token (awk_...), 32 bytes.
    token_sha256  bytea       NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    -- Organisations the key may read and export; NULL means all of them.
    organizations text[]      CHECK (organizations IS NULL OR cardinality(organizations) > 0),
    permissions   text[]      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

-- The organisations an export may contain, whatever its filters say: the
-- executor's query adds organization_id = ANY(allowed_organizations).
-- NULL: every organisation (jobs recorded before this migration, the CLI,
-- and queue requests when export.queue_organizations allows all).
ALTER TABLE export_jobs ADD COLUMN allowed_organizations text[];

-- A job stopped on request (POST /v1/exports/{id}/cancel).
ALTER TABLE export_jobs DROP CONSTRAINT export_jobs_status_check;
ALTER TABLE export_jobs ADD CONSTRAINT export_jobs_status_check
    CHECK (status IN ('queued', 'exporting', 'uploading', 'completed', 'failed', 'expired', 'cancelled'));

-- The worker (writer group) looks keys up; only the schema's owner (the
-- operator running `audit-worker api-key`) creates or revokes them, so
-- whoever takes over the worker's credentials cannot mint a key.
DO $$
BEGIN
    EXECUTE format('GRANT SELECT ON %I.api_keys TO audit_worker_writer', current_schema());
END
$$;
