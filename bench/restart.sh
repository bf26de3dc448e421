#!/usr/bin/env bash
# Whole-cache restart benchmark (not a timed test): a 3-node cluster
# (replication factor 2) holding ITEMS items (default 1 million, 200-byte
# values, one of 16 tags, one-hour TTL), on loopback, release build:
#  1. with persistence (--data-dir): every node stopped at once (SIGTERM:
#     each writes its snapshot; the time it took, from its log), then
#     started again: time from the start to every node ready, and the items
#     back;
#  2. a backup of the cache to an S3-compatible server (gofakes3, built by
#     scripts/build-tools.sh) on loopback: each node's upload time, items/s
#     and MiB/s;
#  3. the backup restored into 3 new nodes with empty data directories
#     (--restore-from): time from the start to every node ready, the items
#     back;
#  4. without persistence: 3 new nodes, empty: time from the start to every
#     node ready (the cache comes back empty).
#
#   bash bench/restart.sh            # ITEMS=1000000 FILL_SECONDS=300
#
# Installs wrk from Debian packages if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need (the scripts run from the repository root)

ITEMS=${ITEMS:-1000000}
FILL_SECONDS=${FILL_SECONDS:-300}
PORT=18400
need wrk
cargo build --release -q --locked -p cache-node
BIN=target/release/cache-node
TOOLS=$(bash scripts/build-tools.sh 2>/dev/null | tail -n 1)

