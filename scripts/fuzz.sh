#!/usr/bin/env bash
# Fuzzing (README "Fuzzing"): runs every cargo-fuzz target of fuzz/ for a while and fails on the
# first crash of any of them.
#
# Usage: scripts/fuzz.sh [seconds-per-target=20] [target ...]
#   targets: record_assembly collector_chunking headers (default: all)
# Env: FUZZ_TARGET_DIR   where the instrumented build goes (default ~/.cache/scoretap/fuzz-target;
#                        never CARGO_TARGET_DIR, whose sanitizer-free build it would thrash)
#      FUZZ_SANITIZER    address (default) or none
#      FUZZ_JOBS         libFuzzer processes per target (default 1)
# Only a stable toolchain is at hand: RUSTC_BOOTSTRAP=1 lets it take the nightly flags cargo-fuzz
# passes. cargo-fuzz is installed when missing. The corpus grows in fuzz/corpus/<target> (not
# committed), starting from the committed seeds in fuzz/seeds/<target>; a crash is saved in
# fuzz/artifacts/<target>/ and reproduced with
#   RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=~/.cache/scoretap/fuzz-target cargo fuzz run -O <target> <file>
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-20}
shift $(( $# < 1 ? $# : 1 ))
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(record_assembly collector_chunking headers)

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/scoretap/fuzz-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
SANITIZER=${FUZZ_SANITIZER:-address}
JOBS=${FUZZ_JOBS:-1}
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

cd fuzz
mkdir -p "$CARGO_TARGET_DIR/fuzz-logs"
echo "==> cargo fuzz build -O --sanitizer $SANITIZER (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
if ! cargo fuzz build -O --sanitizer "$SANITIZER" >"$CARGO_TARGET_DIR/fuzz-logs/build.log" 2>&1; then
  tail -n 60 "$CARGO_TARGET_DIR/fuzz-logs/build.log"
  echo "fuzz: the build failed"
  exit 1
fi

passed=0; failed=0
for target in "${TARGETS[@]}"; do
  mkdir -p "corpus/$target" "seeds/$target"
  log="$CARGO_TARGET_DIR/fuzz-logs/$target.log"
  echo "==> $target for ${SECONDS_PER_TARGET}s (log: $log)"
  status=0
  # -rss_limit_mb: bodies reach 300 KiB, records are parsed back; -timeout: one input, seconds.
  cargo fuzz run -O --sanitizer "$SANITIZER" --jobs "$JOBS" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=60 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1 | grep -Eo '[0-9]+' || true)
  corpus=$(find "corpus/$target" -type f | wc -l)
  if ((status == 0)); then
    passed=$((passed + 1))
    printf '%s: ok, %s runs, cov %s, corpus %s inputs\n' "$target" "${runs:-?}" "${cov:-?}" "$corpus"
  else
    failed=$((failed + 1))
    printf '%s: FAILED (exit %s), %s runs; the end of its log:\n' "$target" "$status" "${runs:-?}"
    grep -v '^ *#[0-9]' "$log" | tail -n 40
  fi
done
echo
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
