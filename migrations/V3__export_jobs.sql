-- export_jobs: one row per compliance export (issue 5).
--
-- The row is the job's whole durable state: the validated request, its
-- lease (which worker runs it, until when), the checkpoint that ties
-- progress to parts already written to object storage, and the result.
-- A queue message only creates the row; executors lease rows from here, so
-- a crash loses nothing and restarts nothing from zero.

CREATE TABLE export_jobs (
    id                 text        PRIMARY KEY,
    -- Message identity that created the job (stream:<key>:<entry id>,
    -- bullmq:<queue>:<job id>, cli:<uuid>): a redelivered message finds its
    -- job again instead of creating a second one.
    source             text        NOT NULL UNIQUE,
    -- 'queue' jobs are run by worker executors; 'cli' jobs by the
    -- `audit-worker export` process that created them (into its own --out
    -- directory), so executors never claim them.
    origin             text        NOT NULL DEFAULT 'queue' CHECK (origin IN ('queue', 'cli')),
    requester_id       text        NOT NULL,
    -- Normalised filters (canonical JSON) and the SHA-256 over the canonical
    -- form of filters + format + compression: the deduplication key.
    filters            jsonb       NOT NULL,
    filter_hash        text        NOT NULL,
    format             text        NOT NULL CHECK (format IN ('csv', 'ndjson', 'json')),
    compression        text        NOT NULL CHECK (compression IN ('gzip', 'zstd', 'none')),
    status             text        NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'exporting', 'uploading', 'completed', 'failed', 'expired')),
    -- Rows ingested after this instant are not part of the export, so the
    -- row set is fixed and a resumed export equals an uninterrupted one.
    cutoff             timestamptz NOT NULL DEFAULT now(),
    -- Where parts and the artifact live in object storage.
    parts_prefix       text        NOT NULL,
    artifact_key       text        NOT NULL,
    -- Lease: only the holder may checkpoint or finish the job.
    leased_by          text,
    lease_expires_at   timestamptz,
    attempts           integer     NOT NULL DEFAULT 0,
    last_error         text,
    -- Checkpoint: parts 1..parts_done are durably written and hold the
    -- first rows_done rows; the last of them has key (last_event_time, last_id).
    parts_done         integer     NOT NULL DEFAULT 0,
    rows_done          bigint      NOT NULL DEFAULT 0,
    last_event_time    timestamptz,
    last_id            bigint,
    -- Result.
    row_count          bigint,
    size_bytes         bigint,
    sha256             text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    completed_at       timestamptz,
    -- Download expiry of a completed job (set at completion).
    expires_at         timestamptz,
    notified_at        timestamptz,
    parts_removed_at   timestamptz,
    artifact_removed_at timestamptz
);

-- At most one in-progress job per requester and request: the database, not
-- a check-then-insert, decides the race between two identical requests.
CREATE UNIQUE INDEX export_jobs_one_in_progress
    ON export_jobs (requester_id, filter_hash)
    WHERE status IN ('queued', 'exporting', 'uploading');

-- The executor's claim query and the sweep look for work by status.
CREATE INDEX export_jobs_status ON export_jobs (status, created_at);
