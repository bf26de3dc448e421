#!/usr/bin/env bash
# The cache node as it ships: a static release binary optimised with a
# profile of its own request paths (profile-guided optimisation, PGO).
#
#   bash scripts/build-pgo.sh        # prints the binary's absolute path on its last line
#
# Why. A cluster request runs the HTTP server, the executor, the peer
# client and the peer server of two processes; their code no longer fits
# the instruction caches, and a profile of where requests go lets LLVM lay
# the hot paths out together, inline along them and move cold code
# (errors, rare operations) aside. Measured on the benchmarks' loopback
# set-up (one core for the nodes), node CPU per request against the plain
# release build: SETs 6-16% cheaper, GETs about 2% (README, "Profile-guided
# build").
#
# How, in three steps:
#  1. build cache-node instrumented (-Cprofile-generate), in its own target
#     directory so the plain builds keep theirs;
#  2. train it: one node, then a 3-node cluster (replication factor 2), on
#     loopback, each driven with SETs and GETs of random keys, by wrk with
#     its connections spread over the nodes (as a Service spreads clients,
#     so the cluster forwards and replicates) and by the ring-aware client's
#     `load` example, then a round of the other operations (delete, tags,
#     stats, metrics); the nodes stop with SIGTERM, which is when they write
#     their profiles, and each must exit cleanly and leave one;
#  3. merge the profiles (llvm-profdata, from rustup's llvm-tools) and build
#     the release binary with -Cprofile-use, static like the images'
#     (+crt-static, built for the host's target triple); then start it once
#     and check that it answers a write and a read.
# The training takes about a minute and is skipped when neither the
# instrumented binary nor this script changed. Any change to the node means
# a new profile, and step 3 then compiles every crate again (new flags):
# about 10 minutes from nothing, 5 after a change.
# Needs curl; installs wrk from Debian packages if missing (as root).
# Loopback only (127.0.0.71-74). One run at a time (a lock in target/pgo).
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."

command -v curl >/dev/null || { echo "build-pgo.sh needs curl (apt-get install curl)" >&2; exit 1; }
if ! command -v wrk >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } ||
    { echo "build-pgo.sh needs wrk (apt-get install wrk)" >&2; exit 1; }
fi
PGO=$PWD/target/pgo
PROFILES=$PGO/profiles
mkdir -p "$PGO"
exec 9>"$PGO/lock"
flock 9

# The flags below are the whole of what this build is compiled with.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
UPPER=${TRIPLE^^}
UPPER=${UPPER//-/_}
# Flags for the target triple only: build scripts and proc macros (built
# for the host without --target's flags) are neither instrumented nor static.
RUSTFLAGS_VAR="CARGO_TARGET_${UPPER}_RUSTFLAGS"
STATIC="-C target-feature=+crt-static"

# llvm-profdata must read what this rustc's LLVM writes: take rustup's.
profdata=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -n 1 || true)
if [ -z "$profdata" ]; then
  rustup component add llvm-tools >&2
  profdata=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata | head -n 1)
fi

echo "==> PGO 1/3: instrumented build" >&2
export "$RUSTFLAGS_VAR=$STATIC -C profile-generate=$PROFILES"
cargo build --release -q --locked --target "$TRIPLE" --target-dir target/pgo/generate \
  -p cache-node --bin cache-node >&2
unset "$RUSTFLAGS_VAR"
# The load generator: a plain host build (not instrumented, not static).
cargo build --release -q --locked --target-dir target/pgo/generate \
  -p distrocache-client --example load >&2
TRAINEE=target/pgo/generate/$TRIPLE/release/cache-node
LOAD=target/pgo/generate/release/examples/load

