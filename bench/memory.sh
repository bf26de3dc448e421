#!/usr/bin/env bash
# Resident memory per item: 1 million items with 100-byte values (keys like
# key:000000000042, 16 bytes), in cache-node's store and in Redis, in one run.
#
#   bash bench/memory.sh [ITEMS]
#
# cache-node: the memory_per_item example fills a store in-process and
# reports RSS growth / items. Redis: the same keys and values loaded with
# redis-cli --pipe; RSS growth / items and used_memory / items.
# Installs redis-server and redis-tools from Debian packages if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${1:-1000000}
PORT=18090

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi

echo "== cache-node ($ITEMS items, 100-byte values)"
cargo run --release -q -p cache-node --example memory_per_item -- "$ITEMS" | tee /tmp/distrocache-memory.txt

echo "== redis"
work=$(mktemp -d)
trap 'kill $redis 2>/dev/null || true; rm -rf "$work"' EXIT
redis-server --bind 127.0.0.1 --port $PORT --save '' --appendonly no --logfile "$work/redis.log" &
redis=$!
for _ in $(seq 1 100); do redis-cli -p $PORT ping >/dev/null 2>&1 && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$redis/status"; }
before=$(rss)
python3 - "$ITEMS" <<'PY' | redis-cli -p $PORT --pipe >/dev/null
import sys
n = int(sys.argv[1]); value = b"v" * 100
out = sys.stdout.buffer
for i in range(n):
    key = b"key:%012d" % i
    out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
PY
after=$(rss)
used=$(redis-cli -p $PORT info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
keys=$(redis-cli -p $PORT dbsize)
python3 - "$before" "$after" "$used" "$keys" <<'PY'
import sys
before, after, used, keys = map(int, sys.argv[1:5])
print(f"items={keys}")
print(f"rss_bytes_per_item={(after - before) / keys:.1f}")
print(f"used_memory_bytes_per_item={used / keys:.1f}")
print(f"payload_bytes_per_item={16 + 100:.1f}")
PY
