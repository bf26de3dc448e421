#!/usr/bin/env bash
# Memory headroom of a full node (not a timed test): how much resident
# memory a cache node takes beyond its --max-memory when the cache is full
# and under load, which is what the operator must leave free under a pod's
# memory limit when it derives maxMemory from it
# (operator/src/resources/defaults.rs).
#
#   bash bench/headroom.sh [BUDGETS...]        # default: 64MiB 128MiB
#
# For each budget: the static release cache-node binary the images carry,
# on 127.0.0.1 with that --max-memory and no item cap, then wrk with 64
# keep-alive connections: FILL_SECONDS (default 60) of writes of random
# keys among 4 million (values of 100-1000 bytes, one of 16 tags), far more
# than the budget holds, so the node fills and then evicts on every write;
# then MIX_SECONDS (default 30) of half reads, half writes. Reports the
# node's own byte count at the end, its peak resident memory (VmHWM) and
# the resident memory at the end; two runs give the fixed part and the part
# proportional to the bytes held: peak = fixed + ratio * counted bytes (a
# full node holds its budget). A budget that did not fill in FILL_SECONDS
# still gives a valid point.
# Installs wrk from Debian packages if missing. Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need (the scripts run from the repository root)

BUDGETS=("$@")
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(64MiB 128MiB)
PORT=${PORT:-18091}
FILL_SECONDS=${FILL_SECONDS:-60}
MIX_SECONDS=${MIX_SECONDS:-30}
need wrk
# The binary the cache-node image carries: the static, profile-guided
# release build.
BIN=$(bash scripts/build-pgo.sh | tail -n 1)

work=$(mktemp -d)
node=""
cleanup() {
  [ -z "$node" ] || kill "$node" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# $1: the share of GETs (0 to 1).
lua() {
  cat <<EOF
math.randomseed(os.time())
local pad = string.rep("x", 1000)
local headers = {["Content-Type"] = "application/json"}
request = function()
  local k = math.random(1, 4000000)
  local path = "/api/v1/cache/key:" .. k
  if math.random() < $1 then return wrk.format("GET", path) end
  local body = '{"value":"' .. pad:sub(1, math.random(100, 1000)) .. '","tags":["t' .. (k % 16) .. '"]}'
  return wrk.format("POST", path, headers, body)
end
EOF
}
lua 0 >"$work/fill.lua"
lua 0.5 >"$work/mix.lua"

bytes() { python3 -c "import re,sys;m=re.fullmatch(r'(\d+)(KiB|MiB|GiB)?',sys.argv[1]);print(int(m[1])*{None:1,'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}[m[2]])" "$1"; }
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

printf '%-8s %12s %8s %13s %12s %10s %12s\n' budget counted_MiB items peak_rss_MiB end_rss_MiB peak/budget fill_req/s
points=()
for budget in "${BUDGETS[@]}"; do
  "$BIN" --bind-address 127.0.0.1 --port "$PORT" --max-size 100000000 \
    --max-memory "$budget" --log-level warn 2>"$work/node.log" &
  node=$!
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
  wrk -t2 -c64 -d"${FILL_SECONDS}s" -s "$work/fill.lua" "http://127.0.0.1:$PORT" >"$work/fill.out"
  wrk -t2 -c64 -d"${MIX_SECONDS}s" -s "$work/mix.lua" "http://127.0.0.1:$PORT" >"$work/mix.out"
  stats=$(python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:$PORT/api/v1/stats').read().decode())")
  hwm=$(status_kib "$node" VmHWM)
  rss=$(status_kib "$node" VmRSS)
  fill_rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/fill.out")
  kill "$node"
  wait "$node" 2>/dev/null || true
  node=""
  python3 - "$budget" "$(bytes "$budget")" "$hwm" "$rss" "$stats" "$fill_rps" <<'PY'
import json, sys
name, budget, hwm, rss, stats, rps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) * 1024, int(sys.argv[4]) * 1024, json.loads(sys.argv[5]), sys.argv[6]
mib = 1 << 20
print(f"{name:<8} {stats['bytes'] / mib:12.1f} {stats['items']:8} {hwm / mib:13.1f} {rss / mib:12.1f} {hwm / budget:10.2f} {rps:>12}")
PY
  points+=("$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['bytes'])" "$stats") $((hwm * 1024))")
done

if [ ${#points[@]} -ge 2 ]; then
  python3 - "${points[@]}" <<'PY'
import sys
pts = [tuple(map(int, a.split())) for a in sys.argv[1:]]
(b1, p1), (b2, p2) = pts[0], pts[-1]
ratio = (p2 - p1) / (b2 - b1)
fixed = p1 - ratio * b1
print(f"peak resident = {fixed / (1 << 20):.1f} MiB + {ratio:.3f} x bytes held")
PY
fi
