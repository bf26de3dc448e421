#!/usr/bin/env bash
# Runs every cache-node fuzz target for a set time, one after the other (the
# targets share the machine's cores; running them in turn keeps each one's
# exec rate honest), and prints each one's exec count and findings.
#
#   bash cache-node/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   bash cache-node/fuzz/run.sh 300                 # 5 minutes each, every target
#   bash cache-node/fuzz/run.sh 60 key_path         # one target
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The checked-in seeds in corpus/<target>/ are read, never written: what the
# fuzzer discovers goes to work/<target>/ (git-ignored). A crash is saved to
# artifacts/<target>/; add it to corpus/<target>/ and write a regression test
# in cache-node/tests/fuzz_corpus.rs (see the README).
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET=${1:-300}
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(set_request key_path membership_doc peer_frame snapshot_file)
# The sanitizer: address (cargo-fuzz's default) also catches memory errors in
# dependencies' unsafe code; SANITIZER=none runs about twice as fast.
SANITIZER=${SANITIZER:-address}

for t in "${TARGETS[@]}"; do cargo +nightly fuzz build -O --sanitizer "$SANITIZER" "$t"; done

mkdir -p logs
summary=()
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  echo "== $t for ${SECONDS_PER_TARGET}s" >&2
  set +e
  # Binary targets (peer_frame, snapshot_file) have no dictionary: their
  # seeds carry the structure.
  dict=()
  [ -s "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
  cargo +nightly fuzz run -O --sanitizer "$SANITIZER" "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$SECONDS_PER_TARGET" "${dict[@]}" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" 2> "logs/$t.log"
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo "?")
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -n 1 | grep -o '[0-9]*' || echo "?")
  crashes=$(find "artifacts/$t" -type f | wc -l)
  if ((rc != 0)); then status=1; fi
  summary+=("$(printf '%-16s %12s execs %8s/s  cov %6s  exit %d  artifacts %d' "$t" "$execs" "$rate" "$cov" "$rc" "$crashes")")
done
printf '%s\n' "${summary[@]}"
exit $status
