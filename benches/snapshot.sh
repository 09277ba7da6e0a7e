#!/usr/bin/env bash
# Snapshot benchmark: seconds and peak RSS to seal N events (default
# 1,000,000) into the signed Merkle log, to verify them (all, and
# incrementally after one more hour's snapshot), and to prove one event;
# with PROVE_AT_10X=1, the log then grows to 10 N and `prove` is timed
# again (proofs come from stored tiles, so the time should not grow).
#
# Usage: benches/snapshot.sh [N]
# Needs: PostgreSQL (AUDIT_WORKER_BENCH_DATABASE_URL, default the local
# audit_worker_bench database, created if missing), /usr/bin/time, and a
# release build (built here unless AUDIT_WORKER_BIN names one).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
BASE="${AUDIT_WORKER_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_bench}"
SCHEMA="bench_snapshot_$$"
WORK="$(mktemp -d)"
trap 'psql -q "$BASE" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

psql -q "${BASE%/*}/postgres" -c "CREATE DATABASE ${BASE##*/}" >/dev/null 2>&1 || true
if [ -n "${AUDIT_WORKER_BIN:-}" ]; then
  BIN="$AUDIT_WORKER_BIN"
else
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/audit-worker"
fi

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

START=$(date -u -d '30 days ago' +%Y-%m-%dT%H:%M:%SZ)
# The time just after event $1 - 1 (the end of a snapshot holding events
# below $1).
until_event() { date -u -d "$START + $(( $1 / 100 )) seconds" +%Y-%m-%dT%H:%M:%SZ; }
# Inserts events $1 .. $2-1 (canonical hash v1 computed in SQL), each with
# salts for its two personal fields, as the worker stores them; event g is
# g * 10 ms after $START, 30 days ago (10 million events span 28 hours).
seed() {
  psql -q "$BASE" <<SQL
SET search_path = "$SCHEMA";
SELECT audit_log_ensure_partition(d::date)
  FROM generate_series(date_trunc('month', now() - interval '31 days'), now(), interval '1 month') d;
WITH ins AS (
INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
       principal_id, organization_id, target_resource_type, target_resource_id,
       outcome_description, hash, hash_provided, source)
SELECT t, raw, key, key, 'record.read', 'success', 'user-' || (g % 100), 'org-1', 'Patient', 'p-' || g, 'read ' || g,
       encode(sha256(convert_to('action:"record.read"|organizationId:"org-1"|outcomeDescription:"read ' || g
         || '"|principalId:"user-' || (g % 100) || '"|status:"success"|targetResourceId:"p-' || g
         || '"|targetResourceType:"Patient"|timestamp:"' || raw || '"', 'UTF8')), 'hex'), true, 'bench'
  FROM generate_series($1, $2 - 1) g,
       LATERAL (SELECT '$START'::timestamptz + g * interval '10 milliseconds' AS t) a,
       LATERAL (SELECT to_char(a.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw, 'evt-' || g AS key) b
RETURNING id)
INSERT INTO audit_salts (audit_id, salts)
SELECT id, jsonb_build_object('principalId', md5(id::text) || md5((id + 1)::text),
                              'targetResourceId', md5((id + 2)::text) || md5((id + 3)::text))
  FROM ins;
VACUUM ANALYZE audit_log;
VACUUM ANALYZE audit_salts;
SQL
}
# The wall seconds of one run of `$BIN "$@"` (output discarded).
timed() {
  local t0 t1
  t0=$(date +%s%N); "$BIN" "$@" >/dev/null; t1=$(date +%s%N)
  echo "scale=4; ($t1 - $t0) / 1000000000" | bc
}
# Median wall time of 21 `prove` runs of random events below $1.
prove_median() {
  local n=$1 times=()
  for _ in $(seq 21); do times+=("$(timed prove "evt-$(( (RANDOM * 32768 + RANDOM) % n ))")"); done
  printf '%s\n' "${times[@]}" | sort -n | sed -n 11p
}

echo "inserting $N events with salts..."
seed 0 "$N"

echo "== snapshot (seal $N events)"
/usr/bin/time -v "$BIN" snapshot --to "$(until_event "$N")" > "$WORK/manifest.json" 2> "$WORK/snapshot.time" || { cat "$WORK/snapshot.time"; exit 1; }
grep -E '"recordCount"|"treeSize"' "$WORK/manifest.json" || true
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/snapshot.time"
echo "== verify (all $N)"
/usr/bin/time -v "$BIN" verify > "$WORK/verify.out" 2> "$WORK/verify.time" || { cat "$WORK/verify.out" "$WORK/verify.time"; exit 1; }
tail -1 "$WORK/verify.out"
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/verify.time"
echo "== prove (one event; median of 21 runs, each a whole process: start, connect, proof from tiles, check)"
/usr/bin/time -v "$BIN" prove evt-12345 > /dev/null 2> "$WORK/prove.time"
grep -E 'Maximum resident' "$WORK/prove.time"
echo "prove median at $N leaves: $(prove_median "$N") s"

HOUR=360000 # events of one hour at 100 events/s
echo "== one more hour ($HOUR events): seal, then verify only what it added"
seed "$N" $((N + HOUR))
/usr/bin/time -v "$BIN" snapshot --to "$(until_event $((N + HOUR)))" > /dev/null 2> "$WORK/snapshot2.time"
grep -E 'Elapsed \(wall' "$WORK/snapshot2.time"
/usr/bin/time -v "$BIN" verify --since "$N" > "$WORK/verify2.out" 2> "$WORK/verify2.time" || { cat "$WORK/verify2.out"; exit 1; }
tail -1 "$WORK/verify2.out"
grep -E 'Elapsed \(wall|Maximum resident' "$WORK/verify2.time"
echo "== a scheduled seal with nothing new (late events looked for among the arrivals since the last seal, not the whole log)"
/usr/bin/time -v "$BIN" snapshot --to "$(until_event $((N + HOUR)))" > /dev/null 2> "$WORK/snapshot_empty.time"
grep -E 'Elapsed \(wall' "$WORK/snapshot_empty.time"

if [ "${PROVE_AT_10X:-0}" = 1 ]; then
  TOTAL=$((N * 10))
  echo "== growing the log to $TOTAL leaves"
  step=$N
  from=$((N + HOUR))
  while [ "$from" -lt "$TOTAL" ]; do
    to=$((from + step)); [ "$to" -gt "$TOTAL" ] && to=$TOTAL
    seed "$from" "$to"
    from=$to
  done
  /usr/bin/time -v "$BIN" snapshot > /dev/null 2> "$WORK/snapshot3.time"
  grep -E 'Elapsed \(wall' "$WORK/snapshot3.time"
  echo "prove median at $TOTAL leaves: $(prove_median "$TOTAL") s"
fi
