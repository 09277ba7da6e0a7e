-- Late events are found among the rows that arrived since the last seal,
-- not among every row ever stored.
--
-- A scheduled snapshot (no `from`) seals every unsealed row before its end,
-- late events included: rows whose event_time lies in a range an earlier
-- snapshot sealed. Until now it found them by reading every row before its
-- end against the ledger, so each seal's cost grew with the whole log
-- (0.5 s for an empty seal over 1,000,000 sealed rows; minutes at a
-- billion).
--
-- The inserting transaction's id (`ingest_xid`) says when a row arrived:
-- every transaction below the xmin of a read's snapshot had finished when
-- the read began, so its rows were seen by that read. A scheduled snapshot
-- records that xmin and its end (`arrivals_xmin`, `arrivals_before`): every
-- row with event_time before `arrivals_before` inserted by a transaction
-- below `arrivals_xmin` is sealed once it commits. The next scheduled
-- snapshot reads the rows of its new range as before, and of everything
-- earlier only the rows of transactions from `arrivals_xmin` on.
--
-- The index: a BRIN over the transaction id as a bigint (PostgreSQL has no
-- BRIN operator class for xid8, and an I/O cast is immutable). Rows are
-- appended in arrival order (the table refuses UPDATE and DELETE), so each
-- block range holds a narrow span of transactions and the index stays a
-- few pages per partition; it costs ingest far less than a B-tree.
-- `autosummarize` asks autovacuum to summarise each block range once it is
-- full: ranges not yet summarised are always read (correct, only slower).
--
-- Cost: every insert computes the expression (measured with
-- benches/write_paths.sh: about 3% more database time per stored row).
-- Building it reads each partition once, about 0.4 s per million rows
-- here, and holds inserts meanwhile (events wait in Redis; none is lost).
-- To upgrade a large log without that pause, create it beforehand:
--   CREATE INDEX audit_log_arrival ON ONLY audit_log
--       USING brin (((ingest_xid::text)::bigint)) WITH (autosummarize = on);
--   -- for each partition P:
--   CREATE INDEX CONCURRENTLY P_arrival ON P
--       USING brin (((ingest_xid::text)::bigint)) WITH (autosummarize = on);
--   ALTER INDEX audit_log_arrival ATTACH PARTITION P_arrival;
-- and this migration keeps it.
CREATE INDEX IF NOT EXISTS audit_log_arrival ON audit_log
    USING brin (((ingest_xid::text)::bigint)) WITH (autosummarize = on);

-- The planner needs statistics of the index's expression to see that few
-- rows arrived since a mark; without them it assumes a third of the table
-- and reads every earlier row in key order instead (measured on 1,000,000
-- rows: 0.8 s instead of 0.1 ms). ANALYZE gathers them for each partition
-- (sampling a fixed number of rows each); autovacuum keeps them current
-- for partitions that still grow, and gathers them for new partitions.
ANALYZE audit_log;

ALTER TABLE snapshots ADD COLUMN arrivals_xmin bigint;
ALTER TABLE snapshots ADD COLUMN arrivals_before timestamptz;
ALTER TABLE snapshots ADD CONSTRAINT snapshots_arrivals_both
    CHECK ((arrivals_xmin IS NULL) = (arrivals_before IS NULL));