work=$(mktemp -d)
pids=()
s3=""
# With no nodes left, `wait` must not run: with no arguments it would wait
# for every child, gofakes3 too, for ever.
stop_nodes() {
  ((${#pids[@]})) || return 0
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
cleanup() { stop_nodes; [ -z "$s3" ] || kill "$s3" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
IPS=(127.0.0.61 127.0.0.62 127.0.0.63)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret

python3 - "${IPS[@]}" > "$work/ring.json" <<'PY'
import json, sys
print(json.dumps({"epoch": 1, "replicationFactor": 2, "members": [
    {"id": f"node-{i}", "address": f"{ip}:18400", "state": "active"} for i, ip in enumerate(sys.argv[1:])]}))
PY

"$TOOLS/gofakes3" -backend memory -initialbucket bench -host 127.0.0.1:0 -quiet 2>"$work/s3.log" &
s3=$!
for _ in $(seq 1 100); do grep -q "using port" "$work/s3.log" && break; sleep 0.1; done
S3_ENDPOINT="http://127.0.0.1:$(sed -n 's/.*using port: \([0-9]*\).*/\1/p' "$work/s3.log")"

# start NAME PERSIST [flags...]: the three nodes, logging to node-NAME-i.log,
# with PERSIST=1 each with --data-dir data-NAME-i.
start() {
  local name=$1 persist=$2; shift 2
  for i in 0 1 2; do
    local data=()
    if [ "$persist" = 1 ]; then mkdir -p "$work/data-$name-$i"; data=(--data-dir "$work/data-$name-$i"); fi
    "$BIN" --node-id "node-$i" --bind-address "${IPS[$i]}" --port $PORT \
      --max-size $((ITEMS * 2)) --default-ttl 1h --log-format json --log-level info \
      --membership-file "$work/ring.json" --membership-poll-interval 100ms \
      --backup-url s3://bench/cache --backup-endpoint "$S3_ENDPOINT" "${data[@]}" "$@" \
      2>>"$work/node-$name-$i.log" &
    pids+=($!)
  done
}
# Seconds until every node answers ready (started at $1).
until_ready() {
  local started=$1
  for _ in $(seq 1 6000); do
    local ready=0
    for ip in "${IPS[@]}"; do curl -sf "http://$ip:$PORT/api/v1/ready" >/dev/null && ready=$((ready + 1)); done
    [ "$ready" = 3 ] && { python3 -c "import time;print(f'{time.time() - $started:.2f}')"; return; }
    sleep 0.05
  done
  echo "the nodes did not turn ready; logs in $work" >&2
  exit 1
}
items() { # the items held over the three nodes
  local sum=0
  for ip in "${IPS[@]}"; do
    sum=$((sum + $(curl -sf "http://$ip:$PORT/api/v1/stats" | python3 -c 'import json,sys;print(json.load(sys.stdin)["items"])')))
  done
  echo "$sum"
}
snapshot_secs() { # the graceful snapshot's items and seconds, from the node logs of $1
  python3 - "$work" "$1" <<'PY'
import glob, json, re, sys
work, suffix = sys.argv[1], sys.argv[2]
items, secs = 0, 0.0
for path in sorted(glob.glob(f"{work}/node-{suffix}-*.log")):
    for line in open(path):
        try:
            f = json.loads(line)["fields"]
        except (ValueError, KeyError):
            continue
        if f.get("message") == "wrote snapshot" and f.get("graceful"):
            m = re.fullmatch(r"([\d.]+)(ns|µs|us|ms|s)", f["took"])
            took = float(m[1]) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1}[m[2]]
            items += f["items"]
            secs = max(secs, took)
print(items, f"{secs:.2f}")
PY
}


echo "== filling $ITEMS items (rf 2) with persistence" >&2
start p 1
until_ready "$(date +%s.%N)" >/dev/null
wrk -t2 -c64 -d"${FILL_SECONDS}s" -s bench/fill.lua "http://${IPS[0]}:$PORT" -- "$ITEMS" >"$work/fill.out" &
filler=$!
while [ "$(items)" -lt $((ITEMS * 2)) ]; do
  kill -0 "$filler" 2>/dev/null || { echo "wrk stopped before $ITEMS items (raise FILL_SECONDS)" >&2; exit 1; }
  sleep 1
done
kill "$filler" 2>/dev/null || true
wait "$filler" 2>/dev/null || true

echo "== 2. backup to S3 (gofakes3 on loopback)" >&2
backup=$(python3 - "${IPS[@]}" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
def put(ip):
    req = urllib.request.Request(f"http://{ip}:18400/api/v1/backups/bench-1", method="PUT")
    return json.load(urllib.request.urlopen(req, timeout=600))
started = time.time()
with ThreadPoolExecutor(3) as pool:
    parts = list(pool.map(put, sys.argv[1:]))
took = time.time() - started
items = sum(p["items"] for p in parts)
size = sum(p["bytes"] for p in parts)
slowest = max(p["seconds"] for p in parts)
print(f"{items} {size} {took:.2f} {slowest:.2f}")
PY
)
read -r b_items b_bytes b_secs b_slowest <<<"$backup"

echo "== 1. whole-cache restart with persistence" >&2
stop_nodes
read -r s_items s_secs < <(snapshot_secs p)
started=$(date +%s.%N)
start p 1
p_ready=$(until_ready "$started")
p_items=$(items)

echo "== 3. restore into 3 new nodes" >&2
stop_nodes
started=$(date +%s.%N)
start r 0 --restore-from bench-1
r_ready=$(until_ready "$started")
r_items=$(items)

echo "== 4. without persistence: 3 new nodes, empty" >&2
stop_nodes
started=$(date +%s.%N)
start e 0
e_ready=$(until_ready "$started")
e_items=$(items)
stop_nodes

python3 - <<PY
mib = 1 << 20
items = $ITEMS
print(f"3 nodes, replication factor 2, {items:,} items ({2 * items:,} copies), 200-byte values")
print(f"1. persistence: graceful snapshots {int('$s_items'):,} items, the slowest node in {float('$s_secs'):.2f}s;"
      f" restart to every node ready {float('$p_ready'):.2f}s, {int('$p_items'):,} copies back")
print(f"2. backup: {int('$b_items'):,} items, {int('$b_bytes') / mib:.0f} MiB uploaded in {float('$b_secs'):.2f}s"
      f" (slowest node {float('$b_slowest'):.2f}s) = {int('$b_items') / float('$b_secs'):,.0f} items/s,"
      f" {int('$b_bytes') / mib / float('$b_secs'):.0f} MiB/s")
print(f"3. restore into 3 new nodes: start to every node ready {float('$r_ready'):.2f}s, {int('$r_items'):,} copies back"
      f" = {int('$r_items') / float('$r_ready'):,.0f} items/s")
print(f"4. without persistence: start to every node ready {float('$e_ready'):.2f}s, {int('$e_items'):,} items (empty)")
PY
