#!/usr/bin/env bash
# Peer benchmark: scoretap against nginx, HAProxy, Envoy and Envoy-with-tap, all proxying the
# same fast nginx upstream, driven by the shared harness ../shared/bench/peers/run.sh (wrk POSTs
# of a JSON body; upstream + wrk pinned to CPU 0, the proxy alone on CPU 1), once per body size;
# then the same over HTTP/2 (h2load, prior-knowledge h2c from the client; every proxy still speaks
# HTTP/1.1 to the upstream, as to a scoring server); then a constant-rate latency run (h2load
# --rps, HTTP/1.1, 1 KiB) of direct, nginx and scoretap.
#
# Usage: scripts/bench-peers.sh [seconds=10] [connections=64] [target ...]
#   targets: direct nginx haproxy envoy envoy-tap scoretap scoretap-nocap
#            (default: all of them; scoretap captures every exchange, scoretap-nocap does not)
# Env: CARGO_TARGET_DIR (default ~/.cache/scoretap/target, as scripts/test.sh),
#      SCORETAP_BIN (skip the release build and use this binary), SCORETAP_ARGS /
#      SCORETAP_NOCAP_ARGS (extra flags, passed through to run.sh), PEERS_DIR (harness folder),
#      BODY_SIZES (default "1k 64k 1m"), RATE (default 2000 req/s; 0 skips the latency run),
#      RATE_SECONDS (default 10), PROTOCOLS (default "h1 h2"), H2_CONNECTIONS x H2_STREAMS
#      (default 8 x 8: as many requests in flight as the HTTP/1.1 run's 64 connections).
# Writes bench/results/peers-<UTC date-time>.txt and prints it: a table per body size with
# ratios against nginx and direct, the latency table, and the goals marked met or not.
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
read -r -a SIZES <<<"${BODY_SIZES:-1k 64k 1m}"
RATE=${RATE:-2000}; RATE_SECONDS=${RATE_SECONDS:-10}

# Request bodies: JSON of the asked size (the shared 1 KiB one for 1k).
BODIES=$(mktemp -d /tmp/scoretap-bench-bodies.XXXXXX)
trap 'rm -rf "$BENCH_STORE" "$BODIES"' EXIT
body_file() {  # body_file SIZE -> path
  local size=$1 bytes
  if [[ $size == 1k ]]; then echo "$PEERS_DIR/body-1k.json"; return; fi
  case $size in
    *k) bytes=$(( ${size%k} * 1024 )) ;;
    *m) bytes=$(( ${size%m} * 1024 * 1024 )) ;;
    *) bytes=$size ;;
  esac
  local path=$BODIES/body-$size.json
  [[ -f $path ]] || python3 -c "
import sys
n = int(sys.argv[1]); row = '[0.125, 1.5, 2.25, 3.75, 4.5, 5.25, 6.75, 7.5], '
head = '{\"data\": ['; tail = '[0.0]], \"meta\": \"bench\"}'
rows = row * ((n - len(head) - len(tail)) // len(row))
text = head + rows + tail
sys.stdout.write(text + ' ' * (n - len(text)))" "$bytes" >"$path"
  echo "$path"
}

line() { printf "%-15s %10s %9s %9s %9s %9s %9s\n" "$@"; }
{
  echo "# scoretap peer benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)  rev $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# ${D}s per target, ${C} connections, wrk -t1 POST JSON; upstream+wrk on CPU 0, proxy on CPU 1"
  echo "# $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
} >"$OUT"

rps() { awk -v t="$1" '$1 == t && $2 ~ /^[0-9.]+$/ {print $2}' "$2"; }
divide() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }

