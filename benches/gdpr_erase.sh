#!/usr/bin/env bash
# GDPR erasure benchmark: the wall time of `audit-worker gdpr erase` for a
# subject with SUBJECT_EVENTS events (default 100,000) among N (default
# 1,000,000), sealed first. Every event carries four personal values
# (principal, target, IP address, user agent) with their salts, as the
# worker stores them; the subject is the principal of every tenth event.
# SEAL=0 skips sealing (the erasure does the same work on unsealed rows).
# Then `verify` checks the log (VERIFY=0 skips it; needs SEAL=1) and lists
# the erased events. KEEP_SCHEMA=1 keeps the schema (and its rows) for a
# look in SQL afterwards; ERASE=0 stops before the erasure.
#
# Usage: benches/gdpr_erase.sh [N] [SUBJECT_EVENTS]
# Needs: PostgreSQL (AUDIT_WORKER_BENCH_DATABASE_URL, default the local
# audit_worker_bench database, created if missing), Redis (REDIS_URL,
# default redis://127.0.0.1:6379), /usr/bin/time, and a release build
# (built here unless AUDIT_WORKER_BIN names one). Its schema, Redis keys
# and files are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
SUBJECT_EVENTS="${2:-100000}"
EVERY=$(( N / SUBJECT_EVENTS ))
BASE="${AUDIT_WORKER_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_bench}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
SCHEMA="bench_erase_$$"
WORK="$(mktemp -d)"
cleanup() {
  if [ -n "${KEEP_SCHEMA:-}" ]; then
    echo "schema $SCHEMA kept (KEEP_SCHEMA); drop it with: psql $BASE -c 'DROP SCHEMA \"$SCHEMA\" CASCADE'"
  else
    psql -q "$BASE" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true
  fi
  redis-cli -u "$REDIS_URL" DEL "bench:$SCHEMA:events" "bench:$SCHEMA:dlq" "bench:$SCHEMA:alerts" \
    "bench:$SCHEMA:notifications" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql -q "${BASE%/*}/postgres" -c "CREATE DATABASE ${BASE##*/}" >/dev/null 2>&1 || true
if [ -n "${AUDIT_WORKER_BIN:-}" ]; then
  BIN="$AUDIT_WORKER_BIN"
else
  cargo build --release --locked --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/audit-worker"
fi

export AUDIT_WORKER__REDIS__URL="$REDIS_URL"
export AUDIT_WORKER__DATABASE__URL="$BASE"
export AUDIT_WORKER__DATABASE__SCHEMA="$SCHEMA"
export AUDIT_WORKER__STORAGE__URL="$WORK/artifacts"
export AUDIT_WORKER__STREAM__KEY="bench:$SCHEMA:events"
export AUDIT_WORKER__DLQ__KEY="bench:$SCHEMA:dlq"
export AUDIT_WORKER__ALERTS__STREAM="bench:$SCHEMA:alerts"
export AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY="bench:$SCHEMA:notifications"
export AUDIT_WORKER__LOG__LEVEL="${LOG_LEVEL:-warn}"
export AUDIT_WORKER__GDPR__PSEUDONYM_KEY="bench-pseudonym-key-$(date +%s%N)"
"$BIN" keygen --name bench.example/log --out "$WORK/key" >/dev/null 2>&1
chmod 600 "$WORK/key"
export AUDIT_WORKER__SNAPSHOT__SIGNING_KEY_FILE="$WORK/key"
export AUDIT_WORKER__SNAPSHOT__ORIGIN=bench.example/log
"$BIN" migrate >/dev/null

START=$(date -u -d '20 days ago' +%Y-%m-%dT%H:%M:%SZ)
echo "inserting $N events (the subject's: every ${EVERY}th) with 4 salted personal values each..."
psql -q "$BASE" <<SQL
SET search_path = "$SCHEMA";
SELECT audit_log_ensure_partition(d::date)
  FROM generate_series(date_trunc('month', now() - interval '21 days'), now(), interval '1 month') d;
WITH ins AS (
INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
       principal_id, organization_id, target_resource_type, target_resource_id,
       outcome_description, hash, hash_provided, source, session_context)
SELECT t, raw, key, key, 'record.read', 'success', p, 'org-1', 'Patient', 'p-' || g, 'read ' || g,
       encode(sha256(convert_to('action:"record.read"|organizationId:"org-1"|outcomeDescription:"read ' || g
         || '"|principalId:"' || p || '"|status:"success"|targetResourceId:"p-' || g
         || '"|targetResourceType:"Patient"|timestamp:"' || raw || '"', 'UTF8')), 'hex'), true, 'bench',
       jsonb_build_object('sessionId', 's-' || g, 'ipAddress', '10.1.' || (g % 200) || '.' || (g % 250),
                          'userAgent', 'agent/' || (g % 50))
  FROM generate_series(0, $N - 1) g,
       LATERAL (SELECT '$START'::timestamptz + g * interval '10 milliseconds' AS t,
                       CASE WHEN g % $EVERY = 0 THEN 'subject@bench.example' ELSE 'user-' || (g % 1000) END AS p) a,
       LATERAL (SELECT to_char(a.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw, 'evt-' || g AS key) b
RETURNING id)
INSERT INTO audit_salts (audit_id, salts)
SELECT id, jsonb_build_object('principalId', md5(id::text) || md5((id + 1)::text),
                              'targetResourceId', md5((id + 2)::text) || md5((id + 3)::text),
                              'sessionContext.ipAddress', md5((id + 4)::text) || md5((id + 5)::text),
                              'sessionContext.userAgent', md5((id + 6)::text) || md5((id + 7)::text))
  FROM ins;
VACUUM ANALYZE audit_log;
VACUUM ANALYZE audit_salts;
SQL

if [ "${SEAL:-1}" = 1 ]; then
  echo "== snapshot (seal $N events)"
  /usr/bin/time -f '%e s' "$BIN" snapshot > /dev/null 2> "$WORK/snapshot.time" || { cat "$WORK/snapshot.time"; exit 1; }
  tail -1 "$WORK/snapshot.time"
fi

[ "${ERASE:-1}" = 1 ] || exit 0
echo "== gdpr erase (a subject with $SUBJECT_EVENTS of $N events; one whole process)"
/usr/bin/time -v "$BIN" gdpr erase subject@bench.example > "$WORK/erase.out" 2> "$WORK/erase.time" \
  || { cat "$WORK/erase.out" "$WORK/erase.time"; exit 1; }
cat "$WORK/erase.out"
wall=$(awk -F': ' '/Elapsed \(wall/ {print $2}' "$WORK/erase.time")
grep -E "Maximum resident" "$WORK/erase.time"; grep -h "erasure: " "$WORK/erase.time" || true
echo "erasure of $SUBJECT_EVENTS events among $N: wall $wall (m:ss)"

if [ "${VERIFY:-1}" = 1 ] && [ "${SEAL:-1}" = 1 ]; then
  echo "== verify (all $N, erased events listed)"
  /usr/bin/time -f '%e s' "$BIN" verify > "$WORK/verify.out" 2> "$WORK/verify.time" \
    || { tail -5 "$WORK/verify.out"; cat "$WORK/verify.time"; exit 1; }
  tail -1 "$WORK/verify.out"
  tail -1 "$WORK/verify.time"
fi
