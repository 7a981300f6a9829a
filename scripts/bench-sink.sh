#!/usr/bin/env bash
# Does a dead or stalled storage sink slow clients down? scoretap (release, capture on) in the
# peer harness of ../shared/bench/peers (nginx upstream + wrk on CPU 0, scoretap alone on CPU 1;
# wrk, 64 connections, 1 KiB JSON POST) with an s3:// store that is
#   live     a moto S3 server,
#   dead     a port nothing listens on (connections refused),
#   stalled  a listener that accepts connections and never answers.
# The three run in turn, ROUNDS times, so drift on this shared VM hits each alike. Prints req/s and
# p99 of each run, the means, and dead/live and stalled/live (the goal: within 5 %), plus
# the spool's size at the end of each run and /readyz during it (how many of its 200 ms samples
# were not 200, with their codes; 000 is no answer within 2 s).
#
# Usage: scripts/bench-sink.sh [seconds=10] [rounds=2]
# Env: SCORETAP_BIN (default $CARGO_TARGET_DIR/release/scoretap, built when missing).
# Writes bench/results/sink-<UTC date-time>.txt and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
D=${1:-10}; ROUNDS=${2:-2}

for tool in nginx wrk curl taskset moto_server python3; do
  command -v "$tool" >/dev/null || {
    echo "bench-sink: '$tool' is required (scripts/install-test-deps.sh)" >&2; exit 1; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
SCORETAP_BIN=${SCORETAP_BIN:-$CARGO_TARGET_DIR/release/scoretap}
[[ -x $SCORETAP_BIN ]] || cargo build --release -p scoretap >&2
export SCORETAP_BIN
PEERS_DIR=$(cd "$REPO/../shared/bench/peers" && pwd)

MOTO_PORT=18660 DEAD_PORT=18661 STALL_PORT=18662 ADMIN_PORT=18663
WORK=$(mktemp -d /tmp/scoretap-bench-sink.XXXXXX)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

taskset -c 0 moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
pids+=($!)
taskset -c 0 python3 -c '
import socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(1024)
held = []
while True:
    connection, _ = listener.accept()
    held.append(connection)  # never read, never answered
' "$STALL_PORT" &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/" && break; sleep 0.1; done
curl -sf -X PUT "http://127.0.0.1:$MOTO_PORT/scoretap-bench" >/dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1

endpoint() {
  case $1 in
    live) echo "http://127.0.0.1:$MOTO_PORT" ;;
    dead) echo "http://127.0.0.1:$DEAD_PORT" ;;
    stalled) echo "http://127.0.0.1:$STALL_PORT" ;;
  esac
}

mkdir -p bench/results
OUT=bench/results/sink-$(date -u +%Y%m%d-%H%M%SZ).txt
{
  echo "# scoretap with a live, dead and stalled S3 sink $(date -u +%Y-%m-%dT%H:%M:%SZ)  rev $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "# ${D}s per run, ${ROUNDS} rounds, wrk -t1 -c64 POST 1 KiB JSON; upstream+wrk on CPU 0, scoretap on CPU 1"
  printf "%-8s %6s %10s %9s %12s %14s\n" sink round req/s p99_ms spool_bytes readyz_not_200
} >"$OUT"

for round in $(seq "$ROUNDS"); do
  for sink in live dead stalled; do
    spool=$WORK/spool-$sink-$round
    export SCORETAP_ARGS="--store s3://scoretap-bench/$sink --s3-endpoint $(endpoint "$sink") --spool-dir $spool --trace-batch-age 1s --admin-listen 127.0.0.1:$ADMIN_PORT --log-level error"
    # /readyz every 200 ms while the load runs (from the first 200 until D - 2 s later; after
    # the run scoretap drains, and says so with 503): it must stay 200 whatever the sink does.
    (
      for _ in $(seq 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz" || true) == 200 ]] && break
        sleep 0.1
      done
      not_ready=0 codes=""
      for _ in $(seq $(( (D - 2) * 5 ))); do
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz" || true)
        [[ $code == 200 ]] || { not_ready=$((not_ready + 1)); codes+=" $code"; }
        sleep 0.2
      done
      echo "$not_ready${codes:+ (${codes# })}" >"$WORK/readyz-$sink-$round"
    ) &
    sampler=$!
    echo "==> $sink sink, round $round (${D}s)" >&2
    row=$(bash "$PEERS_DIR/run.sh" "$D" 64 scoretap 2>>"$WORK/run.err" | awk '$1 == "scoretap"' || true)
    spool_bytes=$(du -sb "$spool" 2>/dev/null | cut -f1 || echo 0)
    wait "$sampler" || true
    read -r _ rps _ p99 _ <<<"$row"
    printf "%-8s %6s %10s %9s %12s %14s\n" "$sink" "$round" "${rps:-failed}" "${p99:-?}" \
      "${spool_bytes:-0}" "$(cat "$WORK/readyz-$sink-$round" 2>/dev/null || echo ?)" >>"$OUT"
  done
done

awk '
  $1 ~ /^(live|dead|stalled)$/ && $3 ~ /^[0-9.]+$/ {
    rps[$1] += $3; n[$1]++; p = $4
    if (p ~ /us$/) { sub(/us$/, "", p); p /= 1000 } else if (p ~ /ms$/) { sub(/ms$/, "", p) } else if (p ~ /s$/) { sub(/s$/, "", p); p *= 1000 }
    p99[$1] += p
  }
  END {
    print "#"
    for (s in n) printf "# mean %-8s %10.1f req/s  p99 %.2f ms\n", s, rps[s] / n[s], p99[s] / n[s]
    if (n["live"] && n["dead"] && n["stalled"]) {
      for (s in n) if (s != "live") {
        r = (rps[s] / n[s]) / (rps["live"] / n["live"])
        q = (p99[s] / n[s]) / (p99["live"] / n["live"])
        printf "# goal %s/live throughput within 5 %%: %.3f %s; p99 ratio %.3f %s\n", s, r,
          (r >= 0.95 && r <= 1.05) ? "met" : "NOT met", q, (q <= 1.05) ? "met" : "NOT met"
      }
    }
  }' "$OUT" >>"$OUT"
cat "$OUT"
echo "(saved to $OUT)" >&2
