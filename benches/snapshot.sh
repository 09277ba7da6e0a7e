#!/usr/bin/env bash
# Snapshot benchmark: seconds and peak RSS to seal N events (default
# 1,000,000) into the signed Merkle log, and to verify them.
#
# Usage: benches/snapshot.sh [N]
# Needs: PostgreSQL (AUDIT_WORKER_BENCH_DATABASE_URL, default the local
# audit_worker_bench database, created if missing), Redis for the creation
# event (optional), /usr/bin/time, and a release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
BASE="${AUDIT_WORKER_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_bench}"
SCHEMA="bench_snapshot_$$"
WORK="$(mktemp -d)"
trap 'psql -q "$BASE" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

psql -q "${BASE%/*}/postgres" -c "CREATE DATABASE ${BASE##*/}" >/dev/null 2>&1 || true
cargo build --release --quiet
BIN=target/release/audit-worker

export AUDIT_WORKER__DATABASE__URL="$BASE"
export AUDIT_WORKER__DATABASE__SCHEMA="$SCHEMA"
export AUDIT_WORKER__STORAGE__URL="$WORK/artifacts"
export AUDIT_WORKER__STREAM__KEY="bench:$SCHEMA:events"
export AUDIT_WORKER__DLQ__KEY="bench:$SCHEMA:dlq"
export AUDIT_WORKER__LOG__LEVEL=warn
"$BIN" keygen --name bench.example/log --out "$WORK/key" >/dev/null 2>&1
export AUDIT_WORKER__SNAPSHOT__SIGNING_KEY_FILE="$WORK/key"
export AUDIT_WORKER__SNAPSHOT__ORIGIN=bench.example/log
chmod 600 "$WORK/key"
"$BIN" migrate >/dev/null

echo "inserting $N events (canonical hash computed in SQL)..."
psql -q "$BASE" <<SQL
SET search_path = "$SCHEMA";
SELECT audit_log_ensure_partition(d::date)
  FROM generate_series(date_trunc('month', now() - interval '1 day'), now(), interval '1 month') d;
INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
       principal_id, organization_id, target_resource_type, target_resource_id,
       outcome_description, hash, hash_provided, source)
SELECT t, raw, key, key, 'record.read', 'success', 'user-' || (g % 100), 'org-1', 'Patient', 'p-' || g, 'read ' || g,
       encode(sha256(convert_to('action:"record.read"|organizationId:"org-1"|outcomeDescription:"read ' || g
         || '"|principalId:"user-' || (g % 100) || '"|status:"success"|targetResourceId:"p-' || g
         || '"|targetResourceType:"Patient"|timestamp:"' || raw || '"', 'UTF8')), 'hex'), true, 'bench'
  FROM generate_series(0, $N - 1) g,
       LATERAL (SELECT now() - interval '20 hours' + g * interval '10 milliseconds' AS t) a,
       LATERAL (SELECT to_char(a.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw, 'evt-' || g AS key) b;
VACUUM ANALYZE audit_log;
SQL

echo "== snapshot"
/usr/bin/time -v "$BIN" snapshot > "$WORK/manifest.json" 2> "$WORK/snapshot.time" || { cat "$WORK/snapshot.time"; exit 1; }
grep -E '"recordCount"|"treeSize"' "$WORK/manifest.json"
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/snapshot.time"
echo "== verify"
/usr/bin/time -v "$BIN" verify > "$WORK/verify.out" 2> "$WORK/verify.time" || { cat "$WORK/verify.out" "$WORK/verify.time"; exit 1; }
tail -1 "$WORK/verify.out"
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/verify.time"
echo "== prove (one event)"
/usr/bin/time -v "$BIN" prove evt-12345 > /dev/null 2> "$WORK/prove.time"
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/prove.time"
