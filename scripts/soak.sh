#!/bin/bash
# Soak: scoretap under a steady mixed load for N minutes, sampling its RSS and open file
# descriptors every 10 s; prints the samples and a summary (first, last, max, drift).
#
#   scripts/soak.sh [minutes=10]
#
# Load, all at once: small JSON scoring requests paced by wrk (4 connections, 8 ms apart each:
# ~500 req/s), a 2 MB upload every second (spilled to the store), and 4 slow clients sending a
# 100 KB chunked body at ~20 KB/s each. Upstream: the shared benchmark's nginx (reads every body).
# SCORETAP_BIN picks the binary (default: the release build, built if missing).
set -euo pipefail
MINUTES=${1:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$ROOT/../shared/bench/peers
WORK=$(mktemp -d /tmp/scoretap-soak.XXXXXX)
BIN=${SCORETAP_BIN:-}
if [[ -z $BIN ]]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
  (cd "$ROOT" && cargo build --release -p scoretap >/dev/null)
  BIN=$CARGO_TARGET_DIR/release/scoretap
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

nginx -c "$PEERS/upstream-nginx.conf" -p /tmp & pids+=($!)
"$BIN" --listen 127.0.0.1:18190 --admin-listen 127.0.0.1:18191 --upstream http://127.0.0.1:18080 \
  --store "file://$WORK/store" --trace-batch-age 10s --service soak >"$WORK/scoretap.log" 2>&1 &
SCORETAP=$!; pids+=($SCORETAP)
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18191/readyz && break; sleep 0.1; done

cat >"$WORK/paced.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"data": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], "customer": {"id": 42}}'
wrk.headers["Content-Type"] = "application/json"
function delay() return 8 end
EOF
wrk -t1 -c4 -d"$((MINUTES * 60))s" -s "$WORK/paced.lua" http://127.0.0.1:18190/score >"$WORK/wrk.txt" 2>&1 & pids+=($!)

head -c 2000000 /dev/urandom >"$WORK/large.bin"
( end=$((SECONDS + MINUTES * 60)); while ((SECONDS < end)); do
    curl -s -o /dev/null -w '%{http_code}\n' -H 'content-type: application/octet-stream' \
      --data-binary @"$WORK/large.bin" http://127.0.0.1:18190/score >>"$WORK/large.codes"; sleep 1
  done ) & pids+=($!)

cat >"$WORK/slow.py" <<'EOF'
import socket, sys, time
end = time.time() + float(sys.argv[1])
codes = {}
while time.time() < end:
    s = socket.create_connection(("127.0.0.1", 18190))
    s.sendall(b"POST /score HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(50):
        chunk = b'"' + b"x" * 2000 + b'",'
        s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk)); time.sleep(0.1)
    s.sendall(b"0\r\n\r\n")
    status = s.recv(65536).split(b" ")[1].decode()
    codes[status] = codes.get(status, 0) + 1
    s.close()
print(codes)
EOF
for _ in 1 2 3 4; do python3 "$WORK/slow.py" "$((MINUTES * 60))" >>"$WORK/slow.txt" & pids+=($!); done

printf "%8s %10s %6s %10s\n" seconds rss_kib fds records
samples=()
start=$SECONDS
while (( SECONDS - start < MINUTES * 60 )); do
  rss=$(awk '/VmRSS/ {print $2}' /proc/$SCORETAP/status)
  fds=$(ls /proc/$SCORETAP/fd | wc -l)
  records=$(curl -s http://127.0.0.1:18191/capture | python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["records_written"])')
  printf "%8d %10d %6d %10d\n" $((SECONDS - start)) "$rss" "$fds" "$records"
  samples+=("$rss $fds")
  sleep 10
done
wait "${pids[2]}" 2>/dev/null || true
echo "--- wrk (paced small requests)"; grep -E "requests in|Non-2xx|Socket errors" "$WORK/wrk.txt" || true
echo "--- large uploads: $(sort "$WORK/large.codes" | uniq -c | tr '\n' ' ')"
echo "--- slow clients: $(tr '\n' ' ' <"$WORK/slow.txt")"
printf '%s\n' "${samples[@]}" | awk 'NR==1 {r0=$1; f0=$2} {if ($1>rm) rm=$1; if ($2>fm) fm=$2; r=$1; f=$2; n++}
  END {printf "RSS KiB first %d, last %d, max %d; fds first %d, last %d, max %d\n", r0, r, rm, f0, f, fm}'
