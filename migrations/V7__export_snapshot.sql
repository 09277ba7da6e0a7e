-- Exports contain exactly the rows committed before the export was
-- requested.
--
-- ingested_at is the inserting transaction's start time, not its commit
-- time: a batch that started before an export's cutoff but committed after
-- the export had read past its rows was missing from the file, while a
-- re-run of the same export would contain it. So each row records the
-- transaction that inserted it (ingest_xid), each export job records the
-- database snapshot taken when it was recorded (cutoff_snapshot), and an
-- export reads the rows whose inserting transaction that snapshot sees as
-- committed: a fixed set, whenever and however often the job is resumed.
--
-- The columns are added without a default first (no table rewrite; rows
-- and jobs older than this migration keep NULL), then the default is set
-- for new ones. A NULL ingest_xid belongs to a row committed before this
-- migration (it takes an exclusive lock), so every snapshot taken later
-- sees it; a job with a NULL cutoff_snapshot keeps the ingested_at cutoff
-- it started with.
ALTER TABLE audit_log ADD COLUMN ingest_xid xid8;
ALTER TABLE audit_log ALTER COLUMN ingest_xid SET DEFAULT pg_current_xact_id();
ALTER TABLE export_jobs ADD COLUMN cutoff_snapshot pg_snapshot;
ALTER TABLE export_jobs ALTER COLUMN cutoff_snapshot SET DEFAULT pg_current_snapshot();
