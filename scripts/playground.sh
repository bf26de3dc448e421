#!/usr/bin/env bash
# A local playground: the DistroCache operator on a Kubernetes control plane
# built from Go modules, with the test kubelet running pods as local
# processes on loopback addresses, to try with kubectl without a cluster.
#
# Builds the workspace's binaries (the same `cargo build` as scripts/test.sh,
# so nothing is compiled twice), then runs the playground, which builds the
# control plane if it is not cached yet, starts it, installs the operator
# from manifests/ and prints what to type next. Ctrl-C stops it.
#
#   bash scripts/playground.sh [--prometheus] [--dir DIR] [--ports 30000-30009] [--pod-ips A-B]
#   bash scripts/playground.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

echo "building cache-node, the operator and the playground (cargo build --workspace --bins)"
if ! cargo build --workspace --bins; then
  echo "error: cargo build failed (see above); the playground needs the workspace to build" >&2
  exit 1
fi
exec "${CARGO_TARGET_DIR:-target}/debug/playground" "$@"
