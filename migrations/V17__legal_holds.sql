-- legal_holds: rows that must be kept whatever else is asked.
--
-- A hold covers every audit row that matches all of its set conditions:
-- the organisation (NULL: every organisation), the subject (a principal or
-- target resource id, matched against principal_id and target_resource_id;
-- NULL: every subject) and the time range [from_time, to_time) (NULL ends:
-- unbounded). While a hold stands (released_at IS NULL), GDPR erasure and
-- retention refuse the rows it covers, naming the hold.
CREATE TABLE legal_holds (
    id              text        PRIMARY KEY,
    organization_id text,
    subject_id      text,
    from_time       timestamptz,
    to_time         timestamptz,
    reason          text        NOT NULL CHECK (length(reason) > 0),
    -- Who placed it (API key id or CLI user), and who answers for it.
    owner           text        NOT NULL CHECK (length(owner) > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text        NOT NULL,
    released_at     timestamptz,
    released_by     text,
    CHECK (from_time IS NULL OR to_time IS NULL OR from_time < to_time),
    CHECK ((released_at IS NULL) = (released_by IS NULL))
);

CREATE INDEX legal_holds_active ON legal_holds (organization_id) WHERE released_at IS NULL;
