#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run):
#   1. scripts/install-test-deps.sh   (real servers and clients the end-to-end tests use)
#   2. cargo fmt --check, cargo clippy -D warnings
#   3. cargo build --workspace --bins  (the e2e tests run the built scoretap binary)
#   4. cargo test --workspace
#   5. scripts/fuzz.sh 20              (a short fuzzing run of every target)
# Builds go to CARGO_TARGET_DIR, by default ~/.cache/scoretap/target, outside the clone, so
# repeated CI runs in fresh clones reuse the build.
#
# Every argument is passed on to `cargo test --workspace`, e.g.
#   scripts/test.sh e2e_azureml                 # only tests whose name contains e2e_azureml
#   scripts/test.sh -- --nocapture              # show test output
# SKIP_DEPS=1 skips step 1, SKIP_LINT=1 skips step 2, SKIP_FUZZ=1 step 5 (handy locally; CI sets
# none of them).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n==> %s\n' "$*"; }

if [[ ${SKIP_DEPS:-0} != 1 ]]; then
  step "install test dependencies"
  scripts/install-test-deps.sh
fi

if [[ ${SKIP_LINT:-0} != 1 ]]; then
  step "cargo fmt --all -- --check"
  cargo fmt --all -- --check --color never
  step "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings
fi

step "cargo build --workspace --bins (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --workspace --bins

step "cargo test --workspace --no-fail-fast $*"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# A short fuzzing run (README "Fuzzing"): 20 s per target from the committed seeds, without
# AddressSanitizer (scoretap has no unsafe code; the targets check panics and invariants), so the
# first instrumented build stays near 10 minutes on a fresh 2-core machine, about a minute after.
# Skipped when arguments pick tests.
if [[ ${SKIP_FUZZ:-0} != 1 && $# -eq 0 ]]; then
  step "scripts/fuzz.sh 20 (FUZZ_SANITIZER=${FUZZ_SANITIZER:-none})"
  FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} scripts/fuzz.sh 20 2>&1 | tee -a "$log" || status=1
fi
# One closing line over every test binary: "N passed, N failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
exit "$status"
