-- The tree's hashes as C2SP tlog-tiles (README "Tiles"): tile (level, idx)
-- holds the hashes of the complete subtrees of height 8 * level with
-- indices 256 * idx .., concatenated (32 bytes each, 1 to 256 of them).
-- Written in the sealing transaction; proofs read O(log n) tiles; the
-- worker serves them read-only under /log/.
CREATE TABLE log_tiles (
    level   smallint NOT NULL CHECK (level BETWEEN 0 AND 63),
    idx     bigint   NOT NULL CHECK (idx >= 0),
    hashes  bytea    NOT NULL CHECK (length(hashes) BETWEEN 32 AND 8192 AND length(hashes) % 32 = 0),
    PRIMARY KEY (level, idx)
);

-- A tile only grows: an update must keep every stored hash and add some.
-- Deleting or truncating is refused like the ledger's.
CREATE FUNCTION log_tiles_grow_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND NEW.level = OLD.level AND NEW.idx = OLD.idx
       AND length(NEW.hashes) > length(OLD.hashes)
       AND substring(NEW.hashes FROM 1 FOR length(OLD.hashes)) = OLD.hashes THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'log_tiles only grow: % of tile %/% is refused', TG_OP, OLD.level, OLD.idx
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER log_tiles_grow_only
    BEFORE UPDATE OR DELETE ON log_tiles
    FOR EACH ROW EXECUTE FUNCTION log_tiles_grow_only();
CREATE TRIGGER log_tiles_no_truncate
    BEFORE TRUNCATE ON log_tiles
    FOR EACH STATEMENT EXECUTE FUNCTION seal_ledger_append_only();

DO $outer$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.log_tiles TO audit_worker_sealer', current_schema());
    -- The worker's HTTP listener serves tiles and checkpoints.
    EXECUTE format('GRANT SELECT ON %I.log_tiles TO audit_worker_writer, audit_worker_reader', current_schema());
    EXECUTE format('GRANT SELECT ON %I.snapshots, %I.snapshot_log_head TO audit_worker_writer',
                   current_schema(), current_schema());
END
$outer$;
