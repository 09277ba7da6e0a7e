#!/usr/bin/env bash
# BullMQ throughput: COUNT (default 100,000) jobs pre-added by Node's
# bullmq to a queue, then audit-worker (release build) stores them all;
# in the same run, on the same Redis, COUNT jobs pre-added to a second
# queue are consumed by a Node bullmq Worker that does nothing with each
# job (concurrency 100), and COUNT jobs on a third queue by a Worker of
# bullmq-official, the crate the BullMQ source is built on, that does
# nothing either (benches/bullmq_crate_noop.rs; CRATE_CONCURRENCY, default
# 100). Prints the three rates, and CPU-seconds per 100,000 jobs for each
# consumer, Redis and (during audit-worker's run) PostgreSQL.
#
#   benches/bullmq_throughput.sh [COUNT]
#
# Environment: REDIS_URL (redis://127.0.0.1:6379), BENCH_DATABASE_URL
# (postgres://postgres@127.0.0.1:5432/audit_worker_bench, created if
# missing), PROFILE=release|debug (debug only to check the script itself),
# AUDIT_WORKER_BIN (a worker binary to use instead of building one).
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
Q_CRATE="bench-crate-noop-$RUN"
SCHEMA="bench_$RUN"
PORT=${BENCH_HTTP_PORT:-3917}
export REDIS_URL
# The Node scripts read PREFIX; pin it to the worker's default, since some
# tools (perf, for one) export PREFIX to the commands they run.
export PREFIX=bull