work=$(mktemp -d)
pids=()
# Stops the nodes started; each must exit cleanly (a node that crashed or
# failed to shut down wrote no trustworthy profile).
stop_nodes() {
  local p failed=0
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  pids=()
  ((failed == 0)) || { echo "PGO: a node did not exit cleanly" >&2; exit 1; }
}
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
PORT=18400
node() { # binary id ip [flags...]
  local bin=$1 id=$2 ip=$3
  shift 3
  LLVM_PROFILE_FILE="$PROFILES/node-%p.profraw" "$bin" --node-id "$id" --bind-address "$ip" \
    --port $PORT --log-level warn "$@" &
  pids+=($!)
}
wait_ready() { # ip: its node answers ready, and every node started still runs
  local p
  for _ in $(seq 1 300); do
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "PGO: a node exited early (port $PORT on 127.0.0.7x taken?)" >&2; exit 1; }
    done
    curl -sf "http://$1:$PORT/api/v1/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "PGO: the node on $1 never became ready" >&2
  exit 1
}
drive() { # url...: load spread over them, then the other operations through the first
  local script url wpids p
  # As clients behind a Service send it: every node gets its share, and a
  # node forwards what it does not own. SETs first, so that every GET hits.
  for script in set get; do
    wpids=()
    for url in "$@"; do
      wrk -t1 -c8 -d4s -s "$work/$script.lua" "$url" >/dev/null &
      wpids+=($!)
    done
    for p in "${wpids[@]}"; do wait "$p"; done
  done
  # As the ring-aware client sends it (it fails on any miss or error).
  "$LOAD" --duration 3s --connections 32 --keys 1000 --op get "$1" >/dev/null
  for i in $(seq 1 200); do
    curl -sf -X PUT "$1/api/v1/cache/pgo:$i" -H 'Content-Type: application/json' \
      -d "{\"value\":{\"n\":$i},\"ttl\":60,\"tags\":[\"pgo\",\"t$((i % 7))\"]}" >/dev/null
    curl -sf "$1/api/v1/cache/pgo:$i" >/dev/null
    curl -s -o /dev/null "$1/api/v1/cache/absent:$i"
  done
  for i in $(seq 1 100); do curl -sf -X DELETE "$1/api/v1/cache/pgo:$i" >/dev/null; done
  for t in 1 2 3; do curl -sf -X POST "$1/api/v1/invalidate/tag/t$t" >/dev/null; done
  curl -sf "$1/api/v1/stats" >/dev/null
  curl -sf "$1/metrics" >/dev/null
}
# Leaves one $PROFILES/node-<pid>.profraw per node run: 4.
train() {
  rm -rf "$PROFILES"
  mkdir -p "$PROFILES"
  cat >"$work/get.lua" <<'LUA'
request = function() return wrk.format("GET", "/api/v1/cache/bench:" .. math.random(1, 1000)) end
LUA
  cat >"$work/set.lua" <<LUA
local body = '{"value":"$(printf 'v%.0s' $(seq 1 200))","ttl":3600,"tags":["bench"]}'
local headers = { ["Content-Type"] = "application/json" }
request = function() return wrk.format("POST", "/api/v1/cache/bench:" .. math.random(1, 1000), headers, body) end
LUA
  node "$TRAINEE" s 127.0.0.71
  wait_ready 127.0.0.71
  drive "http://127.0.0.71:$PORT"
  stop_nodes
  printf '{"epoch":1,"replicationFactor":2,"members":[%s,%s,%s]}\n' \
    '{"id":"a","address":"127.0.0.72:18400","state":"active"}' \
    '{"id":"b","address":"127.0.0.73:18400","state":"active"}' \
    '{"id":"c","address":"127.0.0.74:18400","state":"active"}' >"$work/ring.json"
  for m in a:72 b:73 c:74; do node "$TRAINEE" "${m%:*}" "127.0.0.${m#*:}" --membership-file "$work/ring.json"; done
  for n in 72 73 74; do wait_ready "127.0.0.$n"; done
  drive "http://127.0.0.72:$PORT" "http://127.0.0.73:$PORT" "http://127.0.0.74:$PORT"
  stop_nodes
  local written
  written=$(find "$PROFILES" -name 'node-*.profraw' | wc -l)
  [ "$written" -eq 4 ] || { echo "PGO: the training left $written profiles, not 4" >&2; exit 1; }
}

# A profile is kept beside the digest of the instrumented binary and the
# training (this script) it came from, so the same pair is not trained
# twice; its file is named by its own digest, so a new profile changes the
# build's flags and cargo rebuilds with it.
trainee_sum=$(cat "$TRAINEE" "$SELF" | sha256sum | cut -c1-16)
if [ -f "$PGO/trained-$trainee_sum" ] && [ -f "$(cat "$PGO/trained-$trainee_sum")" ]; then
  MERGED=$(cat "$PGO/trained-$trainee_sum")
  echo "==> PGO 2/3: this build was trained before ($MERGED)" >&2
else
  echo "==> PGO 2/3: training on loopback" >&2
  train
  "$profdata" merge -o "$PGO/merged.profdata" "$PROFILES"/node-*.profraw
  MERGED=$PGO/cache-node-$(sha256sum "$PGO/merged.profdata" | cut -c1-16).profdata
  rm -f "$PGO"/trained-* "$PGO"/cache-node-*.profdata
  mv "$PGO/merged.profdata" "$MERGED"
  echo "$MERGED" >"$PGO/trained-$trainee_sum"
fi

echo "==> PGO 3/3: optimised build" >&2
export "$RUSTFLAGS_VAR=$STATIC -C profile-use=$MERGED"
cargo build --release -q --locked --target "$TRIPLE" --target-dir target/pgo/use \
  -p cache-node --bin cache-node >&2
BUILT=$PWD/target/pgo/use/$TRIPLE/release/cache-node

# The binary that ships has not run yet: once, a write and a read.
node "$BUILT" check 127.0.0.71
wait_ready 127.0.0.71
curl -sf -X PUT "http://127.0.0.71:$PORT/api/v1/cache/check" -H 'Content-Type: application/json' \
  -d '{"value":"ok"}' >/dev/null
curl -sf "http://127.0.0.71:$PORT/api/v1/cache/check" | grep -q '"value":"ok"' ||
  { echo "PGO: the optimised build did not read back its write" >&2; exit 1; }
stop_nodes
echo "$BUILT"
