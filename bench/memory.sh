#!/usr/bin/env bash
# Resident memory per item, cache-node's store beside Redis and memcached
# holding the same data, in one run (keys like key:000000000042, 16 bytes):
#
#   1. ITEMS items with 100-byte values (bar: <= 0.9x Redis, <= 1.0x memcached)
#   2. ITEMS items with 1 KiB values
#   3. ITEMS items with 100-byte values and 3 tags each (from a pool of
#      1,000 names); Redis holds the same tag index as one set per tag
#      (SADD tag key), memcached has no tags and is left out.
#   4. ITEMS items, then 90% of them deleted: the process's resident set
#      against a fresh process holding ITEMS/10 (bar: within 1.25x), for the
#      oldest 90% gone and for nine in ten gone everywhere.
#
#   bash bench/memory.sh [ITEMS]
#
# cache-node: the memory_per_item example fills a store in-process and
# reports RSS growth / items. Redis and memcached: loaded over loopback
# (redis-cli --pipe; pipelined `set ... noreply`), RSS growth / items.
# Installs redis-server, redis-tools and memcached from Debian packages if
# missing. One run each; ratios are within the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need (the scripts run from the repository root)
ITEMS=${1:-1000000}
RPORT=18090
MPORT=18091

need redis-server redis-cli=redis-tools memcached

# PROFILE=dev skips the long release build: the store's allocations and so
# the resident figures are the same, only the filling is slower.
PROFILE=${PROFILE:-release}
nice -n 19 cargo build --profile "$PROFILE" -q -p cache-node --example memory_per_item
dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
example=target/$dir/examples/memory_per_item
work=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

rss_of() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
field() { awk -F= -v k="$1" '$1 == k {print $2}' "$2"; }

# node VALUE_BYTES TAGS -> rss bytes per item
node() {
  "$example" "$ITEMS" "$1" "$2" >"$work/node.txt"
  field rss_bytes_per_item "$work/node.txt"
}

# redis VALUE_BYTES TAGS -> rss bytes per item
redis() {
  redis-server --bind 127.0.0.1 --port $RPORT --save '' --appendonly no \
    --logfile "$work/redis.log" --dir "$work" &
  server=$!
  for _ in $(seq 1 100); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.05; done
  local before after keys
  before=$(rss_of "$server")
  python3 - "$ITEMS" "$1" "$2" <<'PY' | redis-cli -p $RPORT --pipe >/dev/null
import sys
n, vlen, tags = map(int, sys.argv[1:4])
value = b"v" * vlen
out = sys.stdout.buffer
def cmd(*args):
    out.write(b"*%d\r\n" % len(args))
    for a in args:
        out.write(b"$%d\r\n%s\r\n" % (len(a), a))
for i in range(n):
    key = b"key:%012d" % i
    cmd(b"SET", key, value)
    for t in range(tags):
        cmd(b"SADD", b"tag:%03d" % ((i * 7 + t * 331) % 1000), key)
PY
  after=$(rss_of "$server")
  keys=$(redis-cli -p $RPORT dbsize)
  kill "$server"; wait "$server" 2>/dev/null || true; server=
  python3 -c "import sys; print(f'{($after - $before) / $ITEMS:.1f}')"
  # (dbsize counts the 1,000 tag sets too)
  [ "$keys" -ge "$ITEMS" ] || { echo "redis holds only $keys keys" >&2; exit 1; }
}

# memcached VALUE_BYTES -> rss bytes per item
memcached_run() {
  memcached -l 127.0.0.1 -p $MPORT -U 0 -m 16384 -u root &
  server=$!
  sleep 0.5
  local before after
  before=$(rss_of "$server")
  python3 - "$ITEMS" "$1" $MPORT <<'PY'
import socket, sys
n, vlen, port = map(int, sys.argv[1:4])
value = b"v" * vlen
s = socket.create_connection(("127.0.0.1", port))
batch = []
for i in range(n):
    batch.append(b"set key:%012d 0 0 %d noreply\r\n%s\r\n" % (i, vlen, value))
    if len(batch) == 1000:
        s.sendall(b"".join(batch)); batch = []
s.sendall(b"".join(batch) + b"stats\r\n")
buf = b""
while not buf.endswith(b"END\r\n"):
    buf += s.recv(65536)
items = int([l for l in buf.split(b"\r\n") if l.startswith(b"STAT curr_items ")][0].split()[2])
if items != n:
    sys.exit(f"memcached holds {items} of {n} items")
PY
  after=$(rss_of "$server")
  kill "$server"; wait "$server" 2>/dev/null || true; server=
  python3 -c "print(f'{($after - $before) / $ITEMS:.1f}')"
}

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

echo "# $ITEMS items, 16-byte keys; resident bytes per item (RSS growth / items)"
echo "# profile $PROFILE; machine: $(nproc) cores (shared), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-22s %10s %10s %10s %9s %9s\n' case cache-node redis memcached "x redis" "x memc"
for c in "100 0" "1024 0" "100 3"; do
  set -- $c
  n=$(node "$1" "$2")
  r=$(redis "$1" "$2")
  if [ "$2" = 0 ]; then m=$(memcached_run "$1"); mr=$(ratio "$n" "$m"); else m=-; mr=-; fi
  printf '%-22s %10s %10s %10s %9s %9s\n' "value=$1 tags=$2" "$n" "$r" "$m" "$(ratio "$n" "$r")" "$mr"
done

echo
echo "# 90% deleted vs fresh: whole-process resident bytes"
fresh_items=$((ITEMS / 10))
"$example" "$fresh_items" 100 0 >"$work/fresh.txt"
fresh=$(field process_rss_bytes "$work/fresh.txt")
printf '%-28s %14s %9s\n' case rss_bytes "x fresh"
printf '%-28s %14s %9s\n' "fresh $fresh_items items" "$fresh" 1.00
for order in oldest spread; do
  "$example" "$ITEMS" 100 0 90 "$order" >"$work/del.txt"
  peak=$(field process_rss_bytes "$work/del.txt")
  after=$(field process_rss_after_delete_bytes "$work/del.txt")
  left=$(field items_left "$work/del.txt")
  printf '%-28s %14s %9s\n' "$ITEMS items (peak)" "$peak" "$(ratio "$peak" "$fresh")"
  printf '%-28s %14s %9s\n' "90% deleted ($order), $left left" "$after" "$(ratio "$after" "$fresh")"
done
