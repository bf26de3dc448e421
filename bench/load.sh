#!/usr/bin/env bash
# Single-node load benchmark, in one run:
#   cache-node  vs  nginx serving the same item JSON as a static file  vs  Redis.
# Each server is pinned to core 0 (taskset), the load generator to core 1;
# 64 keep-alive connections; ~200-byte values. Prints requests/s and p99 for
# each, then the ratios DESIGN section 7 sets bars on.
#
#   bash bench/load.sh            # DURATION=15s CONNS=64 KEYS=10000 ROUNDS=5 by default
#
# The load generator does the same work for every HTTP server: each wrk run
# builds its requests in a Lua request() function (wrk's static request is
# cheaper for wrk, which on a shared core would flatter whichever server got
# it). The headline GET compares like with like: cache-node's fixed key
# against nginx's one file. Random keys over a 10,000-key space (every key
# written before the runs, so no GET misses) are reported beside it, and are
# what the Redis and SET ratios use, as redis-benchmark draws random keys.
# SET and random GET run in $ROUNDS rounds, cache-node's SET and GET then
# Redis' SET and GET back to back in each (both servers stay up, the idle
# one costs nothing): the machine's other tenants move req/s by tens of
# percent over a minute, and a ratio of runs taken seconds apart moves far
# less. The SET / GET and Redis bars are judged on the medians of the
# rounds' ratios (each round's is printed); the table shows the median
# req/s and p99 of each. Beside req/s, each server's CPU per request: the
# load generators differ (wrk, redis-benchmark), and CPU per request is the
# capacity of the server's one core whichever generator is cheaper.
#
# nginx is tuned as a fair static-file baseline: one worker on the server
# core, sendfile, tcp_nopush/tcp_nodelay, open_file_cache (no open/stat per
# request), no access log, unlimited keep-alive requests.
#
# Any failure stops the script: a wrk run with non-2xx answers or socket
# errors, a server that does not start, a malformed DURATION.
#
# Installs what it needs from Debian packages (wrk, nginx-light, redis-server,
# redis-tools). Everything listens on 127.0.0.1 only and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need (the scripts run from the repository root)

DURATION=${DURATION:-15s}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
ROUNDS=${ROUNDS:-5}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
CACHE_PORT=18080 NGINX_PORT=18081 REDIS_PORT=18082

