#!/usr/bin/env bash
# Soak benchmark (not a timed test): one cache node under mixed load for a
# long time, with a small --max-size and --max-memory so it evicts all the
# time and short TTLs so items expire all the time; then consistency checks.
#
#   bash bench/soak.sh [DURATION]      # default 10m; e.g. 30s, 1h
#
# The load generator is cache-node/examples/soak_load.rs (no system
# dependencies): 16 clients, each owning 2,000 keys, doing 50% GETs, 35%
# SETs (0-3 of 32 tags; 60% with a 1-3 s TTL, the rest 1 h), 14.99% DELETEs
# and 0.01% tag invalidations. It samples the node's resident memory along the way
# and at the end checks that /api/v1/stats adds up against what the clients
# saw, that no read returned an expired or stale item, and that the tag index
# agrees with the items (see the example's doc comment for the identities).
# Prints a report; exits non-zero if a check fails. Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-10m}
PORT=${PORT:-18090}
MAX_SIZE=${MAX_SIZE:-5000}
MAX_MEMORY=${MAX_MEMORY:-2MiB}

cargo build --release -q -p cache-node --bin cache-node --example soak_load

log=$(mktemp)
target/release/cache-node --bind-address 127.0.0.1 --port "$PORT" \
  --max-size "$MAX_SIZE" --max-memory "$MAX_MEMORY" --cleanup-interval 1s \
  --default-ttl 5s --log-level warn 2> "$log" &
node=$!
cleanup() { kill "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

for _ in $(seq 1 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.05
done

echo "soak: node pid $node on 127.0.0.1:$PORT, --max-size $MAX_SIZE --max-memory $MAX_MEMORY, for $DURATION" >&2
status=0
target/release/examples/soak_load --addr "127.0.0.1:$PORT" --duration "$DURATION" --pid "$node" || status=$?
if ! kill -0 "$node" 2>/dev/null; then
  echo "the node died during the soak; its log:" >&2
  cat "$log" >&2
  status=1
fi
if [ -s "$log" ]; then
  echo "node warnings/errors:" >&2
  tail -n 20 "$log" >&2
fi
exit $status
