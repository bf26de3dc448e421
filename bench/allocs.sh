#!/usr/bin/env bash
# Heap allocations per request, one node against a 3-node cluster (rf 2):
# uprobes on the node's allocator (mimalloc's aligned malloc, zalloc and
# realloc, the entry points Rust's global allocator calls), counted over
# every node while wrk sends SETs, then GETs, of random keys of $SET_KEYS
# prefilled ~200-byte items, $CONNS connections spread over the nodes as in
# bench/cluster.sh's section 2. Prints allocations per request for each.
# Deterministic where req/s is not: it shows what a change to a request
# path saves on a shared machine whose req/s moves by more than that.
# The probes slow every allocation down (a trap each), so the req/s of
# these runs mean nothing.
#
#   bash bench/allocs.sh            # DURATION=4s CONNS=63 SET_KEYS=10000
#
# Runs the plain release build (NODE_BIN to measure another: the probes
# need its symbols). Needs root for uprobes; installs wrk and perf from
# Debian packages if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)
DURATION=${DURATION:-4s}
CONNS=${CONNS:-63}
SET_KEYS=${SET_KEYS:-10000}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
need wrk perf=linux-perf

if [ -z "${NODE_BIN:-}" ]; then
  cargo build --release -q -p cache-node
  NODE_BIN=target/release/cache-node
fi
NODE_BIN=$(realpath "$NODE_BIN")
work=$(mktemp -d)
pids=()
probes=(dc_alloc_malloc=mi_malloc_aligned dc_alloc_zalloc=mi_zalloc_aligned dc_alloc_realloc=mi_realloc_aligned)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  perf probe -q -d 'probe_cache:dc_alloc_*' 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
perf probe -q -d 'probe_cache:dc_alloc_*' 2>/dev/null || true
for p in "${probes[@]}"; do
  perf probe -q -x "$NODE_BIN" -a "probe_cache:$p"
done
events=probe_cache:dc_alloc_malloc,probe_cache:dc_alloc_zalloc,probe_cache:dc_alloc_realloc

A=127.0.0.51 B=127.0.0.52 C=127.0.0.53 S=127.0.0.54 PORT=18300
python3 - "$A" "$B" "$C" "$PORT" > "$work/ring.json" <<'PY'
import json, sys
*ips, port = sys.argv[1:]
print(json.dumps({"epoch": 1, "replicationFactor": 2, "members": [
    {"id": m, "address": f"{ip}:{port}", "state": "active"} for m, ip in zip("abc", ips)]}))
PY
taskset -c "$SERVER_CORE" "$NODE_BIN" --node-id s --bind-address $S --port $PORT \
  --max-size 10000000 --log-level warn &
pids+=($!)
for m in a b c; do
  ip=${m^^}
  taskset -c "$SERVER_CORE" "$NODE_BIN" --node-id $m --bind-address "${!ip}" --port $PORT \
    --max-size 10000000 --log-level warn --membership-file "$work/ring.json" \
    --membership-poll-interval 100ms &
  pids+=($!)
done
for ip in $S $A $B $C; do wait_ready "http://$ip:$PORT"; done
python3 bench/prefill.py "http://$S:$PORT" "$SET_KEYS"
python3 bench/prefill.py "http://$A:$PORT" "$SET_KEYS"

source bench/wrk.sh  # wrk_scripts (the scripts run from the repository root)
wrk_scripts "$SET_KEYS"  # $work/get.lua, $work/set.lua

# One wrk per URL at once, each with its share of the connections; the
# probes counted over the whole machine meanwhile (only the nodes run the
# probed binary). Prints "requests allocations".
count() { # op url...
  local op=$1 share i=0 url
  shift
  share=$((CONNS / $#))
  rm -f "$work"/wrk-*.out
  perf stat -x, -e "$events" -a -o "$work/stat.txt" -- bash -c '
    work=$1 script=$2 share=$3 duration=$4 core=$5; shift 5; i=0
    for url in "$@"; do
      taskset -c "$core" wrk -t1 -c"$share" -d"$duration" -s "$script" "$url" > "$work/wrk-$i.out" &
      i=$((i + 1))
    done
    wait' _ "$work" "$work/$op.lua" "$share" "$DURATION" "$CLIENT_CORE" "$@"
  if grep -q 'Non-2xx\|Socket errors' "$work"/wrk-*.out; then
    echo "allocs: $op: wrk saw errors" >&2
    cat "$work"/wrk-*.out >&2
    exit 1
  fi
  echo "$(awk '/requests in/ { n += $1 } END { print n + 0 }' "$work"/wrk-*.out)" \
    "$(awk -F, '$1 ~ /^[0-9]+$/ { n += $1 } END { print n + 0 }' "$work/stat.txt")"
}

printf '%-6s %-28s %10s %14s\n' op where requests "allocs/request"
for op in set get; do
  for where in single cluster; do
    if [ "$where" = single ]; then
      label="one node"; urls=("http://$S:$PORT" "http://$S:$PORT" "http://$S:$PORT")
    else
      label="3 nodes, rf 2 (all nodes)"; urls=("http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
    fi
    # An assignment, not `read < <(...)`, so a failed count stops the
    # script (set -e).
    out=$(count "$op" "${urls[@]}")
    read -r requests allocs <<<"$out"
    if [ "$requests" -eq 0 ]; then
      echo "allocs: $op on $label: no requests" >&2
      exit 1
    fi
    printf '%-6s %-28s %10d %14.2f\n' "$op" "$label" "$requests" "$(python3 -c "print($allocs / $requests)")"
  done
done
