#!/usr/bin/env bash
# TLS benchmarks on loopback, in one run (DESIGN 7: GET over TLS at least
# 0.75x plain). Servers on $SERVER_CORE, wrk on $CLIENT_CORE, one wrk thread:
#  1. GET with keep-alive, $CONNS connections, ~200-byte values: a plain node
#     and a TLS node (--tls-cert-file/--tls-key-file), same flags otherwise.
#     The bar is the node's capacity on its core, requests per second of its
#     CPU (measured from /proc/PID/stat over the run): over TLS, wrk's own
#     TLS work saturates the one client core before the node's core is busy
#     (the script prints the node core's idle share), so the req/s ratio,
#     also printed, measures the load generator as much as the node;
#  2. a new connection per request (`Connection: close`): over TLS every
#     request is a full handshake (ECDSA P-256 certificate, TLS 1.3), so the
#     request rate is the handshake rate; plain shown for reference;
#  3. a forwarded GET (two nodes, rf 1, peer API on its own port, GETs sent
#     to node a for keys node b owns): peer connections plain vs mutual TLS.
#
#   bash bench/tls.sh        # DURATION=10s CONNS=64
#
# Certificates are made with the openssl CLI into a temporary directory (a CA,
# one ECDSA certificate for the node addresses and *.peers.bench). Installs
# wrk from Debian packages if missing. Loopback only. Run on an otherwise idle
# machine: the figures are ratios of runs made one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh  # need, wait_ready (the scripts run from the repository root)
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEYS=${KEYS:-10000}
need wrk

cargo build --release -q -p cache-node
work=$(mktemp -d)
pids=()
stop_nodes() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
cleanup() { stop_nodes; rm -rf "$work"; }
trap cleanup EXIT
P=127.0.0.61 T=127.0.0.62 A=127.0.0.63 B=127.0.0.64 PORT=18300 PEER_PORT=18301

# --- certificates
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout node.key -out node.csr -subj /CN=bench-node 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:%s,IP:%s,IP:%s,DNS:localhost,DNS:*.peers.bench\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$P" "$T" "$A" "$B" > ext.cnf
  openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out node.crt -days 2 -extfile ext.cnf 2>/dev/null
)
TLS_FLAGS=(--tls-cert-file "$work/node.crt" --tls-key-file "$work/node.key")
PEER_TLS_FLAGS=(--peer-tls-cert-file "$work/node.crt" --peer-tls-key-file "$work/node.key"
  --peer-tls-ca-file "$work/ca.crt" --peer-tls-domain peers.bench)

node() { # ip [flags...]
  local ip=$1; shift
  taskset -c "$SERVER_CORE" target/release/cache-node --bind-address "$ip" --port $PORT \
    --max-size 10000000 --log-level warn "$@" &
  pids+=($!)
}
prefill() { python3 bench/prefill.py "$1://$2:$PORT" "$3" --ca "$work/ca.crt" --no-tags; }  # scheme ip keys

source bench/wrk.sh  # wrk_scripts, wrk_run (the scripts run from the repository root)
wrk_scripts "$KEYS"  # $work/get.lua

