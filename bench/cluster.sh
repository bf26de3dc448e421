#!/usr/bin/env bash
# Cluster benchmarks on loopback, in one run (DESIGN 7 sets the bars):
#  1. the cost of a forwarded GET against a local one: two release nodes
#     (replication factor 1, so each key has one owner) pinned to core 0,
#     wrk on core 1 sending GETs to node A for keys A owns (local) and for
#     keys B owns (A forwards them to B and relays the answer);
#  2. capacity: one node against a 3-node cluster (rf 2) on the same core,
#     $CONNS keep-alive connections spread evenly over the nodes (as a
#     Service spreads clients), GET and SET of random keys of $SET_KEYS
#     prefilled ~200-byte items; req/s, and the nodes' CPU per request;
#  3. the same through the ring-aware client (distrocache-client's `load`
#     example on core 1), which sends each request straight to an owner
#     (reads to the owner with the fewest of its requests in flight, the
#     client's default; and, a diagnostic with no bar, to the primary),
#     with the client's CPU per GET and the nodes' (no bar): how busy the
#     client's core was says whether the client itself bounded req/s;
#     and a diagnostic with no bar, what a client that routes as this one
#     does reaches at wrk's cost per request: bar 2's wrk runs with each
#     wrk sending only keys its node owns (GETs spread over the owners,
#     SETs to the primary), against bar 2's one node;
#     2 and 3 in $ROUNDS rounds, the one node and the cluster running side by
#     side and measured back to back in each round; the bars are judged on
#     the median of the rounds' ratios, and every round's ratio is printed
#     (five by default: one round's ratio swings by 0.2 on a shared machine);
#     the cluster's peer requests per SET (forwards and replications, from
#     the nodes' metrics) are printed beside the SET ratio (no bar);
#     a diagnostic (no bar) says where a cluster GET's cost comes from: after
#     the rounds, the same three nodes with rf 3 (every node owns every key,
#     so nothing is forwarded) against the one node, once;
#  4. rebalancing throughput: 2 nodes (rf 2) holding KEYS items, a third
#     joins and pulls its share; keys received / pull time.
#
#   bash bench/cluster.sh            # DURATION=10s ROUNDS=5 CONNS=63 KEYS=200000 SET_KEYS=10000
#
# Installs wrk from Debian packages if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)
DURATION=${DURATION:-10s}
CONNS=${CONNS:-63}
KEYS=${KEYS:-200000}
SET_KEYS=${SET_KEYS:-10000}
ROUNDS=${ROUNDS:-5}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
need wrk

# The binary the images ship, the profile-guided release build, unless
# NODE_BIN names another (e.g. target/release/cache-node, the plain build).
NODE_BIN=${NODE_BIN:-$(bash scripts/build-pgo.sh | tail -n 1)}
cargo build --release -q -p distrocache-client --example load
work=$(mktemp -d)
pids=()
stop_nodes() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
cleanup() { stop_nodes; rm -rf "$work"; }
trap cleanup EXIT
A=127.0.0.51 B=127.0.0.52 C=127.0.0.53 S=127.0.0.54 PORT=18300

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
node() { # id ip [flags...]: a cluster member (membership file)
  local id=$1 ip=$2; shift 2
  taskset -c "$SERVER_CORE" "$NODE_BIN" --node-id "$id" --bind-address "$ip" --port $PORT \
    --max-size 10000000 --log-level warn "$@" &
  pids+=($!)
}
member() { node "$1" "$2" --membership-file "$work/ring.json" --membership-poll-interval 100ms; }
wait_settled() { # ip epoch: its ring is at epoch and no data moves
  for _ in $(seq 1 600); do
    curl -sf "http://$1:$PORT/api/v1/cluster" | python3 -c '
import json, sys
v = json.load(sys.stdin); sys.exit(0 if v["epoch"] == int(sys.argv[1]) and v["settled"] else 1)' "$2" && return 0
    sleep 0.1
  done
  echo "$1 never settled at epoch $2" >&2; exit 1
}
peer_requests() { # ip...: forwards and replications those nodes sent so far
  for ip in "$@"; do curl -sf "http://$ip:$PORT/metrics"; done |
    awk '/^distrocache_peer_requests_total\{operation="(forward|replicate)"\}/ { n += $2 } END { printf "%d\n", n }'
}
prefill() { python3 bench/prefill.py "http://$1:$PORT" "$2"; }  # ip keys

