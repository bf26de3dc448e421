# Sourced by the bench scripts: wrk runs and their figures.
#
#   out=$(wrk_run LABEL WRK_ARGS...)          # prints "rps p99_ms"
#   out=$(wrk_spread LABEL SCRIPT URL...)     # one wrk per URL at once; prints "rps p99_ms"
#   wrk_scripts KEYS                          # writes $work/get.lua and $work/set.lua; sets SET_BODY
#
# wrk_run runs wrk on $CLIENT_CORE with one thread, $CONNS connections for
# $DURATION, keeps its output in $work/wrk-LABEL.out, and fails (which stops
# the calling script, since every caller assigns the output under set -e) on
# non-2xx answers, socket errors or no result.
#
#   cpu_ticks PID...                          # their CPU time so far, in clock ticks
#   us_per_request TICKS_BEFORE TICKS_AFTER RPS   # CPU µs per request over a $DURATION run
#   out=$(GENERATOR... > FILE && times)       # a load generator's run, in a subshell of its own
#   generator_us "$out" RPS                   # its CPU µs per request over a $DURATION run: "all user"
#
# wrk_spread spreads $CONNS connections evenly over the URLs (as a Service
# spreads clients over pods): one wrk per URL, all at once on $CLIENT_CORE,
# each with its share of the connections; it prints the summed req/s and the
# worst p99.
#
# wrk_scripts writes the two loads every benchmark shares, both through
# request(): GET and SET of random keys bench:1..KEYS (the keys
# bench/prefill.py writes), a SET with the seed's body shape: a 200-byte
# value, an hour's ttl, one tag. The seeds are fixed, so runs draw the same
# keys. SET_BODY is that body, for scripts that write loads of their own.
wrk_scripts() { # keys
  SET_BODY='{"value":"'$(printf 'v%.0s' $(seq 1 200))'","ttl":3600,"tags":["bench"]}'
  cat > "$work/get.lua" <<LUA
math.randomseed(42)
request = function() return wrk.format("GET", "/api/v1/cache/bench:" .. math.random(1, $1)) end
LUA
  cat > "$work/set.lua" <<LUA
math.randomseed(7)
local body = '$SET_BODY'
local headers = { ["Content-Type"] = "application/json" }
request = function() return wrk.format("POST", "/api/v1/cache/bench:" .. math.random(1, $1), headers, body) end
LUA
}

wrk_figures() { # label file
  awk -v label="$1" '
    /^Requests\/sec:/ { rps = $2 }
    /^ +99%/ { v = $2; u = v; gsub(/[0-9.]/, "", u); sub(/[a-z]+$/, "", v);
               ms = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : v; p99 = ms }
    /Non-2xx/ { bad = $NF }
    /Socket errors/ { errors = $0 }
    END {
      if (bad > 0) { print label ": non-2xx answers: " bad > "/dev/stderr"; exit 1 }
      if (errors != "") { print label ": " errors > "/dev/stderr"; exit 1 }
      if (rps == "") { print label ": no result from wrk" > "/dev/stderr"; exit 1 }
      printf "%s %.3f\n", rps, p99
    }
  ' "$2"
}

wrk_run() {
  local label=$1; shift
  taskset -c "$CLIENT_CORE" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" > "$work/wrk-$label.out"
  wrk_figures "$label" "$work/wrk-$label.out"
}

wrk_spread() {
  local label=$1 script=$2; shift 2
  local n=$# i=0 url wpids=() share
  share=$((CONNS / n))
  for url in "$@"; do
    taskset -c "$CLIENT_CORE" wrk -t1 -c"$share" -d"$DURATION" --latency -s "$script" "$url" \
      > "$work/wrk-$label-$i.out" &
    wpids+=($!)
    i=$((i + 1))
  done
  local failed=0
  for p in "${wpids[@]}"; do wait "$p" || failed=1; done
  ((failed == 0)) || { echo "$label: a wrk run failed" >&2; return 1; }
  local total=0 worst=0 rps p99
  for ((i = 0; i < n; i++)); do
    read -r rps p99 < <(wrk_figures "$label-$i" "$work/wrk-$label-$i.out") || return 1
    [ -n "$rps" ] || return 1
    total=$(python3 -c "print($total + $rps)")
    worst=$(python3 -c "print(max($worst, $p99))")
  done
  printf "%s %.3f\n" "$total" "$worst"
}

cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$total"
}

us_per_request() {
  python3 -c "print(f'{($2 - $1) / $(getconf CLK_TCK) * 1e6 / ($3 * ${DURATION%s}):.2f}')"
}

# From the children's line of `times` (e.g. "0m4.123s 0m3.456s") in the
# run's own subshell, so the figure is that run alone; fails on no requests.
generator_us() {
  python3 - "$1" "$2" "${DURATION%s}" <<'PY'
import re, sys
times, rps, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if rps <= 0:
    sys.exit("the load generator made no requests")
user, system = (int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", times.splitlines()[-1]))
per = 1e6 / (rps * secs)
print(f"{(user + system) * per:.2f} {user * per:.2f}")
PY
}