# percentiles LOG -> "p50 p99 p99.9 requests errors" (ms) from an h2load --log-file (one line per
# request: start time, status, latency in microseconds).
percentiles() {
  sort -n -k3 "$1" | awk '
    { latency[NR] = $3 / 1000; if ($2 < 200 || $2 >= 300) errors++ }
    END {
      if (NR == 0) { print "- - - 0 -"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      i999 = int(NR * 0.999); if (i999 < 1) i999 = 1
      printf "%.3f %.3f %.3f %d %d\n", latency[i50], latency[i99], latency[i999], NR, errors + 0
    }'
}

# HTTP/2 configurations: the shared ones with the client-facing listener switched to h2c (prior
# knowledge); Envoy's codec is AUTO already; scoretap detects HTTP/2 by its preface.
# The upstream must read each body whole before it answers, as a scoring server does: the shared
# one answers at once (`return`), and over HTTP/2 a proxy may then reset the client's stream
# (RFC 9113 §8.1, "request that the client abort transmission ... with an error code of
# NO_ERROR"), so the upload never crosses (nginx passed "8,000 1 MiB uploads/s" that way). So the
# HTTP/2 upstream is the shared one behind an nginx front on the same CPU that reads each body
# whole (proxy_request_buffering on, the default) and passes on only the head; the front also
# gives the direct row its h2c listener (18090). The front halves the upstream core's rate, so
# bodies of 16 KiB or less, which arrive with their head (one DATA frame, sent at once), go to the
# shared upstream itself, given an h2c listener (no proxy can answer before it has them).
H2_CONFIGS=$(mktemp -d /tmp/scoretap-bench-h2.XXXXXX)
trap 'rm -rf "$BENCH_STORE" "$BODIES" "$H2_CONFIGS"' EXIT
sed -e 's|listen 127.0.0.1:18080 backlog=4096;|listen 127.0.0.1:18079 backlog=4096;|' \
  -e '/^  server {/i\
  upstream answer { server 127.0.0.1:18079; keepalive 64; }\
  server {\
    listen 127.0.0.1:18080 backlog=4096;\
    listen 127.0.0.1:18090 http2;\
    location / {\
      proxy_pass http://answer; proxy_http_version 1.1; proxy_set_header Connection "";\
      proxy_pass_request_body off; proxy_set_header Content-Length "";\
    }\
  }' "$PEERS_DIR/upstream-nginx.conf" >"$H2_CONFIGS/upstream-nginx.conf"
sed 's|listen 127.0.0.1:18080 backlog=4096;|&\n    listen 127.0.0.1:18090 http2;|' \
  "$PEERS_DIR/upstream-nginx.conf" >"$H2_CONFIGS/upstream-nginx-plain.conf"
# nginx ends an HTTP/2 connection after keepalive_requests (1,000) and h2load does not reconnect:
# lifted as the upstream's is.
sed -e 's|listen 127.0.0.1:18081 backlog=4096;|listen 127.0.0.1:18081 backlog=4096 http2;|' \
  -e 's|access_log off;|& keepalive_requests 1000000;|' \
  "$PEERS_DIR/proxy-nginx.conf" >"$H2_CONFIGS/proxy-nginx.conf"
sed 's|bind 127.0.0.1:18082|& proto h2|' "$PEERS_DIR/proxy-haproxy.cfg" >"$H2_CONFIGS/proxy-haproxy.cfg"
grep -q 'listen 127.0.0.1:18079 backlog' "$H2_CONFIGS/upstream-nginx.conf" &&
  grep -q 'listen 127.0.0.1:18090 http2' "$H2_CONFIGS/upstream-nginx.conf" &&
  grep -q 'listen 127.0.0.1:18090 http2' "$H2_CONFIGS/upstream-nginx-plain.conf" &&
  grep -q 'backlog=4096 http2' "$H2_CONFIGS/proxy-nginx.conf" &&
  grep -q 'keepalive_requests 1000000' "$H2_CONFIGS/proxy-nginx.conf" &&
  grep -q 'proto h2' "$H2_CONFIGS/proxy-haproxy.cfg" || {
  echo "bench-peers: the shared configurations changed; the HTTP/2 edits no longer apply" >&2; exit 1; }

# start_target TARGET UPSTREAM_CONF DIRECT_PORT NGINX_CONF HAPROXY_CONF LOG: starts the nginx
# upstream on CPU 0, then TARGET's proxy alone on CPU 1 (none for direct, which is the upstream
# at DIRECT_PORT); sets UPSTREAM_PID, TARGET_PID (empty for direct) and TARGET_PORT.
start_target() {
  local t=$1 log=$6
  (cd "$PEERS_DIR" && exec taskset -c 0 nginx -c "$2" -p /tmp) &
  UPSTREAM_PID=$!
  sleep 0.5
  shift
  TARGET_PID=""
  case $t in
    direct) TARGET_PORT=$2 ;;
    nginx) (cd "$PEERS_DIR" && exec taskset -c 1 nginx -c "$3" -p /tmp) & TARGET_PID=$!; TARGET_PORT=18081 ;;
    haproxy) (cd "$PEERS_DIR" && exec taskset -c 1 haproxy -f "$4" -db) & TARGET_PID=$!; TARGET_PORT=18082 ;;
    envoy) (cd "$PEERS_DIR" && exec taskset -c 1 envoy -c proxy-envoy.yaml --concurrency 1 -l error) & TARGET_PID=$!; TARGET_PORT=18083 ;;
    envoy-tap) rm -rf /tmp/bench-envoy-tap; mkdir -p /tmp/bench-envoy-tap
      (cd "$PEERS_DIR" && exec taskset -c 1 envoy -c proxy-envoy-tap.yaml --concurrency 1 -l error --base-id 7) & TARGET_PID=$!; TARGET_PORT=18084 ;;
    scoretap) # shellcheck disable=SC2086
      taskset -c 1 "$SCORETAP_BIN" $SCORETAP_ARGS --listen 127.0.0.1:18085 --upstream http://127.0.0.1:18080 \
        >"$log" 2>&1 & TARGET_PID=$!; TARGET_PORT=18085 ;;
    scoretap-nocap) # shellcheck disable=SC2086
      taskset -c 1 "$SCORETAP_BIN" $SCORETAP_NOCAP_ARGS --listen 127.0.0.1:18086 --upstream http://127.0.0.1:18080 \
        >"$log" 2>&1 & TARGET_PID=$!; TARGET_PORT=18086 ;;
  esac
}

