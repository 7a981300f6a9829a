#!/usr/bin/env bash
# Memory under many large uploads (the goal: 1,000 concurrent 10 MB uploads plus one
# 1 GiB upload with capture on, RSS < 128 MiB, every body byte-exact). Runs the release
# `memory_load` (tests/src/bin/memory_load.rs: a hyper client and upstream in one process, the
# upstream checking each body's SHA-256) against the release scoretap, with capture on (a
# `file://` store in a temp directory: the spilled bodies take about 11 GB there while it runs),
# then with capture off. Both with `--connect-timeout 30s`: the upstream shares its process with
# a client producing and hashing 11 GB, and its accept loop can lag past the default 5 s (504s
# that are the harness's, not scoretap's).
#
# Usage: scripts/bench-memory.sh [uploads=1000] [upload-MiB=10] [large-MiB=1024]
# Env: CARGO_TARGET_DIR (default ~/.cache/scoretap/target), SCORETAP_BIN.
# Writes bench/results/memory-<UTC date-time>.txt and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
UPLOADS=${1:-1000}; UPLOAD_MIB=${2:-10}; LARGE_MIB=${3:-1024}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
cargo build --release -p scoretap -p scoretap-tests --bin scoretap --bin memory_load >&2
export SCORETAP_BIN=${SCORETAP_BIN:-$CARGO_TARGET_DIR/release/scoretap}
# Every upload is a client connection, a proxy connection and an upstream connection.
ulimit -n "$(( UPLOADS * 4 + 1024 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mkdir -p bench/results
OUT=bench/results/memory-$(date -u +%Y%m%d-%H%M%SZ).txt
export RUST_BACKTRACE=0
# One run, then a line that sorts what went wrong: answers that were not 200, and uploads whose
# connection broke (the client's panic message), as the upstream's SHA-256 check never failed
# on a body that arrived.
run() {
  local log
  log=$(mktemp)
  "$CARGO_TARGET_DIR/release/memory_load" "$UPLOADS" "$UPLOAD_MIB" "$LARGE_MIB" "$@" >"$log" 2>&1 || true
  grep -v -e ': status ' -e 'panicked at' -e '^upload response' -e '^note: run with' -e '^$' "$log"
  echo "failures: $(grep -c ': status ' "$log" || true) non-200 answers ($(grep -o ': status [0-9]*' "$log" | sort | uniq -c | awk '{printf "%s x %s ", $1, $4}')), $(grep -c 'panicked at' "$log" || true) broken connections ($(grep -o 'hyper::Error([A-Za-z]*' "$log" | sort | uniq -c | awk '{printf "%s x %s) ", $1, $2}'))"
  rm -f "$log"
}
{
  echo "# scoretap memory under load $(date -u +%Y-%m-%dT%H:%M:%SZ)  rev $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# release build; $(nproc) cores; ulimit -n $(ulimit -n)"
  echo "## capture on"
  run --connect-timeout 30s
  echo "## capture off"
  run --capture false --connect-timeout 30s
} 2>&1 | tee "$OUT"
echo "(saved to $OUT)" >&2
