#!/usr/bin/env bash
# BullMQ throughput: COUNT (default 100,000) jobs pre-added by Node's
# bullmq to a queue, then audit-worker (release build) stores them all;
# in the same run, on the same Redis, COUNT jobs pre-added to a second
# queue are consumed by a Node bullmq Worker that does nothing with each
# job (concurrency 100). Prints both rates.
#
#   benches/bullmq_throughput.sh [COUNT]
#
# Environment: REDIS_URL (redis://127.0.0.1:6379), BENCH_DATABASE_URL
# (postgres://postgres@127.0.0.1:5432/audit_worker_bench, created if
# missing), PROFILE=release|debug (debug only to check the script itself).
# Everything it creates (queues, schema) is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-100000}
PROFILE=${PROFILE:-release}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DB_URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_bench}
RUN="$$$(date +%s)"
Q_RUST="bench-audit-worker-$RUN"
Q_NODE="bench-node-noop-$RUN"
SCHEMA="bench_$RUN"
PORT=${BENCH_HTTP_PORT:-3917}
export REDIS_URL

now() { date +%s.%N; }
rows() { psql -qtAX "$DB_URL" -c "SELECT count(*) FROM \"$SCHEMA\".audit_log" 2>/dev/null || echo 0; }
cleanup() {
  [ -n "${WORKER_PID:-}" ] && kill "$WORKER_PID" 2>/dev/null || true
  psql -qX "$DB_URL" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true
  for q in "$Q_RUST" "$Q_NODE"; do
    redis-cli -u "$REDIS_URL" --scan --pattern "bull:$q:*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" DEL >/dev/null
  done
}
trap cleanup EXIT

if [ "$PROFILE" = release ]; then
  cargo build --release --locked --bin audit-worker
  BIN=target/release/audit-worker
else
  cargo build --locked --bin audit-worker
  BIN=target/debug/audit-worker
fi
[ -d tests/bullmq/node_modules ] || (cd tests/bullmq && npm install --no-audit --no-fund --omit-lockfile-registry-resolved --loglevel=error)
psql -qX "${DB_URL%/*}/postgres" -c "CREATE DATABASE \"${DB_URL##*/}\"" >/dev/null 2>&1 || true

echo "pre-adding $COUNT jobs to each of two queues..." >&2
QUEUE="$Q_RUST" COUNT="$COUNT" TAG=bench node tests/bullmq/add.mjs >/dev/null
QUEUE="$Q_NODE" COUNT="$COUNT" TAG=bench node tests/bullmq/add.mjs >/dev/null

echo "audit-worker ($PROFILE) storing $COUNT jobs..." >&2
T0=$(now)
AUDIT_WORKER__REDIS__URL="$REDIS_URL" \
AUDIT_WORKER__DATABASE__URL="$DB_URL" \
AUDIT_WORKER__DATABASE__SCHEMA="$SCHEMA" \
AUDIT_WORKER__STREAM__ENABLED=false \
AUDIT_WORKER__BULLMQ__QUEUES="[\"$Q_RUST\"]" \
AUDIT_WORKER__HTTP__LISTEN="127.0.0.1:$PORT" \
AUDIT_WORKER__LOG__LEVEL=warn \
  "$BIN" run 2>/tmp/bullmq_bench_worker.log &
WORKER_PID=$!
until [ "$(rows)" -ge "$COUNT" ]; do
  kill -0 "$WORKER_PID" 2>/dev/null || { echo "audit-worker exited; see /tmp/bullmq_bench_worker.log" >&2; exit 1; }
  sleep 0.1
done
T1=$(now)
SPAN=$(psql -qtAX "$DB_URL" -c "SELECT extract(epoch FROM max(ingested_at) - min(ingested_at)) FROM \"$SCHEMA\".audit_log")
BATCHES=$(curl -s "127.0.0.1:$PORT/metrics" | awk '/^audit_worker_batch_size_count/ {print $2}')
kill -TERM "$WORKER_PID"; wait "$WORKER_PID" || true; WORKER_PID=

echo "Node bullmq Worker (no-op, concurrency 100) on $COUNT jobs..." >&2
NODE=$(QUEUE="$Q_NODE" MODE=noop CONCURRENCY=100 STOP_AFTER="$COUNT" node tests/bullmq/node_worker.mjs | tail -1)

awk -v n="$COUNT" -v t0="$T0" -v t1="$T1" -v span="$SPAN" -v batches="$BATCHES" -v node="$NODE" 'BEGIN {
  wall = t1 - t0;
  match(node, /"jobsPerSecond":[0-9.]+/); nrate = substr(node, RSTART + 16, RLENGTH - 16);
  match(node, /"seconds":[0-9.]+/); nsec = substr(node, RSTART + 10, RLENGTH - 10);
  printf "jobs: %d per queue\n", n;
  printf "audit-worker, queue to committed rows, from process start (incl. start-up): %.0f jobs/s (%.2f s)\n", n / wall, wall;
  printf "audit-worker, first to last commit: %.0f jobs/s (%.2f s, %d batches)\n", n / span, span, batches;
  printf "Node bullmq Worker, no-op, concurrency 100, first job to last completion: %.0f jobs/s (%.2f s)\n", nrate, nsec;
}'
