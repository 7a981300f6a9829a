#!/usr/bin/env bash
# Instruction counts per request, per thread: scoretap (release) runs under valgrind's callgrind,
# pinned to one CPU (so tokio runs one worker thread), in front of an nginx upstream answering a
# 1 KiB JSON body; h2load sends N 1 KiB JSON POSTs over HTTP/1.1 on 8 connections. Instruction
# counts do not move with the machine's load, unlike timings on this shared VM: use them to
# compare two builds. (They count user space only: the kernel's share of a request, about half
# of it, is not in them. Under valgrind SHA-256 runs its AVX code, not the SHA extensions the CPU
# has, so its share here is several times what it costs natively.)
#
# Usage: scripts/profile-callgrind.sh [requests=5000] [scoretap flags...]
#   scripts/profile-callgrind.sh 5000                      # capture on
#   scripts/profile-callgrind.sh 5000 --capture false      # capture off
# Env: SCORETAP_BIN (default $CARGO_TARGET_DIR/release/scoretap, built when missing),
#      PROFILE_DIR (where callgrind's files stay, default a new /tmp/scoretap-callgrind.XXXXXX).
# Prints Ir/request for the worker and the collector thread; `callgrind_annotate FILE` shows
# where they go.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

REQUESTS=${1:-5000}
shift $(( $# < 1 ? $# : 1 ))
for tool in valgrind callgrind_annotate nginx h2load curl taskset; do
  command -v "$tool" >/dev/null || {
    echo "profile-callgrind: '$tool' is required (valgrind, nginx, nghttp2-client)" >&2; exit 1; }
done

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
BIN=${SCORETAP_BIN:-$CARGO_TARGET_DIR/release/scoretap}
if [[ ! -x $BIN ]]; then
  cargo build --release -p scoretap >&2
fi
PEERS=$(cd "$REPO/../shared/bench/peers" && pwd)
OUT=${PROFILE_DIR:-$(mktemp -d /tmp/scoretap-callgrind.XXXXXX)}
mkdir -p "$OUT/store"
UPSTREAM_PORT=18790 PROXY_PORT=18791 ADMIN_PORT=18792

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The shared upstream configuration, on this script's own port.
sed "s/127.0.0.1:18080/127.0.0.1:$UPSTREAM_PORT/; s|pid /tmp/bench-up-nginx.pid|pid $OUT/nginx.pid|" \
  "$PEERS/upstream-nginx.conf" >"$OUT/upstream.conf"
nginx -c "$OUT/upstream.conf" -p "$OUT" -e "$OUT/nginx-error.log" &
pids+=($!)

taskset -c 1 valgrind --tool=callgrind --separate-threads=yes \
  --callgrind-out-file="$OUT/callgrind.out" \
  "$BIN" --listen "127.0.0.1:$PROXY_PORT" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" --store "file://$OUT/store" --log-level warn "$@" \
  >"$OUT/scoretap.log" 2>&1 &
SCORETAP=$!
pids+=("$SCORETAP")
for _ in $(seq 150); do
  curl -s -o /dev/null -X POST --data-binary @"$PEERS/body-1k.json" \
    "http://127.0.0.1:$PROXY_PORT/score" && break
  sleep 0.2
done

h2load --h1 -n "$REQUESTS" -c 8 -d "$PEERS/body-1k.json" -H 'content-type: application/json' \
  "http://127.0.0.1:$PROXY_PORT/score" | grep -E '^(requests|status codes):'
sleep 1.5  # the collector writes the last records
kill -INT "$SCORETAP"
wait "$SCORETAP" 2>/dev/null || true

printf '%-10s %14s %12s\n' thread instructions per_request
for file in "$OUT"/callgrind.out-*; do
  total=$(awk '/^(summary|totals):/ { print $2; exit }' "$file")
  role=other
  grep -q 'multi_thread::worker::run' "$file" && role=worker
  grep -q 'Collector::run' "$file" && role=collector
  [[ $role == other ]] && continue
  printf '%-10s %14s %12s\n' "$role" "$total" $(( total / REQUESTS ))
done
echo "callgrind files: $OUT (callgrind_annotate FILE)"
