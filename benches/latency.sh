#!/usr/bin/env bash
# End-to-end latency at 10% and 50% of the measured maximum rate, with a
# paced producer (see benches/README.md and BENCH_MODE=latency in
# benches/ingest.rs). BENCH_MAX_RATE skips measuring the maximum;
# BENCH_SECONDS sets each paced phase's length.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked --bin audit-worker
BENCH_MODE=latency cargo bench --locked --bench ingest