# wait_ready [curl options...]: until TARGET_PORT answers a 1 KiB POST (at most 5 s).
wait_ready() {
  for _ in $(seq 50); do
    curl -s -o /dev/null "$@" -X POST --data-binary @"$PEERS_DIR/body-1k.json" \
      "http://127.0.0.1:$TARGET_PORT/score" && return
    sleep 0.1
  done
}

# stop_target: stops what start_target started.
stop_target() {
  [[ -n $TARGET_PID ]] && { kill "$TARGET_PID" 2>/dev/null; wait "$TARGET_PID" 2>/dev/null || true; }
  kill "$UPSTREAM_PID" 2>/dev/null; wait "$UPSTREAM_PID" 2>/dev/null || true
}

# h2_run TARGET BODY -> "TARGET req/s p50_ms p99_ms errors", the row run.sh prints for HTTP/1.1:
# H2_CONNECTIONS h2c connections of H2_STREAMS concurrent POSTs each for D seconds.
h2_run() {
  local t=$1 body=$2 log out rps p50 p99 p999 n errors failed upstream
  upstream=$H2_CONFIGS/upstream-nginx.conf
  (( $(stat -c %s "$body") <= 16384 )) && upstream=$H2_CONFIGS/upstream-nginx-plain.conf
  log=$(mktemp)
  start_target "$t" "$upstream" 18090 "$H2_CONFIGS/proxy-nginx.conf" "$H2_CONFIGS/proxy-haproxy.cfg" \
    "/tmp/bench-peers-h2-$t.log"
  wait_ready --http2-prior-knowledge
  out=$(taskset -c 0 h2load -t 1 -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -D "$D" -d "$body" \
    -H 'content-type: application/json' --log-file="$log" "http://127.0.0.1:$TARGET_PORT/score" 2>&1 || true)
  stop_target
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  failed=$(awk '/^requests:/ {print $10 + $12}' <<<"$out")
  read -r p50 p99 p999 n errors <<<"$(percentiles "$log")"
  rm -f "$log"
  echo "$out" >"/tmp/bench-peers-h2-$t.out"
  sleep 0.5
  [[ $rps =~ ^[0-9.]+$ && $n -gt 0 ]] || return 1
  echo "$t $rps ${p50}ms ${p99}ms $(( ${failed:-0} + ${errors:-0} ))"
}

# print_table TITLE TABLE: the rows with ratios against nginx and direct, and the goals.
print_table() {
  local title=$1 table=$2 nginx_rps direct_rps
  nginx_rps=$(rps nginx "$table"); direct_rps=$(rps direct "$table")
  echo
  echo "## $title"
  line target req/s p50_ms p99_ms errors vs_nginx vs_direct
  while read -r t r p50 p99 errors; do
    vs_nginx=-; vs_direct=-
    if [[ $r =~ ^[0-9.]+$ ]]; then
      [[ -n $nginx_rps ]] && vs_nginx=$(divide "$r" "$nginx_rps")
      [[ -n $direct_rps ]] && vs_direct=$(divide "$r" "$direct_rps")
    fi
    line "$t" "$r" "$p50" "$p99" "$errors" "$vs_nginx" "$vs_direct"
  done <"$table"
  goal() {  # goal NAME A B MINIMUM
    local a b
    a=$(rps "$2" "$table"); b=$(rps "$3" "$table")
    if [[ -n $a && -n $b ]]; then
      local r; r=$(divide "$a" "$b")
      echo "# goal $1 >= $4: $r $(awk -v r="$r" -v m="$4" 'BEGIN {print (r >= m) ? "met" : "NOT met"}')"
    else
      echo "# goal $1 >= $4: n/a ($2 ${a:-no number}, $3 ${b:-no number})"
    fi
  }
  goal "capture on / nginx" scoretap nginx 1.0
  goal "capture on / envoy-tap" scoretap envoy-tap 3.0
  goal "capture on / capture off" scoretap scoretap-nocap 0.95
}

