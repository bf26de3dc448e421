#!/usr/bin/env bash
# Snapshot benchmark (not a timed test): how fast a node writes and loads a
# snapshot of ITEMS items (default 1 million) with 200-byte values, and what
# a periodic snapshot does to GET latency.
#
#   bash bench/snapshot.sh                 # ITEMS=1000000 GET_SECONDS=20 INTERVAL=3s
#
# The static release cache-node the images carry, on 127.0.0.1, pinned to
# core 0; wrk (64 keep-alive connections) pinned to core 1, as the other
# benchmarks do (DESIGN 7).
#  1. node A (--data-dir, no periodic snapshot): wrk writes keys 1..ITEMS
#     (200-byte values, one of 16 tags, one-hour TTL); then GET_SECONDS of
#     random GETs: the baseline p50/p99; then SIGTERM: the graceful snapshot
#     (items, bytes, time from its log line).
#  2. node B on the same directory with --snapshot-interval INTERVAL: its
#     load at start (items, bytes, time, from its metrics) and the time from
#     its start to its first answer; then GET_SECONDS of the same GETs while
#     it writes a snapshot every INTERVAL: p50/p99, and how many snapshots
#     it wrote meanwhile and how long the last took.
# Prints one table. Installs wrk from Debian packages if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)

ITEMS=${ITEMS:-1000000}
GET_SECONDS=${GET_SECONDS:-20}
INTERVAL=${INTERVAL:-3s}
FILL_SECONDS=${FILL_SECONDS:-120}
PORT=${PORT:-18092}
need wrk
if [ -z "${BIN:-}" ]; then
  # BIN=... runs another build (e.g. a debug one, for a quick check of the script).
  TRIPLE=$(uname -m)-unknown-linux-gnu
  UPPER=${TRIPLE^^}
  export "CARGO_TARGET_${UPPER//-/_}_RUSTFLAGS=-C target-feature=+crt-static"
  cargo build --release -q --locked --target "$TRIPLE" -p cache-node --bin cache-node \
    -p distrocache-operator --bin distrocache-operator
  BIN=target/$TRIPLE/release/cache-node
fi

work=$(mktemp -d)
node=""
cleanup() {
  # Waited for: a node stopped by SIGTERM writes its last snapshot into
  # $work/data on the way out, which would race the rm.
  if [ -n "$node" ]; then
    kill "$node" 2>/dev/null || true
    wait "$node" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
URL=http://127.0.0.1:$PORT

# bench/fill.lua writes keys 1..ITEMS; this reads random ones.
cat >"$work/get.lua" <<EOF
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/api/v1/cache/key:" .. math.random(1, $ITEMS))
end
EOF

start() {
  taskset -c 0 "$BIN" --bind-address 127.0.0.1 --port "$PORT" --max-size $((ITEMS * 2)) \
    --default-ttl 1h --data-dir "$work/data" --log-format json --log-level info "$@" 2>>"$work/node.log" &
  node=$!
  wait_ready "$URL" 1200  # a single node: ready once it serves (its snapshot loads before it listens)
}
items() { curl -sf "$URL/api/v1/stats" | python3 -c 'import json,sys;print(json.load(sys.stdin)["items"])'; }
metric() { curl -sf "$URL/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# p50 and p99 in milliseconds from wrk --latency output.
percentiles() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(p):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
    v, u = float(m[1]), m[2]
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)[1]
print(f"{ms(50):.3f} {ms(99):.3f} {float(rps):.0f}")
PY
}

# 1. Node A: fill, baseline GETs, graceful snapshot.
start
fill_started=$(date +%s.%N)
taskset -c 1 wrk -t2 -c64 -d"${FILL_SECONDS}s" -s bench/fill.lua "$URL" -- "$ITEMS" >"$work/fill.out" &
filler=$!
while [ "$(items)" -lt "$ITEMS" ]; do
  kill -0 "$filler" 2>/dev/null || { echo "wrk stopped before $ITEMS items (raise FILL_SECONDS)" >&2; exit 1; }
  sleep 0.5
done
kill "$filler" 2>/dev/null || true
wait "$filler" 2>/dev/null || true
fill_took=$(python3 -c "import time;print(f'{time.time() - $fill_started:.1f}')")
taskset -c 1 wrk -t2 -c64 -d"${GET_SECONDS}s" --latency -s "$work/get.lua" "$URL" >"$work/get-base.out"
read -r base_p50 base_p99 base_rps < <(percentiles "$work/get-base.out")
kill -TERM "$node"
wait "$node" || true
node=""
read -r w_items w_bytes w_secs < <(python3 - "$work/node.log" <<'PY'
import json, re, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line)["fields"]
    except (ValueError, KeyError):
        continue
    if f.get("message") == "wrote snapshot" and f.get("graceful"):
        m = re.fullmatch(r"([\d.]+)(ns|µs|us|ms|s)", f["took"])
        secs = float(m[1]) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1}[m[2]]
        print(f["items"], f["bytes"], secs)
PY
)

# 2. Node B: load, then GETs during periodic snapshots.
b_started=$(date +%s.%N)
start --snapshot-interval "$INTERVAL"
b_up=$(python3 -c "import time;print(f'{time.time() - $b_started:.2f}')")
l_items=$(metric distrocache_snapshot_loaded_items)
l_bytes=$(metric distrocache_snapshot_loaded_bytes)
l_secs=$(metric distrocache_snapshot_load_duration_seconds)
writes_before=$(metric 'distrocache_snapshot_writes_total{outcome="ok"}')
taskset -c 1 wrk -t2 -c64 -d"${GET_SECONDS}s" --latency -s "$work/get.lua" "$URL" >"$work/get-snap.out"
read -r snap_p50 snap_p99 snap_rps < <(percentiles "$work/get-snap.out")
writes=$(( $(metric 'distrocache_snapshot_writes_total{outcome="ok"}') - writes_before ))
last_write=$(metric distrocache_snapshot_last_write_duration_seconds)
rss=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$node/status")

python3 - <<PY
mib = 1 << 20
print(f"fill: $ITEMS items in ${fill_took}s")
print(f"snapshot write (graceful): {int('$w_items'):,} items, {int('$w_bytes') / mib:.1f} MiB in {float('$w_secs'):.2f}s"
      f" = {int('$w_items') / float('$w_secs'):,.0f} items/s, {int('$w_bytes') / mib / float('$w_secs'):.0f} MiB/s")
print(f"snapshot load at start: {int('$l_items'):,} items, {int('$l_bytes') / mib:.1f} MiB in {float('$l_secs'):.2f}s"
      f" = {int('$l_items') / float('$l_secs'):,.0f} items/s, {int('$l_bytes') / mib / float('$l_secs'):.0f} MiB/s;"
      f" start to first answer {float('$b_up'):.2f}s")
print(f"GET without snapshots:        p50 {float('$base_p50'):.3f} ms  p99 {float('$base_p99'):.3f} ms  {int('$base_rps'):,} req/s")
print(f"GET, snapshot every $INTERVAL: p50 {float('$snap_p50'):.3f} ms  p99 {float('$snap_p99'):.3f} ms  {int('$snap_rps'):,} req/s"
      f"  ({$writes} snapshots written meanwhile, the last in {float('$last_write'):.2f}s)")
print(f"node B peak resident memory: {int('$rss') / 1024:.0f} MiB")
PY
