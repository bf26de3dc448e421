# Sourced by the bench scripts: one wrk run and its figures.
#
#   out=$(wrk_run LABEL WRK_ARGS...)   # prints "rps p99_ms"
#
# Runs wrk on $CLIENT_CORE with one thread, $CONNS connections for $DURATION,
# keeps its output in $work/wrk-LABEL.out, and fails (which stops the
# calling script, since every caller assigns the output under set -e) on
# non-2xx answers, socket errors or no result.
wrk_run() {
  local label=$1; shift
  taskset -c "$CLIENT_CORE" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" > "$work/wrk.out"
  cp "$work/wrk.out" "$work/wrk-$label.out"
  awk -v label="$label" '
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
  ' "$work/wrk.out"
}
