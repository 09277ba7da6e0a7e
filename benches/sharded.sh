#!/usr/bin/env bash
# Sharded stream ingest on a three-master Redis Cluster (see
# benches/README.md, "Redis Cluster: sharded stream ingest"): events per
# second from pre-filled shards to committed rows, for 1, 2 and 4 shards
# and 1 and 3 worker processes. The cluster comes up on loopback ports with
# scripts/redis-topology.sh for each run and goes down after it.
#   BENCH_EVENTS  events per run (100000)
#   AUDIT_WORKER_BIN  the worker binary (target/release/audit-worker)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
if [ -z "${AUDIT_WORKER_BIN:-}" ]; then cargo build --release --locked; fi
for shards in 1 2 4; do
  for workers in 1 3; do
    out=$(BENCH_MODE=sharded BENCH_SHARDS=$shards BENCH_WORKERS=$workers \
      cargo bench --locked --bench ingest 2>&1) || { echo "$out" | tail -40 >&2; exit 1; }
    echo "$out" | grep '^sharded:'
  done
done