# DURATION in whole seconds: 30, 30s, 2m, 1h (wrk's own units).
seconds() {
  local d=$1
  case $d in
    *[0-9]s) d=${d%s}; [[ $d =~ ^[0-9]+$ ]] && { echo "$d"; return; } ;;
    *[0-9]m) d=${d%m}; [[ $d =~ ^[0-9]+$ ]] && { echo $((d * 60)); return; } ;;
    *[0-9]h) d=${d%h}; [[ $d =~ ^[0-9]+$ ]] && { echo $((d * 3600)); return; } ;;
    *) [[ $d =~ ^[0-9]+$ ]] && { echo "$d"; return; } ;;
  esac
  echo "DURATION=$1: use whole seconds, minutes or hours (15s, 1m, 1h)" >&2
  return 1
}
DURATION_S=$(seconds "$DURATION")
((DURATION_S > 0)) || { echo "DURATION must be longer than zero" >&2; exit 1; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS=$ROUNDS: use a whole number of rounds, 1 or more" >&2; exit 1; }

need wrk nginx=nginx-light redis-server redis-benchmark=redis-tools

# The binary the images ship, the profile-guided release build, unless
# NODE_BIN names another (e.g. target/release/cache-node, the plain build).
NODE_BIN=${NODE_BIN:-$(bash scripts/build-pgo.sh | tail -n 1)}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

source bench/wrk.sh  # wrk_scripts, wrk_run, cpu_ticks, us_per_request (the scripts run from the repository root)

# wrk scripts, all through request(): random keys, one fixed path, and SET
# with the seed's body shape.
wrk_scripts "$KEYS"  # $work/get.lua, $work/set.lua
fixed_lua() {  # a request() returning the same GET each time
  printf 'request = function() return wrk.format("GET", "%s") end\n' "$1" > "$work/fixed.lua"
  echo "$work/fixed.lua"
}

echo "== cache-node" >&2
taskset -c "$SERVER_CORE" "$NODE_BIN" --bind-address 127.0.0.1 --port $CACHE_PORT \
  --max-size 1000000 --log-level warn &
pids+=($!)
wait_port $CACHE_PORT
# Every key first, so the GET phases can never miss, whatever DURATION is.
python3 bench/prefill.py "http://127.0.0.1:$CACHE_PORT" "$KEYS"
node=${pids[-1]}

echo "== redis" >&2
taskset -c "$SERVER_CORE" redis-server --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no \
  --protected-mode yes --logfile "$work/redis.log" &
pids+=($!)
redis=${pids[-1]}
wait_port $REDIS_PORT
# About DURATION per run at Redis' usual single-core rate on loopback.
requests=$((DURATION_S * 60000))
# redis_run LABEL TEST: one redis-benchmark run of TEST (set or get) on
# random keys; prints "rps p99_ms cpu_us_per_request".
redis_run() {
  local c0
  c0=$(cpu_ticks "$redis")
  taskset -c "$CLIENT_CORE" redis-benchmark -h 127.0.0.1 -p $REDIS_PORT -c "$CONNS" -n "$requests" \
    -d 200 -r "$KEYS" -t "$2" --csv > "$work/redis-$1.csv"
  python3 - "$work/redis-$1.csv" "${2^^}" "$c0" "$(cpu_ticks "$redis")" "$(getconf CLK_TCK)" "$requests" <<'PY'
import csv, sys
rows = {r["test"]: r for r in csv.DictReader(open(sys.argv[1]))}
row = rows[sys.argv[2]]
c0, c1, tck, n = map(float, sys.argv[3:7])
print(row["rps"], row["p99_latency_ms"], f"{(c1 - c0) / tck * 1e6 / n:.2f}")
PY
}
# Every key first, as for cache-node (20 draws per key leave none unset).
taskset -c "$CLIENT_CORE" redis-benchmark -h 127.0.0.1 -p $REDIS_PORT -c "$CONNS" -n $((KEYS * 20)) \
  -d 200 -r "$KEYS" -t set -q > /dev/null

# The servers' CPU per request beside req/s: on two cores the load
# generator is near its own core's limit too (wrk's Lua builds every
# request, a SET's larger), so req/s carries its cost as well as the
# server's.
rounds="$work/rounds.txt"
: > "$rounds"
for round in $(seq 1 "$ROUNDS"); do
  c0=$(cpu_ticks "$node")
  out=$(wrk_run "cache-set-$round" -s "$work/set.lua" "http://127.0.0.1:$CACHE_PORT"); read -r set_rps set_p99 <<<"$out"
  set_us=$(us_per_request "$c0" "$(cpu_ticks "$node")" "$set_rps")
  c0=$(cpu_ticks "$node")
  out=$(wrk_run "cache-get-random-$round" -s "$work/get.lua" "http://127.0.0.1:$CACHE_PORT"); read -r get_rps get_p99 <<<"$out"
  get_us=$(us_per_request "$c0" "$(cpu_ticks "$node")" "$get_rps")
  out=$(redis_run "set-$round" set); read -r rset_rps rset_p99 rset_us <<<"$out"
  out=$(redis_run "get-$round" get); read -r rget_rps rget_p99 rget_us <<<"$out"
  echo "$set_rps $set_p99 $set_us $get_rps $get_p99 $get_us $rset_rps $rset_p99 $rset_us $rget_rps $rget_p99 $rget_us" >> "$rounds"
done
items=$(curl -sf "http://127.0.0.1:$CACHE_PORT/api/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"])')
((items == KEYS)) || { echo "cache-node holds $items of $KEYS keys" >&2; exit 1; }
out=$(wrk_run cache-get-fixed -s "$(fixed_lua /api/v1/cache/bench:1)" "http://127.0.0.1:$CACHE_PORT"); read -r cache_get_rps cache_get_p99 <<<"$out"
misses=$(curl -sf "http://127.0.0.1:$CACHE_PORT/api/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["misses"])')
((misses == 0)) || { echo "GET phases missed $misses times" >&2; exit 1; }
echo "cache-node holds $items items; the GET phases missed none" >&2
curl -sf "http://127.0.0.1:$CACHE_PORT/api/v1/cache/bench:1" > "$work/item.json"
kill "$node" "$redis"; wait "$node" "$redis" 2>/dev/null || true

echo "== nginx (static $(wc -c < "$work/item.json")-byte item JSON)" >&2
mkdir -p "$work/www" "$work/nginx"
cp "$work/item.json" "$work/www/item.json"
chmod -R a+rX "$work"  # nginx workers run unprivileged
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; multi_accept on; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  open_file_cache max=16 inactive=60s;
  open_file_cache_valid 60s;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server_tokens off;
  default_type application/json;
  server { listen 127.0.0.1:$NGINX_PORT; root $work/www; }
}
NGINX
nginx -t -q -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log"
taskset -c "$SERVER_CORE" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log" &
pids+=($!)
wait_port $NGINX_PORT
out=$(wrk_run nginx -s "$(fixed_lua /item.json)" "http://127.0.0.1:$NGINX_PORT"); read -r nginx_rps nginx_p99 <<<"$out"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