read -r -a PROTOCOL_LIST <<<"${PROTOCOLS:-h1 h2}"
H2_CONNECTIONS=${H2_CONNECTIONS:-8}; H2_STREAMS=${H2_STREAMS:-8}
if [[ " ${PROTOCOL_LIST[*]} " == *" h2 "* ]] && ! command -v h2load >/dev/null; then
  echo "bench-peers: h2load is required for the HTTP/2 rows (scripts/install-test-deps.sh)" >&2; exit 1
fi
for protocol in "${PROTOCOL_LIST[@]}"; do
  for size in "${SIZES[@]}"; do
    BODY=$(body_file "$size"); export BODY
    table=$(mktemp)
    for t in "${TARGETS[@]}"; do
      if ! available "$t"; then
        echo "$t missing - - -" >>"$table"
        echo "bench-peers: $t missing" >&2
        continue
      fi
      echo "==> $t, $protocol, $size bodies (${D}s)" >&2
      # One run per target: a fresh upstream each time, and a failing target cannot stop the rest.
      if [[ $protocol == h1 ]]; then
        row=$(bash "$PEERS_DIR/run.sh" "$D" "$C" "$t" 2>"/tmp/bench-peers-$t.err" | awk -v t="$t" '$1 == t' || true)
      else
        row=$(h2_run "$t" "$BODY" 2>"/tmp/bench-peers-$t.err" || true)
      fi
      if ! awk 'NF >= 5 && $2 ~ /^[0-9.]+$/ {ok = 1} END {exit !ok}' <<<"$row"; then
        echo "$protocol row: $row" >>"/tmp/bench-peers-$t.err"
        echo "$t failed - - see_/tmp/bench-peers-$t.err" >>"$table"
      else
        echo "$row" >>"$table"
      fi
    done
    if [[ $protocol == h1 ]]; then
      print_table "$size request bodies, HTTP/1.1 (wrk, $C connections)" "$table" >>"$OUT"
    else
      print_table "$size request bodies, HTTP/2 (h2load, $H2_CONNECTIONS connections x $H2_STREAMS streams)" "$table" >>"$OUT"
    fi
    rm -f "$table"
  done
done

# Constant rate: RATE req/s (20 paced HTTP/1.1 connections of RATE/20 each) for RATE_SECONDS,
# per-request latencies from h2load's log. A connection sends its next request at its pace or
# when its response arrives, whichever is later: below the 1/(RATE/20) pacing interval (10 ms at
# 2,000 req/s) the percentiles are exact, above it they are lower bounds (coordinated omission).
latency_run() {  # latency_run TARGET -> "p50 p99 p99.9 requests errors" in ms
  local t=$1 log
  log=$(mktemp)
  start_target "$t" "$PEERS_DIR/upstream-nginx.conf" 18080 "$PEERS_DIR/proxy-nginx.conf" "$PEERS_DIR/proxy-haproxy.cfg" \
    "/tmp/bench-peers-rate-$t.log"
  wait_ready
  taskset -c 0 h2load --h1 -c 20 --rps $(( RATE / 20 )) -D "$RATE_SECONDS" -d "$PEERS_DIR/body-1k.json" \
    -H 'content-type: application/json' --log-file="$log" "http://127.0.0.1:$TARGET_PORT/score" >/dev/null 2>&1 || true
  stop_target
  percentiles "$log"
  rm -f "$log"
  sleep 0.5
}

if (( RATE > 0 )) && command -v h2load >/dev/null; then
  {
    echo
    echo "## constant rate: $RATE req/s for ${RATE_SECONDS}s, 1 KiB bodies, HTTP/1.1 (h2load --rps)"
    printf "%-15s %9s %9s %9s %9s %7s %14s\n" target p50_ms p99_ms p99.9_ms requests errors p99_over_direct
  } >>"$OUT"
  direct_p99=""
  for t in direct nginx scoretap; do
    [[ $t == scoretap && ! -x ${SCORETAP_BIN:-} ]] && continue
    echo "==> $t at $RATE req/s (${RATE_SECONDS}s)" >&2
    read -r p50 p99 p999 n errors <<<"$(latency_run "$t")"
    [[ $t == direct ]] && direct_p99=$p99
    over=-
    [[ $p99 =~ ^[0-9.]+$ && $direct_p99 =~ ^[0-9.]+$ ]] && over=$(awk -v a="$p99" -v b="$direct_p99" 'BEGIN {printf "%+.3f", a - b}')
    printf "%-15s %9s %9s %9s %9s %7s %14s\n" "$t" "$p50" "$p99" "$p999" "$n" "$errors" "$over" >>"$OUT"
    [[ $t == scoretap ]] && echo "# goal added p99 at $RATE req/s <= 0.5 ms: $over ms $(awk -v o="$over" 'BEGIN {print (o + 0 <= 0.5) ? "met" : "NOT met"}')" >>"$OUT"
  done
fi

cat "$OUT"
echo "(saved to $OUT)" >&2
