#!/usr/bin/env bash
# The database's side of ingest, write path by write path (SQL only, no
# worker): how long PostgreSQL takes to store N events (default 200,000)
# with their salts, in a table shaped like audit_log (every column, monthly
# partition, the same indexes and defaults) and a salts table keyed by
# row id, as the worker stores them. Variants, each on emptied tables after
# a CHECKPOINT, RUNS times (default 3) in turn:
#
#   insert           the statement in use: INSERT ... SELECT ... RETURNING
#                    without ON CONFLICT, the salts (json) in the same
#                    statement, taken from the input (every row is inserted,
#                    or none); batches of 1,000 (sink.batch_size)
#   insert+conflict  the statement the sink falls back to after a unique
#                    violation: ON CONFLICT DO NOTHING, the salts of the
#                    returned rows only
#   insert-jsonb     the statement used before: salts as jsonb, joined with
#                    the returned rows
#   insert-nosalts   the statement in use without the salts: the floor
#   copy+salts       COPY of the rows, then COPY of their salts
#   copy             COPY of the rows alone: what benches/ingest.sh compares
#                    the worker with (there in binary format)
#
# The COPY variants load the whole set in one text-format statement each
# (psql's \copy); their per-statement cost at 1,000 rows is small next to
# the rows.
#
# Usage: benches/write_paths.sh [N]
#   VARIANTS="insert insert-jsonb copy" runs only those (space-separated);
#   the ratios need `copy` among them.
# Needs: PostgreSQL (AUDIT_WORKER_BENCH_DATABASE_URL, default the local
# audit_worker_bench database, created if missing) and psql.
set -euo pipefail
N="${1:-200000}"
RUNS="${RUNS:-3}"
BASE="${AUDIT_WORKER_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_bench}"
SCHEMA="bench_write_paths_$$"
WORK="$(mktemp -d)"
chmod 755 "$WORK"
cleanup() {
  psql -q "$BASE" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "${BASE%/*}/postgres" -c "CREATE DATABASE ${BASE##*/}" >/dev/null 2>&1 || true

psql -q -v ON_ERROR_STOP=1 "$BASE" >/dev/null <<SQL
CREATE SCHEMA "$SCHEMA"; SET search_path = "$SCHEMA";
CREATE SEQUENCE audit_log_id_seq;
CREATE TABLE audit_log (
  id bigint NOT NULL DEFAULT nextval('audit_log_id_seq'), event_time timestamptz NOT NULL,
  timestamp_raw text NOT NULL, idempotency_key text NOT NULL, event_id text,
  action text NOT NULL, status text NOT NULL CHECK (status IN ('attempt', 'success', 'failure')),
  principal_id text, organization_id text, target_resource_type text, target_resource_id text,
  outcome_description text, hash text NOT NULL, hash_algorithm text NOT NULL DEFAULT 'SHA-256',
  hash_provided bool NOT NULL, signature text, signature_algorithm text, signature_key_id text,
  event_version text, correlation_id text, data_classification text, retention_policy text,
  session_context jsonb, details jsonb, source text NOT NULL,
  ingested_at timestamptz NOT NULL DEFAULT now(), snapshot_id bigint, leaf_index bigint,
  ingest_xid xid8 DEFAULT pg_current_xact_id(),
  PRIMARY KEY (event_time, id), CONSTRAINT audit_log_idempotency UNIQUE (idempotency_key, event_time)
) PARTITION BY RANGE (event_time);
CREATE TABLE audit_log_p PARTITION OF audit_log FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX ON audit_log (leaf_index) WHERE leaf_index IS NOT NULL;
CREATE INDEX ON audit_log (organization_id, event_time);
CREATE INDEX ON audit_log (principal_id, event_time);
CREATE INDEX ON audit_log USING brin (((ingest_xid::text)::bigint)) WITH (autosummarize = on);
CREATE TABLE audit_salts (audit_id bigint PRIMARY KEY,
  salts json NOT NULL CHECK (json_typeof(salts) = 'object'));
CREATE TABLE audit_salts_jsonb (audit_id bigint PRIMARY KEY,
  salts jsonb NOT NULL CHECK (jsonb_typeof(salts) = 'object'));
-- The events: ~600 bytes each with session context, four salted values.
CREATE TABLE src AS
SELECT g, nextval('audit_log_id_seq') AS id, t, to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw,
       'evt-' || g AS k, 'user-' || (g % 1000) AS p, 'org-' || (g % 5) AS o, 'p-' || g AS target,
       encode(sha256(('evt-' || g)::bytea), 'hex') AS hash,
       jsonb_build_object('sessionId', 's-' || g, 'ipAddress', '10.1.' || (g % 200) || '.' || (g % 250),
                          'userAgent', 'Mozilla/5.0 (X11; Linux x86_64) agent/' || (g % 50)) AS sc,
       jsonb_build_object('recordId', g, 'fields', jsonb_build_array('name', 'dob', 'address')) AS de,
       jsonb_build_object('principalId', md5(g::text) || md5((g + 1)::text),
                          'targetResourceId', md5((g + 2)::text) || md5((g + 3)::text),
                          'sessionContext.ipAddress', md5((g + 4)::text) || md5((g + 5)::text),
                          'sessionContext.userAgent', md5((g + 6)::text) || md5((g + 7)::text))::text AS salts
  FROM generate_series(1, $N) g,
       LATERAL (SELECT '2026-11-01'::timestamptz + g * interval '10 ms' AS t) a;
CREATE INDEX ON src (g);
ANALYZE src;
\copy (SELECT id, t, raw, k, k, 'record.read', 'success', p, o, 'Patient', target, 'read', hash, true, 'PHI', sc, de, 'stream:bench' FROM src ORDER BY g) TO '$WORK/rows.copy'
\copy (SELECT id, salts FROM src ORDER BY g) TO '$WORK/salts.copy'
SQL

COLS="id, event_time, timestamp_raw, idempotency_key, event_id, action, status, principal_id, organization_id,
      target_resource_type, target_resource_id, outcome_description, hash, hash_provided, data_classification,
      session_context, details, source"
batches() { # $1: "ON CONFLICT ..." or empty; $2: the salts statement
  cat <<SQL
DO \$\$ DECLARE n bigint; BEGIN FOR b IN 0..($N - 1) / 1000 LOOP
  WITH input AS (SELECT * FROM src WHERE g > b * 1000 AND g <= (b + 1) * 1000),
  inserted AS (INSERT INTO audit_log ($COLS)
      SELECT id, t, raw, k, k, 'record.read', 'success', p, o, 'Patient', target, 'read', hash, true, 'PHI', sc, de, 'stream:bench'
        FROM input ORDER BY g $1 RETURNING id),
  salted AS ($2)
  SELECT count(*) INTO STRICT n FROM inserted r JOIN input i USING (id);
END LOOP; END \$\$;
SQL
}
variant_sql() {
  case "$1" in
    insert) batches "" "INSERT INTO audit_salts SELECT i.id, i.salts::json FROM input i" ;;
    insert+conflict) batches "ON CONFLICT (idempotency_key, event_time) DO NOTHING" \
      "INSERT INTO audit_salts SELECT i.id, i.salts::json FROM inserted r JOIN input i USING (id)" ;;
    insert-jsonb) batches "" "INSERT INTO audit_salts_jsonb SELECT i.id, i.salts::jsonb FROM inserted r JOIN input i USING (id)" ;;
    insert-nosalts) batches "" "SELECT 1" ;;
    copy+salts) printf '%s\n' "\\copy audit_log ($(echo $COLS)) FROM '$WORK/rows.copy'" "\\copy audit_salts FROM '$WORK/salts.copy'" ;;
    copy) printf '%s\n' "\\copy audit_log ($(echo $COLS)) FROM '$WORK/rows.copy'" ;;
  esac
}
declare -A total
VARIANTS="${VARIANTS:-insert insert+conflict insert-jsonb insert-nosalts copy+salts copy}"
for run in $(seq 1 "$RUNS"); do
  for v in $VARIANTS; do
    psql -q "$BASE" -c "SET search_path = \"$SCHEMA\"" -c "TRUNCATE audit_log, audit_salts, audit_salts_jsonb" -c "CHECKPOINT" >/dev/null
    start=$(date +%s.%N)
    { echo "SET search_path = \"$SCHEMA\"; SET jit = off;"; variant_sql "$v"; } | psql -q -v ON_ERROR_STOP=1 "$BASE" >/dev/null
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
    total[$v]=$(awk -v a="${total[$v]:-0}" -v b="$secs" 'BEGIN { printf "%.3f", a + b }')
    printf 'run %d  %-16s %6.2f s  %8.0f rows/s\n' "$run" "$v" "$secs" "$(awk -v n="$N" -v s="$secs" 'BEGIN { print n / s }')"
  done
done
echo "== mean of $RUNS runs, $N events; ratio = rows/s against plain COPY of the rows alone"
for v in $VARIANTS; do
  printf '%-16s %6.2f s  ratio %s\n' "$v" "$(awk -v t="${total[$v]}" -v r="$RUNS" 'BEGIN { print t / r }')" \
    "$(awk -v c="${total[copy]:-}" -v t="${total[$v]}" 'BEGIN { if (c == "") print "-"; else printf "%.2f", c / t }')"
done
