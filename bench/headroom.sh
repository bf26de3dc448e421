#!/usr/bin/env bash
# Memory headroom of a full node (not a timed test): how much resident
# memory a cache node takes beyond its --max-memory when the cache is full
# and under mixed load, which is what the operator must leave free under a
# pod's memory limit when it derives maxMemory from it
# (operator/src/resources/defaults.rs).
#
#   bash bench/headroom.sh [DURATION] [BUDGETS...]     # default 90s, 64MiB 256MiB
#
# For each budget: the release cache-node binary of the image
# (scripts/build-images.sh's static build) on 127.0.0.1 with that
# --max-memory and no item cap, driven by the soak load generator
# (cache-node/examples/soak_load.rs: 64 clients over 1.28 million keys with
# 10-400 byte values, so the budget fills and evicts; GETs, SETs with tags
# and TTLs, DELETEs, tag invalidations). Reports the node's own byte count,
# its peak resident memory (VmHWM) and the resident memory at the end. Two
# budgets give the fixed part and the part proportional to the budget:
# peak = fixed + ratio * budget.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-90s}
shift || true
BUDGETS=("$@")
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(64MiB 256MiB)
PORT=${PORT:-18091}
TRIPLE=$(uname -m)-unknown-linux-gnu
UPPER=${TRIPLE^^}
export "CARGO_TARGET_${UPPER//-/_}_RUSTFLAGS=-C target-feature=+crt-static"
cargo build --release -q --locked --target "$TRIPLE" -p cache-node --bin cache-node --example soak_load
BIN=target/$TRIPLE/release

bytes() { # 64MiB -> bytes
  python3 -c "import re,sys;m=re.fullmatch(r'(\d+)(KiB|MiB|GiB)?',sys.argv[1]);print(int(m[1])*{None:1,'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}[m[2]])" "$1"
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

printf '%-10s %12s %12s %12s %12s %8s\n' budget counted_MiB peak_rss_MiB end_rss_MiB items peak/budget
results=()
for budget in "${BUDGETS[@]}"; do
  log=$(mktemp)
  "$BIN/cache-node" --bind-address 127.0.0.1 --port "$PORT" --max-size 100000000 \
    --max-memory "$budget" --log-level warn 2>"$log" &
  node=$!
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
  "$BIN/examples/soak_load" --addr "127.0.0.1:$PORT" --duration "$DURATION" --pid "$node" \
    --workers 64 --keys-per-worker 20000 >"$log.load" 2>&1 || true
  stats=$(python3 -c "import json,urllib.request;print(json.dumps(json.load(urllib.request.urlopen('http://127.0.0.1:$PORT/api/v1/stats'))))")
  hwm=$(status_kib "$node" VmHWM)
  rss=$(status_kib "$node" VmRSS)
  kill "$node"; wait "$node" 2>/dev/null || true
  python3 - "$budget" "$(bytes "$budget")" "$hwm" "$rss" "$stats" <<'PY'
import json, sys
name, budget, hwm, rss, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) * 1024, int(sys.argv[4]) * 1024, json.loads(sys.argv[5])
mib = 1 << 20
counted = stats.get("bytes", stats.get("memory_used_bytes", 0))
print(f"{name:<10} {counted / mib:12.1f} {hwm / mib:12.1f} {rss / mib:12.1f} {stats.get('items', 0):12} {hwm / budget:8.2f}")
PY
  results+=("$(bytes "$budget") $((hwm * 1024))")
  rm -f "$log" "$log.load"
done

if [ ${#results[@]} -ge 2 ]; then
  python3 - "${results[@]}" <<'PY'
import sys
pts = [tuple(map(int, a.split())) for a in sys.argv[1:]]
(b1, p1), (b2, p2) = pts[0], pts[-1]
ratio = (p2 - p1) / (b2 - b1)
fixed = p1 - ratio * b1
print(f"peak resident = {fixed / (1 << 20):.1f} MiB + {ratio:.3f} x max-memory")
PY
fi
