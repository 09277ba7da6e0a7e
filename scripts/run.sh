#!/usr/bin/env bash
# Starts audit-worker against local Redis and PostgreSQL, installing and
# starting them first when needed. Extra arguments go to `audit-worker run`
# (e.g. --config my.toml). Migrations are applied at start.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "run: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
scripts/services.sh
cargo build --release --locked
# Without a configuration file this is a development run: let the worker
# make (once) and use a development snapshot signing key under
# ~/.local/share/audit-worker/ when none is configured, so `audit.snapshot`
# jobs work out of the box. Never with --config.
case " $* " in
  *" --config"*) ;;
  *) export AUDIT_WORKER__SNAPSHOT__DEV_SIGNING_KEY="${AUDIT_WORKER__SNAPSHOT__DEV_SIGNING_KEY:-true}" ;;
esac
exec "${CARGO_TARGET_DIR:-target}/release/audit-worker" run "$@"
