#!/usr/bin/env bash
# Cluster benchmarks on loopback, in one run:
#  1. the cost of a forwarded GET against a local one: two release nodes
#     (replication factor 1, so each key has one owner) pinned to core 0,
#     wrk on core 1 sending GETs to node A for keys A owns (local) and for
#     keys B owns (A forwards them to B and relays the answer);
#  2. rebalancing throughput: 2 nodes (rf 2) holding KEYS items, a third
#     joins and pulls its share; keys received / pull time.
#
#   bash bench/cluster.sh            # DURATION=10s CONNS=64 KEYS=200000
#
# Installs wrk from Debian packages if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
KEYS=${KEYS:-200000}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

cargo build --release -q -p cache-node
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
A=127.0.0.51 B=127.0.0.52 C=127.0.0.53 PORT=18300

ring() { # epoch rf member...
  local epoch=$1 rf=$2; shift 2
  python3 - "$epoch" "$rf" "$@" > "$work/ring.tmp" <<'PY'
import json, sys
epoch, rf, *members = sys.argv[1:]
print(json.dumps({"epoch": int(epoch), "replicationFactor": int(rf), "members": [
    {"id": m.split("=")[0], "address": m.split("=")[1] + ":18300", "state": "active"} for m in members]}))
PY
  mv "$work/ring.tmp" "$work/ring.json"
}
node() { # id ip
  taskset -c "$SERVER_CORE" target/release/cache-node --node-id "$1" --bind-address "$2" --port $PORT \
    --membership-file "$work/ring.json" --membership-poll-interval 100ms --max-size 10000000 \
    --log-level warn &
  pids+=($!)
}
wait_ready() { for _ in $(seq 1 600); do curl -sf "http://$1:$PORT/api/v1/ready" >/dev/null && return 0; sleep 0.05; done; echo "$1 never ready" >&2; exit 1; }

source bench/wrk.sh  # wrk_run (the scripts run from the repository root)

echo "== 1. forwarded vs local GET (rf 1, 2 nodes)" >&2
ring 1 1 a=$A b=$B
node a $A; node b $B
wait_ready $A; wait_ready $B
python3 - "$A" "$work" <<'PY'
import json, sys, urllib.request
a, work = sys.argv[1], sys.argv[2]
value = json.dumps({"value": "v" * 200, "ttl": 3600}).encode()
local, remote = [], []
for i in range(1, 4001):
    key = f"bench:{i}"
    req = urllib.request.Request(f"http://{a}:18300/api/v1/cache/{key}", data=value, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    owner = json.load(urllib.request.urlopen(f"http://{a}:18300/api/v1/cluster?key={key}"))["owners"]["primary"]
    (local if owner == "a" else remote).append(key)
for name, keys in (("local", local), ("remote", remote)):
    with open(f"{work}/{name}.lua", "w") as f:
        f.write("keys = {" + ",".join(f'"{k}"' for k in keys) + "}\n")
        f.write("i = 0\nrequest = function() i = i % #keys + 1; return wrk.format('GET', '/api/v1/cache/' .. keys[i]) end\n")
print(f"{len(local)} keys owned by a, {len(remote)} by b", file=sys.stderr)
PY
# Assignments, not `read < <(...)`, so a failed run stops the script (set -e).
out=$(wrk_run local -s "$work/local.lua" "http://$A:$PORT"); read -r local_rps local_p99 <<<"$out"
out=$(wrk_run forwarded -s "$work/remote.lua" "http://$A:$PORT"); read -r fwd_rps fwd_p99 <<<"$out"
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

echo "== 2. rebalancing throughput ($KEYS keys, rf 2, a 3rd node joins)" >&2
ring 1 2 a=$A b=$B
node a $A; node b $B
wait_ready $A; wait_ready $B
python3 - "$A" "$KEYS" <<'PY'
import json, sys, urllib.request, concurrent.futures
a, n = sys.argv[1], int(sys.argv[2])
body = json.dumps({"value": "v" * 200, "ttl": 3600, "tags": ["bench"]}).encode()
def put(i):
    req = urllib.request.Request(f"http://{a}:18300/api/v1/cache/k{i}", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(put, range(n), chunksize=256))
PY
ring 2 2 a=$A b=$B c=$C
node c $C
wait_ready $C
progress=$(curl -s "http://$C:$PORT/api/v1/cluster/rebalance")

python3 - "$local_rps" "$local_p99" "$fwd_rps" "$fwd_p99" "$progress" "$CONNS" "$DURATION" <<'PY'
import json, sys
lr, lp, fr, fp = map(float, sys.argv[1:5])
p = json.loads(sys.argv[5])
print(f"two nodes on one core, load on another, {sys.argv[6]} connections, {sys.argv[7]} per run")
print(f"{'':24}{'req/s':>12}{'p99 ms':>10}")
print(f"{'local GET':24}{lr:12.0f}{lp:10.3f}")
print(f"{'forwarded GET':24}{fr:12.0f}{fp:10.3f}")
print(f"forwarded GET costs {lr / fr:.2f}x a local one (bar < 2.0)")
print()
secs = p["lastSyncSeconds"]
print(f"rebalancing: the joining node pulled {p['keysReceived']} keys in {secs:.2f}s = {p['keysReceived'] / secs:,.0f} keys/s")
PY