now() { date +%s.%N; }
# CPU-seconds, the noisy machine's steadier measure: Redis's own counters,
# a running process's from /proc, a finished command's from `times`.
CLK=$(getconf CLK_TCK)
redis_cpu() { redis-cli -u "$REDIS_URL" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.2f", s}'; }
proc_cpu() { awk -v clk="$CLK" '{printf "%.2f", ($14 + $15) / clk}' "/proc/$1/stat"; }
pg_cpu() {
  local pid total=0
  for pid in $(pgrep -x postgres || pgrep -f '^postgres'); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  awk -v t="$total" -v clk="$CLK" 'BEGIN {printf "%.2f", t / clk}'
}
TIMES=$(mktemp)
# `times` must not run in a pipeline (a subshell has no children of its own).
children_cpu() { times >"$TIMES"; tail -1 "$TIMES" | awk '{gsub(/[ms]/, " "); printf "%.2f", $1 * 60 + $2 + $3 * 60 + $4}'; }
rows() { psql -qtAX "$DB_URL" -c "SELECT count(*) FROM \"$SCHEMA\".audit_log" 2>/dev/null || echo 0; }
cleanup() {
  rm -f "$TIMES"
  [ -n "${WORKER_PID:-}" ] && kill "$WORKER_PID" 2>/dev/null || true
  psql -qX "$DB_URL" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true
  for q in "$Q_RUST" "$Q_NODE" "$Q_CRATE"; do
    redis-cli -u "$REDIS_URL" --scan --pattern "bull:$q:*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" DEL >/dev/null
  done
}
trap cleanup EXIT

if [ -n "${AUDIT_WORKER_BIN:-}" ]; then
  # A binary built elsewhere (say with --no-default-features, to compare
  # allocators); the crate's no-op worker is still built here.
  BIN=$AUDIT_WORKER_BIN
  cargo bench --locked --bench bullmq_crate_noop --no-run
elif [ "$PROFILE" = release ]; then
  cargo build --release --locked --bin audit-worker
  BIN="${CARGO_TARGET_DIR:-target}/release/audit-worker"
  cargo bench --locked --bench bullmq_crate_noop --no-run
else
  cargo build --locked --bin audit-worker
  BIN=target/debug/audit-worker
fi
[ -d tests/bullmq/node_modules ] || (cd tests/bullmq && npm install --no-audit --no-fund --omit-lockfile-registry-resolved --loglevel=error)
psql -qX "${DB_URL%/*}/postgres" -c "CREATE DATABASE \"${DB_URL##*/}\"" >/dev/null 2>&1 || true

echo "pre-adding $COUNT jobs to each of three queues..." >&2
QUEUE="$Q_RUST" COUNT="$COUNT" TAG=bench node tests/bullmq/add.mjs >/dev/null
QUEUE="$Q_NODE" COUNT="$COUNT" TAG=bench node tests/bullmq/add.mjs >/dev/null
QUEUE="$Q_CRATE" COUNT="$COUNT" TAG=bench node tests/bullmq/add.mjs >/dev/null

echo "audit-worker ($PROFILE) storing $COUNT jobs..." >&2
T0=$(now)
R0=$(redis_cpu)
P0=$(pg_cpu)
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
  sleep 0.5  # count(*) costs PostgreSQL CPU: poll gently (the commit span below is exact)
done
T1=$(now)
R1=$(redis_cpu)
P1=$(pg_cpu)
W_CPU=$(proc_cpu "$WORKER_PID")
SPAN=$(psql -qtAX "$DB_URL" -c "SELECT extract(epoch FROM max(ingested_at) - min(ingested_at)) FROM \"$SCHEMA\".audit_log")
BATCHES=$(curl -s "127.0.0.1:$PORT/metrics" | awk '/^audit_worker_batch_size_count/ {print $2}')
kill -TERM "$WORKER_PID"; wait "$WORKER_PID" || true; WORKER_PID=

echo "Node bullmq Worker (no-op, concurrency 100) on $COUNT jobs..." >&2
R2=$(redis_cpu)
NODE=$(QUEUE="$Q_NODE" MODE=noop CONCURRENCY=100 STOP_AFTER="$COUNT" node tests/bullmq/node_worker.mjs | tail -1; children_cpu)
R3=$(redis_cpu)

CRATE_CONCURRENCY=${CRATE_CONCURRENCY:-100}
echo "bullmq-official Worker (no-op, concurrency $CRATE_CONCURRENCY) on $COUNT jobs..." >&2
CRATE_BIN=$(cargo bench --locked --bench bullmq_crate_noop --no-run --message-format=json 2>/dev/null | grep '"name":"bullmq_crate_noop"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
R4=$(redis_cpu)
CRATE=$(QUEUE="$Q_CRATE" CONCURRENCY="$CRATE_CONCURRENCY" STOP_AFTER="$COUNT" "$CRATE_BIN" | tail -1; children_cpu)
R5=$(redis_cpu)

awk -v n="$COUNT" -v t0="$T0" -v t1="$T1" -v span="$SPAN" -v batches="$BATCHES" -v node="$NODE" -v crate="$CRATE" -v cc="$CRATE_CONCURRENCY" \
  -v wcpu="$W_CPU" -v pg="$(awk -v a="$P0" -v b="$P1" 'BEGIN {print b - a}')" -v r0="$R0" -v r1="$R1" -v r2="$R2" -v r3="$R3" -v r4="$R4" -v r5="$R5" 'BEGIN {
  rw = r1 - r0; rn = r3 - r2; rc = r5 - r4;
  wall = t1 - t0;
  match(node, /"jobsPerSecond":[0-9.]+/); nrate = substr(node, RSTART + 16, RLENGTH - 16);
  match(node, /"seconds":[0-9.]+/); nsec = substr(node, RSTART + 10, RLENGTH - 10);
  printf "jobs: %d per queue\n", n;
  printf "audit-worker, queue to committed rows, from process start (incl. start-up): %.0f jobs/s (%.2f s)\n", n / wall, wall;
  printf "audit-worker, first to last commit: %.0f jobs/s (%.2f s, %d batches)\n", n / span, span, batches;
  printf "Node bullmq Worker, no-op, concurrency 100, first job to last completion: %.0f jobs/s (%.2f s)\n", nrate, nsec;
  match(crate, /"jobsPerSecond":[0-9.]+/); crate_rate = substr(crate, RSTART + 16, RLENGTH - 16);
  match(crate, /"seconds":[0-9.]+/); crate_sec = substr(crate, RSTART + 10, RLENGTH - 10);
  printf "bullmq-official Worker, no-op, concurrency %d, first job to last completion: %.0f jobs/s (%.2f s)\n", cc, crate_rate, crate_sec;
  split(node, nl, "\n"); split(crate, cl, "\n");
  per = 100000 / n;
  printf "CPU-seconds per 100,000 jobs (process + Redis): audit-worker %.2f + %.2f (and PostgreSQL %.2f); Node no-op %.2f + %.2f; crate no-op %.2f + %.2f\n", wcpu * per, rw * per, pg * per, nl[2] * per, rn * per, cl[2] * per, rc * per;
  printf "ratios: audit-worker (first to last commit) / Node no-op %.2f, / crate no-op %.2f; crate no-op / Node no-op %.2f\n", (n / span) / nrate, (n / span) / crate_rate, crate_rate / nrate;
}'