echo "== 1. GET, keep-alive, $CONNS connections: plain vs TLS" >&2
node $P
node $T "${TLS_FLAGS[@]}"
wait_ready "http://$P:$PORT"; wait_ready "https://$T:$PORT"
prefill http $P "$KEYS"; prefill https $T "$KEYS"
core_idle() { awk -v c="cpu$SERVER_CORE" '$1 == c {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
measured_get() { # label url pid: "rps p99 cpu_us_per_request idle_percent"
  local c0 c1 i0 t0 i1 t1 rps p99
  c0=$(cpu_ticks "$3"); read -r i0 t0 < <(core_idle)
  out=$(wrk_run "$1" -s "$work/get.lua" "$2"); read -r rps p99 <<<"$out"
  c1=$(cpu_ticks "$3"); read -r i1 t1 < <(core_idle)
  echo "$rps $p99 $(us_per_request "$c0" "$c1" "$rps") $((100 * (i1 - i0) / (t1 - t0)))"
}
out=$(measured_get plain-get "http://$P:$PORT" "${pids[0]}"); read -r plain_rps plain_p99 plain_us plain_idle <<<"$out"
out=$(measured_get tls-get "https://$T:$PORT" "${pids[1]}"); read -r tls_rps tls_p99 tls_us tls_idle <<<"$out"

echo "== 2. a new connection per request (Connection: close)" >&2
out=$(wrk_run plain-close -s "$work/get.lua" -H "Connection: close" "http://$P:$PORT"); read -r plain_close_rps plain_close_p99 <<<"$out"
out=$(wrk_run tls-close -s "$work/get.lua" -H "Connection: close" "https://$T:$PORT"); read -r handshakes_rps handshakes_p99 <<<"$out"
stop_nodes

echo "== 3. forwarded GET (rf 1, 2 nodes, peer port): plain peers vs mutual TLS" >&2
forwarded() { # label [peer flags...]
  local label=$1; shift
  # Called in `$(...)`, a subshell: the nodes it starts are its own, and
  # the script's cleanup cannot see them, so it stops them however it ends.
  trap stop_nodes EXIT
  python3 - "$work/ring.json" "$A" "$B" <<'PY'
import json, sys
path, a, b = sys.argv[1:]
members = [{"id": i, "address": f"{ip}:18301", "clientAddress": f"{ip}:18300", "state": "active"}
           for i, ip in (("a", a), ("b", b))]
json.dump({"epoch": 1, "replicationFactor": 1, "members": members}, open(path, "w"))
PY
  for id_ip in a=$A b=$B; do
    node "${id_ip#*=}" --node-id "${id_ip%%=*}" --peer-port $PEER_PORT \
      --membership-file "$work/ring.json" --membership-poll-interval 100ms "$@"
  done
  wait_ready "http://$A:$PORT"; wait_ready "http://$B:$PORT"
  python3 - "$A" "$work" <<'PY'
import json, sys, urllib.request
a, work = sys.argv[1], sys.argv[2]
value = json.dumps({"value": "v" * 200, "ttl": 3600}).encode()
remote = []
for i in range(1, 2001):
    key = f"bench:{i}"
    req = urllib.request.Request(f"http://{a}:18300/api/v1/cache/{key}", data=value, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    owner = json.load(urllib.request.urlopen(f"http://{a}:18300/api/v1/cluster?key={key}"))["owners"]["primary"]
    if owner == "b":
        remote.append(key)
with open(f"{work}/remote.lua", "w") as f:
    f.write("keys = {" + ",".join(f'"{k}"' for k in remote) + "}\n")
    f.write("i = 0\nrequest = function() i = i % #keys + 1; return wrk.format('GET', '/api/v1/cache/' .. keys[i]) end\n")
PY
  wrk_run "$label" -s "$work/remote.lua" "http://$A:$PORT"
  stop_nodes
}
out=$(forwarded fwd-plain); read -r fwd_plain_rps fwd_plain_p99 <<<"$out"
out=$(forwarded fwd-mtls "${PEER_TLS_FLAGS[@]}"); read -r fwd_mtls_rps fwd_mtls_p99 <<<"$out"

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
cat <<EOF
TLS benchmarks, $(date -u +%Y-%m-%d), $CONNS connections, $DURATION each, server core $SERVER_CORE, wrk core $CLIENT_CORE
                                   req/s      p99 ms
GET keep-alive, plain          ${plain_rps}  ${plain_p99}   node CPU ${plain_us} us/GET, node core ${plain_idle}% idle
GET keep-alive, TLS            ${tls_rps}  ${tls_p99}   node CPU ${tls_us} us/GET, node core ${tls_idle}% idle
  TLS/plain: node capacity (GETs per CPU-second) $(ratio "$plain_us" "$tls_us") (bar >= 0.75); req/s $(ratio "$tls_rps" "$plain_rps") (wrk-bound when the node core idles)
new connection per GET, plain  ${plain_close_rps}  ${plain_close_p99}
new TLS connection per GET     ${handshakes_rps}  ${handshakes_p99}   = TLS handshakes/s
forwarded GET, plain peers     ${fwd_plain_rps}  ${fwd_plain_p99}
forwarded GET, peer mTLS       ${fwd_mtls_rps}  ${fwd_mtls_p99}   ratio mTLS/plain $(ratio "$fwd_mtls_rps" "$fwd_plain_rps")
EOF
