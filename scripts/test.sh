#!/usr/bin/env bash
# Runs the whole test suite against real Redis and PostgreSQL (installed and
# started first when needed): unit tests, integration and fault tests, and
# the Node BullMQ compatibility tests once their project exists.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "test: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
# Formatting and lints first: cheap, and a failure there needs no services.
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
scripts/services.sh
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
# promtool (tests check /metrics and the alert rules with it) and PyYAML
# (deploy file check).
if ! command -v promtool >/dev/null 2>&1 || ! python3 -c 'import yaml' 2>/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus python3-yaml >/dev/null
fi
scripts/check-deploy.sh
# schemathesis, pinned, in a virtual environment of its own (Debian's
# python3 refuses system-wide pip installs): tests/it/api.rs runs it against
# the live HTTP API and its generated OpenAPI document.
SCHEMATHESIS_VERSION=4.32.5
st_venv="${CARGO_TARGET_DIR:-$PWD/target}/pytools"
if [ "$("$st_venv/bin/st" --version 2>/dev/null | awk '{print $NF}')" != "$SCHEMATHESIS_VERSION" ]; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$st_venv"
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
export SCHEMATHESIS="$st_venv/bin/st"
# Headless Chromium: the compliance report tests open the HTML reports in a
# real browser (screenshot, DOM, console). Debian's package, no download.
if ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing chromium (report HTML tests)" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
# Python packages of the independent checkers, pinned: pyarrow reads the
# Parquet exports back (tests/parquet_reader.py), cryptography checks the
# Ed25519 signatures in scripts/verify_log.py. pip comes from apt when
# missing; Debian's python3 is "externally managed" (PEP 668), so pip needs
# --break-system-packages there (older pips do not know the flag), and a
# user that is not root installs into its user site.
py_require() { # <module = package> <version> <what for>
  if python3 -c "import sys, $1; sys.exit($1.__version__ != '$2')" 2>/dev/null; then return; fi
  echo "test: installing $1 $2 ($3)" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  pip_install() { PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "$@"; }
  pip_install --break-system-packages "$1==$2" 2>/dev/null || pip_install "$1==$2" 2>/dev/null \
    || pip_install --user --break-system-packages "$1==$2"
}
py_require pyarrow 26.0.1 "export format tests"
py_require cryptography 48.0.0 "the independent log verifier"
if [ -f tests/bullmq/package.json ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "test: installing nodejs and npm (BullMQ compatibility tests)" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  # `npm install` with the committed lock file (exact versions): `npm ci`
  # refuses this lock under npm 11 because of msgpackr's optional
  # per-platform packages, which the lock leaves out.
  (cd tests/bullmq && npm install --no-audit --no-fund --omit-lockfile-registry-resolved --loglevel=error)
fi
cargo test --locked --all-targets "$@"
# Short bounded fuzz run (FUZZ_SECONDS per target, default 10); a machine
# where cargo-fuzz cannot be installed skips it with a clear line.
if [ "${SKIP_FUZZ:-0}" = 1 ]; then
  echo "test: fuzzing SKIPPED (SKIP_FUZZ=1)"
else
  fuzz_status=0
  scripts/fuzz.sh || fuzz_status=$?
  if [ "$fuzz_status" -eq 3 ]; then
    echo "test: fuzzing SKIPPED: cargo-fuzz is not installable here"
  elif [ "$fuzz_status" -ne 0 ]; then
    exit "$fuzz_status"
  fi
fi