source bench/wrk.sh  # wrk_run, wrk_spread, cpu_ticks, generator_us (the scripts run from the repository root)

# wrk_spread, plus the nodes' CPU per request (user + system time of every
# running node over the run; softirq time, which the kernel accounts
# apart, is not in it): "rps p99_ms us_per_request". Req/s on a shared core
# moves with the machine's other tenants from run to run; the CPU each
# request costs the nodes moves less, and it is what the capacity bars are
# about.
cpu_spread() { # with CPU_PIDS, the nodes whose CPU counts
  local c0 c1 out rps p99
  c0=$(cpu_ticks $CPU_PIDS)
  out=$(wrk_spread "$@") || return 1
  c1=$(cpu_ticks $CPU_PIDS)
  read -r rps p99 <<<"$out"
  echo "$rps $p99 $(us_per_request "$c0" "$c1" "$rps")"
}

wrk_scripts "$SET_KEYS"  # $work/get.lua, $work/set.lua, SET_BODY

echo "== 1. forwarded vs local GET (rf 1, 2 nodes)" >&2
ring 1 1 a=$A b=$B
member a $A; member b $B
wait_ready "http://$A:$PORT"; wait_ready "http://$B:$PORT"
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
stop_nodes

echo "== 2 and 3. one node vs a 3-node cluster (rf 2) on one core, $CONNS connections, $ROUNDS rounds" >&2
# The single node and the cluster run side by side (idle while the other is
# measured), and each round measures one right after the other: the
# machine's other tenants move req/s by up to 2x over minutes, and a ratio of
# two runs taken seconds apart moves far less than one of runs minutes apart.
node s $S
single=("${pids[@]}")
ring 1 2 a=$A b=$B c=$C
member a $A; member b $B; member c $C
cluster=("${pids[@]:1}")
wait_ready "http://$S:$PORT"; wait_ready "http://$A:$PORT"; wait_ready "http://$B:$PORT"; wait_ready "http://$C:$PORT"
prefill $S "$SET_KEYS"
prefill $A "$SET_KEYS"
# For the diagnostic of what a ring-aware client can reach: wrk scripts that
# send each request straight to an owner, as the client does. Each wrk picks
# the keys of the node it is pointed at (`wrk.host`): for GETs, every key is
# given to the one of its owners given fewest so far (a third each, as the
# client's least-busy reads spread them); for SETs, the keys it is primary of.
python3 - "$A" "$PORT" "$SET_KEYS" "$work" "$SET_BODY" <<'PY'
import http.client, json, sys
ip, port, n, work, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
members = {}
conn = http.client.HTTPConnection(ip, port)
conn.request("GET", "/api/v1/cluster")
for m in json.loads(conn.getresponse().read())["members"]:
    members[m["id"]] = m["clientAddress"].rsplit(":", 1)[0]
reads = {m: [] for m in members}
writes = {m: [] for m in members}
for i in range(1, n + 1):
    conn.request("GET", f"/api/v1/cluster?key=bench:{i}")
    owners = json.loads(conn.getresponse().read())["owners"]
    reads[min(owners["owners"], key=lambda m: len(reads[m]))].append(i)
    writes[owners["primary"]].append(i)
def table(by_member):
    return "{" + ", ".join(f'["{members[m]}"] = {{{",".join(map(str, keys))}}}' for m, keys in by_member.items()) + "}"
with open(f"{work}/owner-get.lua", "w") as f:
    f.write(f"math.randomseed(42)\nlocal by_host = {table(reads)}\nlocal keys = by_host[wrk.host]\n")
    f.write('request = function() return wrk.format("GET", "/api/v1/cache/bench:" .. keys[math.random(1, #keys)]) end\n')
with open(f"{work}/owner-set.lua", "w") as f:
    f.write(f"math.randomseed(7)\nlocal by_host = {table(writes)}\nlocal keys = by_host[wrk.host]\n")
    f.write(f"local body = '{body}'\n")
    f.write('local headers = { ["Content-Type"] = "application/json" }\n')
    f.write('request = function() return wrk.format("POST", "/api/v1/cache/bench:" .. keys[math.random(1, #keys)], headers, body) end\n')
