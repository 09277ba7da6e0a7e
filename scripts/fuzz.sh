#!/usr/bin/env bash
# Short bounded fuzz run of every target in fuzz/ (FUZZ_SECONDS each,
# default 10), on the stable toolchain: `-s none` builds without sanitizers,
# which need nightly; libFuzzer's coverage instrumentation and Rust's own
# panics and debug assertions (overflow checks) still catch what we look for.
# Installs cargo-fuzz when missing. Exit status: 0 clean, 1 a target found a
# crash (its input is in fuzz/artifacts/<target>/), 3 cargo-fuzz could not be
# installed (the caller may treat that as a skip).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-10}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (once)"
  cargo install cargo-fuzz --locked --version "=$CARGO_FUZZ_VERSION" >/dev/null 2>&1 || {
    echo "fuzz: SKIPPED: cargo install cargo-fuzz failed (no network or no C++ compiler for libFuzzer?)" >&2
    exit 3
  }
fi
targets="${*:-$(cargo fuzz list)}"
for target in $targets; do
  mkdir -p "corpus/$target"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  echo "fuzz: $target for ${seconds}s"
  log="$(mktemp)"
  status=0
  cargo fuzz run -s none "$target" "corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
  # Only the summary lines; libFuzzer's progress lines are noise here.
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)|panicked|SUMMARY|Test unit written|^error' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 30 "$log" >&2
    rm -f "$log"
    echo "fuzz: $target FAILED (exit $status): a crashing input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: all targets ran ${seconds}s without findings"
