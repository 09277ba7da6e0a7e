-- A released legal hold keeps no subject id in clear. On release the
-- worker replaces it by the subject's pseudonym ('pseud:' + HMAC-SHA256
-- with gdpr.pseudonym_key, the one an erasure gives) or, without a key, by
-- the commitment 'sha256:' + hex(SHA-256(hold id || ':' || subject)).
-- Holds released before this migration get the commitment now: the
-- database does not know the pseudonym key.
UPDATE legal_holds
   SET subject_id = 'sha256:' || encode(sha256(convert_to(id || ':' || subject_id, 'UTF8')), 'hex')
 WHERE released_at IS NOT NULL
   AND subject_id IS NOT NULL
   AND subject_id !~ '^(pseud|sha256):[0-9a-f]{64}$';

-- Retention records each dropped partition as an audit event
-- (audit.retention.partition_dropped), added to the event stream after the
-- drop commits. A drop is listed here once its event was added, so a pass
-- after a failure (Redis down) adds the events still missing, and the event
-- (its id derived from the partition, its time the drop's) is stored once.
CREATE TABLE retention_prune_events (
    partition   text        NOT NULL,
    dropped_at  timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, dropped_at),
    FOREIGN KEY (partition, dropped_at) REFERENCES retention_prunes (partition, dropped_at)
);

-- Drops made before this migration had no event: none is made up for them.
INSERT INTO retention_prune_events (partition, dropped_at, recorded_at)
SELECT partition, dropped_at, dropped_at FROM retention_prunes;

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT ON %I.retention_prune_events TO audit_worker_retention', current_schema());
    EXECUTE format('GRANT SELECT ON %I.retention_prune_events TO audit_worker_reader', current_schema());
END
$$;
