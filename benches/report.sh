#!/usr/bin/env bash
# Compliance report benchmark: wall time and peak RSS of
# `audit-worker report --kind hipaa-audit-trail` over ROWS events (one
# month, five organisations, half PHI, failures, nights and weekends,
# break-glass actions, 5,000 principals: more than report.counter_capacity,
# so the bounded counters evict).
#
# Usage: benches/report.sh            (ROWS=1000000 by default)
# Needs: PostgreSQL and Redis as in scripts/services.sh, psql, GNU time
# (/usr/bin/time). Uses its own schema and Redis keys, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1000000}
KIND=${KIND:-hipaa-audit-trail}
DB_URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_test}
SCHEMA=bench_report_$$
OUT=$(mktemp -d)
BIN=${CARGO_TARGET_DIR:-target}/release/audit-worker

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

cargo build --release --quiet --bin audit-worker
"$BIN" migrate >/dev/null

echo "filling $ROWS rows ..."
psql -q -v ON_ERROR_STOP=1 "$DB_URL" <<SQL
SET search_path = $SCHEMA;
SELECT audit_log_ensure_partition('2024-03-01');
INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
  principal_id, organization_id, target_resource_type, target_resource_id, outcome_description,
  hash, hash_provided, data_classification, retention_policy, source)
SELECT t, to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), 'k-' || g, 'e-' || g,
  CASE WHEN g % 500 = 0 THEN 'emergency.access' ELSE 'record.read.' || (g % 7) END,
  (ARRAY['attempt','success','failure'])[g % 3 + 1],
  'user-' || ((g::bigint * 7919) % 5000), 'org-' || (g % 5), 'Patient', 'p-' || (g % 20000),
  'read chart ' || g, md5(g::text) || md5(g::text), true,
  (ARRAY['PHI','INTERNAL','PHI','CONFIDENTIAL'])[g % 4 + 1],
  (ARRAY['7y','10y'])[g % 2 + 1], 'bench'
FROM generate_series(1, $ROWS) g,
     LATERAL (SELECT timestamptz '2024-03-01 00:00:00+00' + g * (interval '30 days' / $ROWS)) AS x(t);
ANALYZE audit_log;
SQL

echo "audit-worker report --kind $KIND ..."
/usr/bin/time -v "$BIN" report --kind "$KIND" --from 2024-03-01 --to 2024-04-01 \
  --out "$OUT/report" >"$OUT/summary.txt" 2>"$OUT/time.txt"
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { print $2 }' "$OUT/time.txt")
rss_kib=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$OUT/time.txt")

echo
echo "rows in the period:  $ROWS"
echo "report:              $KIND"
echo "wall time:           $wall"
echo "peak RSS:            $((rss_kib / 1024)) MiB ($rss_kib KiB)"
cat "$OUT/summary.txt"
ls -l "$OUT"/report/*/ | awk 'NR > 1 { print "  " $5 " bytes  " $9 }'