PY
# The ring-aware client on the client core, with CPU_PIDS the nodes whose
# CPU counts: "rps p99_ms nodes_us_per_request client_us_per_request" (the
# client's CPU from `times` in the run's own subshell). A client busy all
# its run (its CPU per request times req/s near one second a second) bounds
# req/s itself, and the bar then compares what it costs the client to
# drive one node and three.
client_load() { # op url [flags...]
  local op=$1 url=$2 c0 c1 out rps p99 all
  shift 2
  # Called in `$(...)`, where set -e does not hold: each step fails the
  # function itself, so a failed run stops the script at its caller.
  c0=$(cpu_ticks $CPU_PIDS)
  out=$(taskset -c "$CLIENT_CORE" target/release/examples/load --duration "$DURATION" --connections "$CONNS" \
    --keys "$SET_KEYS" --op "$op" "$@" "$url" > "$work/load.out" && times) || return 1
  c1=$(cpu_ticks $CPU_PIDS)
  read -r rps p99 < "$work/load.out" || return 1
  all=$(generator_us "$out" "$rps") || return 1
  echo "$rps $p99 $(us_per_request "$c0" "$c1" "$rps") ${all%% *}"
}
rounds="$work/rounds.txt"
: > "$rounds"
for round in $(seq 1 "$ROUNDS"); do
  echo "   round $round" >&2
  # Assignments, not `read < <(...)`, so a failed run stops the script (set -e).
  out=$(CPU_PIDS="${single[*]}" cpu_spread single-get "$work/get.lua" "http://$S:$PORT" "http://$S:$PORT" "http://$S:$PORT")
  echo "single_get $out" >> "$rounds"
  out=$(CPU_PIDS="${cluster[*]}" cpu_spread cluster-get "$work/get.lua" "http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
  echo "cluster_get $out" >> "$rounds"
  out=$(CPU_PIDS="${cluster[*]}" cpu_spread cluster-get-owner "$work/owner-get.lua" "http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
  echo "cluster_get_owner $out" >> "$rounds"
  out=$(CPU_PIDS="${single[*]}" cpu_spread single-set "$work/set.lua" "http://$S:$PORT" "http://$S:$PORT" "http://$S:$PORT")
  echo "single_set $out" >> "$rounds"
  sent=$(peer_requests $A $B $C)
  out=$(CPU_PIDS="${cluster[*]}" cpu_spread cluster-set "$work/set.lua" "http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
  echo "cluster_set $out" >> "$rounds"
  echo "$(( $(peer_requests $A $B $C) - sent ))" >> "$work/peer.txt"
  out=$(CPU_PIDS="${cluster[*]}" cpu_spread cluster-set-owner "$work/owner-set.lua" "http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
  echo "cluster_set_owner $out" >> "$rounds"
  out=$(CPU_PIDS="${single[*]}" client_load get "http://$S:$PORT")
  echo "single_cget $out" >> "$rounds"
  out=$(CPU_PIDS="${cluster[*]}" client_load get "http://$A:$PORT")
  echo "cluster_cget $out" >> "$rounds"
  out=$(CPU_PIDS="${cluster[*]}" client_load get "http://$A:$PORT" --read-from primary)
  echo "cluster_cget_primary $out" >> "$rounds"
done
# Diagnostic, no bar: the same three processes with rf 3, where every node
# owns every key and forwards nothing, against the one node once more.
ring 2 3 a=$A b=$B c=$C
wait_settled $A 2; wait_settled $B 2; wait_settled $C 2
out=$(CPU_PIDS="${single[*]}" cpu_spread single-get-rf3 "$work/get.lua" "http://$S:$PORT" "http://$S:$PORT" "http://$S:$PORT")
echo "single_get_rf3 $out" > "$work/rf3.txt"
out=$(CPU_PIDS="${cluster[*]}" cpu_spread cluster-get-rf3 "$work/get.lua" "http://$A:$PORT" "http://$B:$PORT" "http://$C:$PORT")
echo "cluster_get_rf3 $out" >> "$work/rf3.txt"
stop_nodes

echo "== 4. rebalancing throughput ($KEYS keys, rf 2, a 3rd node joins)" >&2
ring 1 2 a=$A b=$B
member a $A; member b $B
wait_ready "http://$A:$PORT"; wait_ready "http://$B:$PORT"
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
member c $C
wait_ready "http://$C:$PORT"
progress=$(curl -s "http://$C:$PORT/api/v1/cluster/rebalance")

python3 - "$local_rps" "$local_p99" "$fwd_rps" "$fwd_p99" "$progress" "$CONNS" "$DURATION" "$rounds" "$work/rf3.txt" "$work/peer.txt" <<'PY'
import json, re, statistics, sys
lr, lp, fr, fp = map(float, sys.argv[1:5])
p = json.loads(sys.argv[5])
conns, duration = sys.argv[6], sys.argv[7]
rounds = []  # per round: {name: (rps, p99, nodes' us per request[, the client's])}
for line in open(sys.argv[8]):
    name, *figures = line.split()
    if name == "single_get":
        rounds.append({})
    rounds[-1][name] = tuple(map(float, figures))
print(f"servers on one core, load on another, {conns} connections, {duration} per run,"
      f" {len(rounds)} rounds (one node and the cluster measured back to back in each)")
print(f"{'':36}{'req/s per round':>30}{'p99 ms':>10}")
rows = [("2. GET, one node", "single_get"), ("   GET, 3 nodes rf 2", "cluster_get"),
        ("   SET, one node", "single_set"), ("   SET, 3 nodes rf 2", "cluster_set"),
        ("   GET, wrk straight to an owner", "cluster_get_owner"), ("   SET, wrk straight to the primary", "cluster_set_owner"),
        ("3. GET via client, one node", "single_cget"), ("   GET via client, 3 nodes rf 2", "cluster_cget"),
        ("   same, reads to the primary", "cluster_cget_primary")]
print(f"{'1. local GET (2 nodes, rf 1)':36}{lr:30.0f}{lp:10.3f}")
print(f"{'   forwarded GET':36}{fr:30.0f}{fp:10.3f}")
for label, name in rows:
    figures = " ".join(f"{r[name][0]:8.0f}" for r in rounds)
    print(f"{label:36}{figures:>30}{max(r[name][1] for r in rounds):10.3f}")
def ratios(num, den, at=0):
    return [r[num][at] / r[den][at] for r in rounds]
def show(rs):
    return f"{statistics.median(rs):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in rs)})"
print()
print(f"1. forwarded GET costs {lr / fr:.2f}x a local one (bar <= 1.5)")
print(f"2. cluster / single node, median of the rounds: GET {show(ratios('cluster_get', 'single_get'))} (bar >= 0.8)")
print(f"                                                SET {show(ratios('cluster_set', 'single_set'))} (bar >= 0.5)")
amount, unit = re.fullmatch(r"(\d+)([smh]?)", duration).groups()
seconds = int(amount) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]
sent = [int(l) for l in open(sys.argv[10])]
per_set = [n / (r["cluster_set"][0] * seconds) for n, r in zip(sent, rounds)]
print(f"   peer requests per cluster SET (forwards and replications): {statistics.median(per_set):.2f}"
      f" (rounds: {', '.join(f'{x:.2f}' for x in per_set)})")
print(f"   nodes' CPU per request, single / cluster: GET {show(ratios('single_get', 'cluster_get', 2))},"
      f" SET {show(ratios('single_set', 'cluster_set', 2))}")
rf3 = {name: (float(rps), float(us)) for name, rps, _, us in (l.split() for l in open(sys.argv[9]))}
print(f"   diagnostic: rf 3 (nothing forwarded), one run: GET {rf3['cluster_get_rf3'][0] / rf3['single_get_rf3'][0]:.2f}x,"
      f" CPU per request {rf3['single_get_rf3'][1] / rf3['cluster_get_rf3'][1]:.2f}x")
print(f"3. through distrocache-client: GET {show(ratios('cluster_cget', 'single_cget'))} (bar >= 0.95)")
print(f"   the client's CPU per GET, one node / 3 nodes: {show(ratios('single_cget', 'cluster_cget', 3))};"
      f" its core busy {statistics.median(r['single_cget'][0] * r['single_cget'][3] / 1e6 for r in rounds):.0%}"
      f" / {statistics.median(r['cluster_cget'][0] * r['cluster_cget'][3] / 1e6 for r in rounds):.0%} (medians)")
print(f"   the nodes' CPU per GET, one node / 3 nodes: {show(ratios('single_cget', 'cluster_cget', 2))}")
print(f"   diagnostic: reads to the primary (ReadFrom::Primary): GET {show(ratios('cluster_cget_primary', 'single_cget'))}")
print(f"   diagnostic: wrk sending each request straight to an owner, against wrk and the one node:"
      f" GET {show(ratios('cluster_get_owner', 'single_get'))}, SET to the primary {show(ratios('cluster_set_owner', 'single_set'))}")
secs = p["lastSyncSeconds"]
print(f"4. rebalancing: the joining node pulled {p['keysReceived']} keys in {secs:.2f}s = {p['keysReceived'] / secs:,.0f} keys/s")
PY
