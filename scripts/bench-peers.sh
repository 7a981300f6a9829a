#!/usr/bin/env bash
# Peer benchmark: scoretap against nginx, HAProxy, Envoy and Envoy-with-tap, all proxying the
# same fast nginx upstream, driven by the shared harness ../shared/bench/peers/run.sh (wrk with
# a 1 KiB JSON POST; upstream + wrk pinned to CPU 0, the proxy alone on CPU 1).
#
# Usage: scripts/bench-peers.sh [seconds=10] [connections=64] [target ...]
#   targets: direct nginx haproxy envoy envoy-tap scoretap scoretap-nocap
#            (default: all of them; scoretap captures every exchange, scoretap-nocap does not)
# Env: CARGO_TARGET_DIR (default ~/.cache/scoretap/target, as scripts/test.sh),
#      SCORETAP_BIN (skip the release build and use this binary), SCORETAP_ARGS /
#      SCORETAP_NOCAP_ARGS (extra flags, passed through to run.sh), PEERS_DIR (harness folder).
# Writes bench/results/peers-<UTC date-time>.txt and prints it, plus scoretap/nginx req/s.
# A target whose program is missing (or whose scoretap build failed) gets a "missing" row.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

D=${1:-10}; C=${2:-64}
shift $(( $# < 2 ? $# : 2 ))
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(direct nginx haproxy envoy envoy-tap scoretap-nocap scoretap)

PEERS_DIR=$(cd "${PEERS_DIR:-$REPO/../shared/bench/peers}" && pwd) || {
  echo "bench-peers: harness not found (expected ../shared/bench/peers beside the repo)" >&2; exit 1; }
for tool in nginx wrk curl taskset; do  # the upstream and the load generator are not optional
  command -v "$tool" >/dev/null || { echo "bench-peers: '$tool' is required (scripts/install-test-deps.sh)" >&2; exit 1; }
done

# Build scoretap (release) only when a scoretap target is asked for and no binary was given.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
if [[ " ${TARGETS[*]} " == *" scoretap"* && -z ${SCORETAP_BIN:-} ]]; then
  echo "==> cargo build --release -p scoretap (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)" >&2
  if cargo build --release -p scoretap >&2; then
    SCORETAP_BIN=$CARGO_TARGET_DIR/release/scoretap
  else
    echo "bench-peers: scoretap build failed; its rows will say missing" >&2
  fi
fi
export SCORETAP_BIN=${SCORETAP_BIN:-}
# scoretap captures into a throw-away store (run.sh runs from the harness folder, which must stay
# clean), on admin ports of its own; scoretap-nocap is the same binary with capture off.
BENCH_STORE=$(mktemp -d /tmp/scoretap-bench-store.XXXXXX)
trap 'rm -rf "$BENCH_STORE"' EXIT
export SCORETAP_ARGS=${SCORETAP_ARGS:-"--store file://$BENCH_STORE/on --admin-listen 127.0.0.1:18095 --log-level warn"}
export SCORETAP_NOCAP_ARGS=${SCORETAP_NOCAP_ARGS:-"--capture false --store file://$BENCH_STORE/off --admin-listen 127.0.0.1:18096 --log-level warn"}

available() {
  case $1 in
    direct) return 0 ;;
    nginx) command -v nginx >/dev/null ;;
    haproxy) command -v haproxy >/dev/null ;;
    envoy | envoy-tap) envoy --version >/dev/null 2>&1 ;;
    scoretap | scoretap-nocap) [[ -n $SCORETAP_BIN && -x $SCORETAP_BIN ]] ;;
    *) return 1 ;;
  esac
}

mkdir -p bench/results
OUT=bench/results/peers-$(date -u +%Y%m%d-%H%M%SZ).txt
line() { printf "%-15s %10s %9s %9s %9s\n" "$@"; }  # same columns as run.sh
{
  echo "# scoretap peer benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)  rev $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# ${D}s per target, ${C} connections, wrk -t1 POST 1 KiB JSON; upstream+wrk on CPU 0, proxy on CPU 1"
  echo "# $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  line target req/s p50_ms p99_ms errors
} >"$OUT"

for t in "${TARGETS[@]}"; do
  if ! available "$t"; then
    line "$t" missing - - - >>"$OUT"
    echo "bench-peers: $t missing" >&2
    continue
  fi
  echo "==> $t (${D}s)" >&2
  # One harness run per target: a fresh upstream each time, and a failing target cannot stop the rest.
  row=$(bash "$PEERS_DIR/run.sh" "$D" "$C" "$t" 2>"/tmp/bench-peers-$t.err" | awk -v t="$t" '$1 == t' || true)
  if ! awk 'NF >= 5 && $2 ~ /^[0-9.]+$/ {ok = 1} END {exit !ok}' <<<"$row"; then
    # no req/s: the proxy did not start or wrk could not connect
    echo "run.sh row: $row" >>"/tmp/bench-peers-$t.err"
    line "$t" failed - - "see /tmp/bench-peers-$t.err" >>"$OUT"
  else
    echo "$row" >>"$OUT"
  fi
done

rps() { awk -v t="$1" '$1 == t && $2 ~ /^[0-9.]+$/ {print $2}' "$OUT"; }
ratio() {  # ratio NAME A B: req/s of A over req/s of B
  local a b
  a=$(rps "$2"); b=$(rps "$3")
  if [[ -n $a && -n $b ]]; then
    echo "# $1: $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", a / b}')" >>"$OUT"
  else
    echo "# $1: n/a ($2 ${a:-no number}, $3 ${b:-no number})" >>"$OUT"
  fi
}
ratio "scoretap (capture on)/nginx req/s" scoretap nginx
ratio "scoretap (capture off)/nginx req/s" scoretap-nocap nginx
ratio "scoretap capture on/off req/s" scoretap scoretap-nocap
ratio "scoretap (capture on)/envoy-tap req/s" scoretap envoy-tap

cat "$OUT"
echo "(saved to $OUT)" >&2
