#!/usr/bin/env bash
# What the load generators themselves cost: wrk and distrocache-client's
# `load` example (the generator of bench/cluster.sh's section 3) in turn
# against the same single node (core 0), each on core 1 with $CONNS
# connections, GETs of random keys of $SET_KEYS prefilled ~200-byte items,
# $ROUNDS rounds. Prints each run's req/s and the generator's CPU per GET
# (user + system, and user alone, from bash's `times` for the run's
# subshell). Both generators run their core near its limit, so req/s is
# bounded by whichever costs more per request; this says how much of bar
# 3's gap is the client's own cost (README, the benchmark table).
#
#   bash bench/loadgen.sh            # DURATION=6s ROUNDS=3 CONNS=63 SET_KEYS=10000
#
# Installs wrk from Debian packages if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)
DURATION=${DURATION:-6s}
CONNS=${CONNS:-63}
SET_KEYS=${SET_KEYS:-10000}
ROUNDS=${ROUNDS:-3}
need wrk

NODE_BIN=${NODE_BIN:-$(bash scripts/build-pgo.sh | tail -n 1)}
cargo build --release -q -p distrocache-client --example load
LOAD=target/release/examples/load
work=$(mktemp -d)
S=127.0.0.54 PORT=18300
taskset -c 0 "$NODE_BIN" --node-id s --bind-address $S --port $PORT --max-size 10000000 --log-level warn &
node=$!
trap 'kill $node 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
wait_ready "http://$S:$PORT"
python3 bench/prefill.py "http://$S:$PORT" "$SET_KEYS"

source bench/wrk.sh  # wrk_scripts, wrk_run, generator_us (the scripts run from the repository root)
wrk_scripts "$SET_KEYS"  # $work/get.lua
CLIENT_CORE=1
row() { # label rps times
  local us all user
  us=$(generator_us "$3" "$2")
  read -r all user <<<"$us"
  printf "%-24s %9.0f %12s %12s\n" "$1" "$2" "$all" "$user"
}

printf "%-24s %9s %12s %12s\n" "generator, one node" "req/s" "CPU us/GET" "user us/GET"
for _ in $(seq 1 "$ROUNDS"); do
  # Each run in a subshell of its own, whose `times` is that run alone; a
  # failed run fails the subshell, which stops the script (set -e).
  out=$(wrk_run wrk -s "$work/get.lua" "http://$S:$PORT" > "$work/wrk.figures" && times)
  read -r rps _ < "$work/wrk.figures"
  row wrk "$rps" "$out"
  out=$(taskset -c "$CLIENT_CORE" "$LOAD" --duration "$DURATION" --connections "$CONNS" --keys "$SET_KEYS" \
    --op get "http://$S:$PORT" > "$work/load.out" && times)
  read -r rps _ < "$work/load.out"
  row "distrocache-client load" "$rps" "$out"
done
