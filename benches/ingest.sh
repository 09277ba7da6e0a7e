#!/usr/bin/env bash
# Ingest benchmark: worker (release) vs plain binary COPY; see benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked
cargo bench --locked --bench ingest
