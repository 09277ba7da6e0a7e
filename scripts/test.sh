#!/usr/bin/env bash
# Runs the whole test suite against real Redis and PostgreSQL (installed and
# started first when needed): unit tests, integration and fault tests, and
# the Node BullMQ compatibility tests once their project exists.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "test: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
scripts/services.sh
# promtool (tests check /metrics and the alert rules with it) and PyYAML
# (deploy file check).
if ! command -v promtool >/dev/null 2>&1 || ! python3 -c 'import yaml' 2>/dev/null; then
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus python3-yaml >/dev/null
fi
scripts/check-deploy.sh
if [ -f tests/bullmq/package.json ]; then
  command -v npm >/dev/null 2>&1 || { echo "test: npm not found: apt-get install nodejs npm" >&2; exit 1; }
  (cd tests/bullmq && npm ci --no-audit --no-fund --loglevel=error)
fi
cargo test --locked --all-targets "$@"
