#!/usr/bin/env bash
# Export benchmark: rows/s of `audit-worker export` writing
# ROWS rows to gzip CSV, beside PostgreSQL's own `COPY (same query) TO
# STDOUT` over the same rows in the same run, and the export's peak RSS;
# then the same rows as Parquet (export columns, and OCSF), with their
# rows/s and peak RSS (PARQUET=0 skips those).
#
# Usage: benches/export.sh            (ROWS=1000000 by default)
#   AUDIT_WORKER_BIN  the worker binary (default: built here, release)
#   COMPARE_BIN       a second build whose csv.gz export is timed right
#                     after the first, over the same rows (e.g. the build
#                     before a change)
# Needs: PostgreSQL and Redis as in scripts/services.sh, psql, gzip,
# GNU time (/usr/bin/time). Uses its own schema and Redis keys, removed
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1000000}
DB_URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_test}
SCHEMA=bench_export_$$
OUT=$(mktemp -d)
BIN=${AUDIT_WORKER_BIN:-${CARGO_TARGET_DIR:-target}/release/audit-worker}
PARQUET=${PARQUET:-1}

export AUDIT_WORKER__DATABASE__URL=$DB_URL
export AUDIT_WORKER__DATABASE__SCHEMA=$SCHEMA
export AUDIT_WORKER__STREAM__KEY=bench:$SCHEMA:events
export AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY=bench:$SCHEMA:notifications
export AUDIT_WORKER__LOG__FORMAT=text

cleanup() {
  psql -q "$DB_URL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
  redis-cli DEL "bench:$SCHEMA:events" "bench:$SCHEMA:notifications" >/dev/null 2>&1 || true
  rm -rf "$OUT"
}
trap cleanup EXIT

if [ -z "${AUDIT_WORKER_BIN:-}" ]; then cargo build --release --quiet --bin audit-worker; fi
"$BIN" migrate >/dev/null

echo "filling $ROWS rows ..."
psql -q "$DB_URL" <<SQL
SET search_path = $SCHEMA;
SELECT audit_log_ensure_partition('2024-03-01');
INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
  principal_id, organization_id, target_resource_type, target_resource_id, outcome_description,
  hash, hash_provided, data_classification, details, session_context, source)
SELECT t, to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), 'k-' || g, 'e-' || g,
  'record.read.' || (g % 7), (ARRAY['attempt','success','failure'])[g % 3 + 1],
  'user-' || (g % 1000), 'org-' || (g % 5), 'Patient', 'p-' || g,
  'Dr. Zoë read chart ' || g || ', "summary" section',
  md5(g::text) || md5(g::text), true, 'PHI',
  jsonb_build_object('n', g), jsonb_build_object('sessionId', 's-' || g, 'ipAddress', '10.0.0.1'),
  'bench'
FROM generate_series(1, $ROWS) g,
     LATERAL (SELECT timestamptz '2024-03-01 00:00:00+00' + g * interval '2 seconds') AS x(t);
ANALYZE audit_log;
SQL

QUERY="SELECT id, event_time, timestamp_raw, event_id, action, status, principal_id, organization_id,
  target_resource_type, target_resource_id, outcome_description, data_classification, correlation_id,
  event_version, retention_policy, session_context::text, details::text, hash, hash_algorithm,
  signature, signature_algorithm, signature_key_id, ingested_at
  FROM $SCHEMA.audit_log WHERE event_time >= '2024-03-01' AND event_time < '2024-04-01'
  ORDER BY event_time, id"

now() { date +%s.%N; }
rate() { awk -v r="$ROWS" -v s="$1" -v e="$2" 'BEGIN { printf "%.2f s, %.0f rows/s", e - s, r / (e - s) }'; }

echo "COPY (same query) TO STDOUT, CSV, to /dev/null ..."
s=$(now); psql -q "$DB_URL" -c "COPY ($QUERY) TO STDOUT WITH (FORMAT csv, HEADER)" >/dev/null; e=$(now)
copy_raw=$(rate "$s" "$e")
echo "COPY (same query) TO STDOUT, CSV, | gzip -6 ..."
s=$(now); psql -q "$DB_URL" -c "COPY ($QUERY) TO STDOUT WITH (FORMAT csv, HEADER)" | gzip -6 >"$OUT/copy.csv.gz"; e=$(now)
copy_gz=$(rate "$s" "$e")

echo "audit-worker export --format csv (gzip) ..."
s=$(now)
/usr/bin/time -v "$BIN" export --format csv --compression gzip \
  --from 2024-03-01 --to 2024-04-01 --out "$OUT/export" >"$OUT/summary.txt" 2>"$OUT/time.txt"
e=$(now)
export_rate=$(rate "$s" "$e")
compare_rate=
if [ -n "${COMPARE_BIN:-}" ]; then
  echo "the same export by $COMPARE_BIN ..."
  s=$(now)
  "$COMPARE_BIN" export --format csv --compression gzip \
    --from 2024-03-01 --to 2024-04-01 --out "$OUT/export-compare" >"$OUT/compare.txt" 2>&1 || { tail -5 "$OUT/compare.txt"; exit 1; }
  e=$(now)
  compare_rate=$(rate "$s" "$e")
fi
rss_kib=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$OUT/time.txt")

echo
echo "rows:                              $ROWS"
echo "COPY TO STDOUT (csv, uncompressed): $copy_raw"
echo "COPY TO STDOUT | gzip -6:           $copy_gz ($(stat -c %s "$OUT/copy.csv.gz") bytes)"
echo "audit-worker export (csv.gz):       $export_rate"
if [ -n "$compare_rate" ]; then echo "COMPARE_BIN export (csv.gz):       $compare_rate"; fi
echo "export peak RSS:                    $((rss_kib / 1024)) MiB ($rss_kib KiB)"
cat "$OUT/summary.txt"

if [ "$PARQUET" = 1 ]; then
  for schema in columns ocsf; do
    echo
    echo "audit-worker export --format parquet --parquet-schema $schema ..."
    s=$(now)
    /usr/bin/time -v "$BIN" export --format parquet --parquet-schema "$schema" \
      --from 2024-03-01 --to 2024-04-01 --out "$OUT/parquet-$schema" >"$OUT/pq-summary.txt" 2>"$OUT/pq-time.txt"
    e=$(now)
    pq_rss=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$OUT/pq-time.txt")
    file=$(ls "$OUT/parquet-$schema"/*.parquet)
    echo "audit-worker export (parquet, $schema): $(rate "$s" "$e") ($(stat -c %s "$file") bytes)"
    echo "export peak RSS:                    $((pq_rss / 1024)) MiB ($pq_rss KiB)"
    if python3 -c 'import pyarrow' 2>/dev/null; then
      python3 -c 'import sys, pyarrow.parquet as pq; m = pq.ParquetFile(sys.argv[1]).metadata; print(f"pyarrow reads {m.num_rows} rows in {m.num_row_groups} row groups")' "$file"
    fi
  done
fi
