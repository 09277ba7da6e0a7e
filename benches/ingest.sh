#!/usr/bin/env bash
# Ingest benchmarks (see benches/README.md):
#   benches/ingest.sh                   worker vs plain binary COPY, peak RSS
#   BENCH_MODE=drain benches/ingest.sh  recovery after a database outage
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked
cargo bench --locked --bench ingest
