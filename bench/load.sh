#!/usr/bin/env bash
# Single-node load benchmark, in one run:
#   cache-node  vs  nginx serving the same item JSON as a static file  vs  Redis.
# Each server is pinned to core 0 (taskset), the load generator to core 1;
# 64 keep-alive connections; ~200-byte values; keys drawn at random from a
# 10,000-key space that the SET phase fills before the GET phase reads it.
# Prints requests/s and p99 for each, then the ratios DESIGN section 7 sets bars on.
#
#   bash bench/load.sh            # DURATION=15s CONNS=64 KEYS=10000 by default
#
# Installs what it needs from Debian packages (wrk, nginx-light, redis-server,
# redis-tools). Everything listens on 127.0.0.1 only and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
CACHE_PORT=18080 NGINX_PORT=18081 REDIS_PORT=18082

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
if ((${#need[@]})); then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release -q -p cache-node
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

value=$(printf 'v%.0s' $(seq 1 200))  # 200 bytes

# wrk scripts: random keys; SET posts the seed's body shape.
cat > "$work/get.lua" <<LUA
math.randomseed(42)
request = function() return wrk.format("GET", "/api/v1/cache/bench:" .. math.random(1, $KEYS)) end
LUA
cat > "$work/set.lua" <<LUA
math.randomseed(7)
local body = '{"value":"$value","ttl":300,"tags":["bench"]}'
local headers = { ["Content-Type"] = "application/json" }
request = function() return wrk.format("POST", "/api/v1/cache/bench:" .. math.random(1, $KEYS), headers, body) end
LUA

# wrk output -> "rps p99_ms"
wrk_run() {
  taskset -c "$CLIENT_CORE" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" > "$work/wrk.out"
  awk '
    /^Requests\/sec:/ { rps = $2 }
    /^ +99%/ { v = $2; u = v; gsub(/[0-9.]/, "", u); sub(/[a-z]+$/, "", v);
               ms = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : v; p99 = ms }
    /Non-2xx/ { bad = $NF }
    END { if (bad > 0) { print "non-2xx answers: " bad > "/dev/stderr"; exit 1 } printf "%s %.3f\n", rps, p99 }
  ' "$work/wrk.out"
}

echo "== cache-node" >&2
taskset -c "$SERVER_CORE" target/release/cache-node --bind-address 127.0.0.1 --port $CACHE_PORT \
  --max-size 1000000 --log-level warn &
pids+=($!)
wait_port $CACHE_PORT
read -r cache_set_rps cache_set_p99 < <(wrk_run -s "$work/set.lua" "http://127.0.0.1:$CACHE_PORT")
read -r cache_get_rps cache_get_p99 < <(wrk_run -s "$work/get.lua" "http://127.0.0.1:$CACHE_PORT")
items=$(curl -s "http://127.0.0.1:$CACHE_PORT/api/v1/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["items"], s["misses"])')
echo "cache-node holds $items (items, misses)" >&2
curl -s "http://127.0.0.1:$CACHE_PORT/api/v1/cache/bench:1" > "$work/item.json"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

echo "== nginx (static $(wc -c < "$work/item.json")-byte item JSON)" >&2
mkdir -p "$work/www" "$work/nginx"
cp "$work/item.json" "$work/www/item.json"
chmod -R a+rX "$work"  # nginx workers run unprivileged
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  default_type application/json;
  server { listen 127.0.0.1:$NGINX_PORT; root $work/www; }
}
NGINX
taskset -c "$SERVER_CORE" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log" &
pids+=($!)
wait_port $NGINX_PORT
read -r nginx_rps nginx_p99 < <(wrk_run "http://127.0.0.1:$NGINX_PORT/item.json")
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

echo "== redis" >&2
taskset -c "$SERVER_CORE" redis-server --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no \
  --protected-mode yes --logfile "$work/redis.log" &
pids+=($!)
wait_port $REDIS_PORT
requests=$((${DURATION%s} * 60000))
taskset -c "$CLIENT_CORE" redis-benchmark -h 127.0.0.1 -p $REDIS_PORT -c "$CONNS" -n "$requests" \
  -d 200 -r "$KEYS" -t set,get --csv > "$work/redis.csv"
redis_field() { python3 - "$work/redis.csv" "$1" "$2" <<'PY'
import csv, sys
rows = {r["test"]: r for r in csv.DictReader(open(sys.argv[1]))}
print(rows[sys.argv[2]][sys.argv[3]])
PY
}
redis_set_rps=$(redis_field SET rps); redis_set_p99=$(redis_field SET p99_latency_ms)
redis_get_rps=$(redis_field GET rps); redis_get_p99=$(redis_field GET p99_latency_ms)

python3 - "$cache_get_rps" "$cache_get_p99" "$cache_set_rps" "$cache_set_p99" "$nginx_rps" "$nginx_p99" \
  "$redis_get_rps" "$redis_get_p99" "$redis_set_rps" "$redis_set_p99" "$CONNS" "$DURATION" <<'PY'
import sys
(cg, cgp, cs, csp, ng, ngp, rg, rgp, rs, rsp) = map(float, sys.argv[1:11])
print(f"single node, server on one core, load on another, {sys.argv[11]} connections, {sys.argv[12]} per run")
print(f"{'':26}{'req/s':>12}{'p99 ms':>10}")
for name, rps, p99 in [("cache-node GET", cg, cgp), ("cache-node SET", cs, csp), ("nginx static GET", ng, ngp),
                       ("redis GET", rg, rgp), ("redis SET", rs, rsp)]:
    print(f"{name:26}{rps:12.0f}{p99:10.3f}")
print()
print(f"GET / nginx        {cg / ng:6.2f}x   (bar >= 1.0)")
print(f"GET / redis GET    {cg / rg:6.2f}x   (bar >= 1.0)")
print(f"SET / GET          {cs / cg:6.2f}x   (bar >= 0.8)")
print(f"SET / redis SET    {cs / rs:6.2f}x")
print(f"GET p99            {cgp:6.3f} ms (bar < 2 ms)")
PY
