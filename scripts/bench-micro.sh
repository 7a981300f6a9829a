#!/usr/bin/env bash
# Criterion micro-benchmarks of scoretap-core (README "Benchmarks"): the tee per frame, the ring
# under contention, record assembly at 1 KiB and 64 KiB.
#
# Usage: scripts/bench-micro.sh [filter] [criterion options...]
#   e.g. scripts/bench-micro.sh                      # everything (about 3 minutes)
#        scripts/bench-micro.sh record/             # only the record benchmarks
#        scripts/bench-micro.sh ring --measurement-time 10
# Env: CARGO_TARGET_DIR (default ~/.cache/scoretap/target, as scripts/test.sh).
# Criterion keeps its reports under $CARGO_TARGET_DIR/criterion; a later run prints the change
# against the previous one. At the end a compact table: median time per iteration and throughput.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scoretap/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
FILTER=${1:-}
shift $(( $# < 1 ? $# : 1 ))
OPTIONS=("$@")
((${#OPTIONS[@]})) || OPTIONS=(--warm-up-time 1 --measurement-time 3)

stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
echo "==> cargo bench -p scoretap-core -- $FILTER ${OPTIONS[*]} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo bench -p scoretap-core --bench tee_frame --bench ring --bench record -- ${FILTER:+"$FILTER"} "${OPTIONS[@]}"

echo
echo "==> summary ($(date -u +%FT%TZ), rev $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores)"
python3 - "$CARGO_TARGET_DIR/criterion" "$stamp" <<'PY'
import json, os, sys

root, stamp = sys.argv[1], os.path.getmtime(sys.argv[2])
rows = []
for directory, _, files in os.walk(root):
    if not directory.endswith(os.sep + "new") or "benchmark.json" not in files:
        continue
    if os.path.getmtime(os.path.join(directory, "estimates.json")) < stamp:
        continue  # not measured by this run
    with open(os.path.join(directory, "benchmark.json")) as f:
        bench = json.load(f)
    with open(os.path.join(directory, "estimates.json")) as f:
        median = json.load(f)["median"]["point_estimate"]  # ns per iteration
    throughput = bench.get("throughput") or {}
    if "Elements" in throughput:
        per = median / throughput["Elements"]
        extra = f"{per:10.1f} ns/elem  {1e3 / per:9.2f} Melem/s"
    elif "Bytes" in throughput:
        extra = f"{throughput['Bytes'] / median * 1e9 / 2**20:10.1f} MiB/s"
    else:
        extra = ""
    rows.append((bench["full_id"], median, extra))

def time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:8.2f} {unit}"
    return f"{ns:8.1f} ns"

width = max((len(name) for name, _, _ in rows), default=10)
for name, median, extra in sorted(rows):
    print(f"{name:<{width}}  {time(median)}  {extra}")
PY