python3 - "$cache_get_rps" "$cache_get_p99" "$nginx_rps" "$nginx_p99" "$CONNS" "$DURATION" "$rounds" <<'PY'
import statistics, sys
(cg, cgp, ng, ngp) = map(float, sys.argv[1:5])
rounds = [tuple(map(float, line.split())) for line in open(sys.argv[7])]
median = lambda i: statistics.median(r[i] for r in rounds)
cs, cr, rs, rg = median(0), median(3), median(6), median(9)
# Each p99 the median of its rounds', like the ratios.
csp, crp, rsp, rgp = median(1), median(4), median(7), median(10)
set_get = [r[0] / r[3] for r in rounds]
cpu = [r[5] / r[2] for r in rounds]
get_redis = [r[3] / r[9] for r in rounds]
set_redis = [r[0] / r[6] for r in rounds]
# Capacity of one core: the other server's CPU per request over ours.
get_redis_cpu = [r[11] / r[5] for r in rounds]
set_redis_cpu = [r[8] / r[2] for r in rounds]
show = lambda xs: f"{statistics.median(xs):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in xs)})"
print(f"single node, server on one core, load on another, {sys.argv[5]} connections, {sys.argv[6]} per run,"
      f" {len(rounds)} rounds of SET then random GET, cache-node then Redis")
print(f"{'':30}{'req/s':>12}{'p99 ms':>10}")
for name, rps, p99 in [("cache-node GET (one key)", cg, cgp), ("cache-node GET (random keys)", cr, crp),
                       ("cache-node SET (random keys)", cs, csp), ("nginx static GET", ng, ngp),
                       ("redis GET", rg, rgp), ("redis SET", rs, rsp)]:
    print(f"{name:30}{rps:12.0f}{p99:10.3f}")
print()
print(f"GET / nginx        {cg / ng:6.2f}x   (bar >= 1.0; one key each)")
print(f"GET random / nginx {cr / ng:6.2f}x")
print(f"GET / redis GET    {show(get_redis)}   (bar >= 1.0; random keys each, median of the rounds)")
print(f"  server CPU per GET, redis / cache-node: {show(get_redis_cpu)}"
      f" ({median(11):.2f} / {median(5):.2f} us, medians)")
print(f"SET / GET          {show(set_get)}   (bar >= 0.9; random keys, median of the rounds)")
print(f"  node CPU per request, GET / SET: {median(5):.2f} / {median(2):.2f} us (medians); per round {show(cpu)}")
print(f"SET / redis SET    {show(set_redis)}")
print(f"  server CPU per SET, redis / cache-node: {show(set_redis_cpu)}"
      f" ({median(8):.2f} / {median(2):.2f} us, medians)")
print(f"GET p99            {max(cgp, crp):6.3f} ms (bar < 2 ms; the worse of one key and the random keys' median;"
      f" random keys per round: {', '.join(f'{r[4]:.2f}' for r in rounds)})")
PY
