#!/usr/bin/env bash
# How cache-node's HTTP throughput holds up with size, in one run
# (DESIGN section 7: at full capacity at least 90% of below it; with 10
# million items within 20% of 10 thousand):
#
#   1. SET of new keys below capacity (--max-size far above what is written)
#      against SET of new keys at capacity (--max-size 10000, already full,
#      so every insert evicts the least recently used item);
#   2. GET of random keys from a node holding 10 thousand items against one
#      holding 10 million (every key written first, so no GET misses).
#
#   bash bench/scale.sh     # DURATION=15s CONNS=64 BIG=10000000 by default
#
# Same set-up as bench/load.sh: the server on core 0, wrk on core 1, 64
# keep-alive connections, ~200-byte values, requests built in Lua. The
# 10-million-item node needs about 5 GiB of memory; filling it takes a few
# minutes (through the REST API, as a client would).
#
# Installs wrk from Debian if it is missing. Everything listens on
# 127.0.0.1 only and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)

DURATION=${DURATION:-15s}
CONNS=${CONNS:-64}
SMALL=${SMALL:-10000}
BIG=${BIG:-10000000}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
PORT=18085

need wrk
cargo build --release -q -p cache-node
work=$(mktemp -d)
node=""
stop_node() { [ -z "$node" ] || { kill "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; node=""; }; }
cleanup() { stop_node; rm -rf "$work"; }
trap cleanup EXIT

start_node() {  # max_items
  taskset -c "$SERVER_CORE" target/release/cache-node --bind-address 127.0.0.1 --port $PORT \
    --max-size "$1" --max-memory 0 --log-level warn &
  node=$!
  wait_ready "http://127.0.0.1:$PORT" 200  # a single node: ready once it serves
}
stat() { curl -sf "http://127.0.0.1:$PORT/api/v1/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

value=$(printf 'v%.0s' $(seq 1 200))  # 200 bytes
# SET of keys prefix:1, prefix:2, ... (one Lua state: -t1), new keys each
# time, or with a wrap, prefix:1..wrap over and over.
set_lua() {  # prefix [wrap]
  cat > "$work/set-$1.lua" <<LUA
local n, wrap = 0, ${2:-0}
local body = '{"value":"$value","ttl":3600,"tags":["bench"]}'
local headers = { ["Content-Type"] = "application/json" }
request = function()
  n = n + 1
  if wrap > 0 and n > wrap then n = 1 end
  return wrk.format("POST", "/api/v1/cache/$1:" .. n, headers, body)
end
LUA
  echo "$work/set-$1.lua"
}
get_lua() {  # prefix keys
  cat > "$work/get-$1.lua" <<LUA
math.randomseed(42)
request = function() return wrk.format("GET", "/api/v1/cache/$1:" .. math.random(1, $2)) end
LUA
  echo "$work/get-$1.lua"
}

source bench/wrk.sh  # wrk_run (the scripts run from the repository root)

# Writes keys prefix:1..want (round and round) until the node holds all
# `want`, then stops the writer: a fill through the REST API at whatever rate
# the node takes, that never writes more keys than asked.
fill() {  # prefix want
  taskset -c "$CLIENT_CORE" wrk -t1 -c"$CONNS" -d1h -s "$(set_lua "$1" "$2")" "http://127.0.0.1:$PORT" >/dev/null &
  local writer=$! started=$SECONDS
  until (($(stat items) >= $2)); do
    kill -0 "$writer" 2>/dev/null || { echo "the writer stopped before $2 items" >&2; exit 1; }
    ((SECONDS - started < 3600)) || { echo "fill: no $2 items within an hour" >&2; exit 1; }
    sleep 1
  done
  kill "$writer"; wait "$writer" 2>/dev/null || true
  echo "filled $(stat items) items in $((SECONDS - started)) s" >&2
}

echo "== SET of new keys below capacity" >&2
start_node 100000000
out=$(wrk_run below -s "$(set_lua below)" "http://127.0.0.1:$PORT"); read -r below_rps below_p99 <<<"$out"
(($(stat evictions) == 0)) || { echo "the below-capacity run evicted" >&2; exit 1; }
stop_node

echo "== SET of new keys at capacity ($SMALL items, every insert evicts)" >&2
start_node "$SMALL"
fill full "$SMALL"
evicted=$(stat evictions)
out=$(wrk_run at -s "$(set_lua at)" "http://127.0.0.1:$PORT"); read -r at_rps at_p99 <<<"$out"
evictions=$(($(stat evictions) - evicted))
echo "at capacity: $evictions evictions during the run" >&2
stop_node

echo "== GET of random keys, $SMALL items" >&2
start_node $((SMALL * 2))
fill small "$SMALL"
out=$(wrk_run small -s "$(get_lua small "$SMALL")" "http://127.0.0.1:$PORT"); read -r small_rps small_p99 <<<"$out"
(($(stat misses) == 0)) || { echo "the $SMALL-item GET run missed" >&2; exit 1; }
stop_node

echo "== GET of random keys, $BIG items" >&2
start_node $((BIG * 2))
fill big "$BIG"
rss=$(awk '/VmRSS/ {printf "%d\n", $2 * 1024}' "/proc/$node/status")
out=$(wrk_run big -s "$(get_lua big "$BIG")" "http://127.0.0.1:$PORT"); read -r big_rps big_p99 <<<"$out"
(($(stat misses) == 0)) || { echo "the $BIG-item GET run missed" >&2; exit 1; }
stop_node

python3 - "$below_rps" "$below_p99" "$at_rps" "$at_p99" "$small_rps" "$small_p99" "$big_rps" "$big_p99" \
  "$SMALL" "$BIG" "$rss" "$CONNS" "$DURATION" "$evictions" <<'PY'
import sys
below, below_p, at, at_p, small, small_p, big, big_p = map(float, sys.argv[1:9])
n_small, n_big, rss, conns, duration, evictions = sys.argv[9:15]
print(f"single node, server on one core, load on another, {conns} connections, {duration} per run")
print(f"{'':40}{'req/s':>12}{'p99 ms':>10}")
for name, rps, p99 in [("SET new keys, below capacity", below, below_p),
                       (f"SET new keys, at capacity ({n_small})", at, at_p),
                       (f"GET random keys, {n_small} items", small, small_p),
                       (f"GET random keys, {n_big} items", big, big_p)]:
    print(f"{name:40}{rps:12.0f}{p99:10.3f}")
print()
print(f"at capacity / below      {at / below:6.2f}x   (bar >= 0.9; {evictions} evictions in the run)")
print(f"{n_big} / {n_small} items  {big / small:6.2f}x   (bar >= 0.8)")
print(f"RSS with {n_big} items: {int(rss) / 2**30:.2f} GiB")
PY
