#!/usr/bin/env bash
# Every benchmark figure in one go: runs the benchmarks one after another
# (each against its own reference in the same run) and prints each ratio
# on a line of its own at the end. Full outputs are kept in $BENCH_LOG_DIR
# (default: a fresh temporary directory). Takes a quiet machine and a
# while (about 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
logs="${BENCH_LOG_DIR:-$(mktemp -d)}"
mkdir -p "$logs"
run() { # name command...
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" 2>&1 | tee "$logs/$name.log" >&2
}
run ingest benches/ingest.sh
run latency benches/latency.sh
run bullmq benches/bullmq_throughput.sh "${BULLMQ_JOBS:-100000}"
run export benches/export.sh
echo
echo "== figures (full logs in $logs)"
grep -h '^ratio worker/COPY' "$logs/ingest.log" | sed 's/^/stream ingest: /'
grep -h '^worker peak RSS' "$logs/ingest.log" | sed 's/^/stream ingest: /'
grep -h '^latency at' "$logs/latency.log"
grep -h '^ratios:' "$logs/bullmq.log" | sed 's/^/BullMQ: /'
grep -h '^CPU-seconds' "$logs/bullmq.log" | sed 's/^/BullMQ: /'
awk '/^COPY TO STDOUT \| gzip -6:/ {for (i = 1; i <= NF; i++) if ($i == "rows/s") copy = $(i - 1)}
     /^audit-worker export \(csv.gz\):/ {for (i = 1; i <= NF; i++) if ($i == "rows/s") ours = $(i - 1); csv = 1}
     /^export peak RSS:/ && csv {rss = $0; csv = 0}
     END {if (copy > 0) printf "export: ratio audit-worker / (COPY | gzip -6): %.2f (%s vs %s rows/s); %s\n", ours / copy, ours, copy, rss}' "$logs/export.log"
