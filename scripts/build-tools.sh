#!/usr/bin/env bash
# Builds the Go tools the test command uses besides the control plane:
# go-containerregistry's crane (assembles, pushes and pulls the images
# without a Docker daemon), actionlint (lints .github/workflows) and
# gofakes3 (the S3-compatible server the backup tests run), each
# through its wrapper module under tests/tools/, cached outside the clone
# like the control plane (scripts/lib/go-build.sh).
#
# Prints the cache directory on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CRANE_VERSION=v0.22.1
ACTIONLINT_VERSION=v1.7.12
GOFAKES3_VERSION=v1.2.0
CACHE_ROOT=${DISTROCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distrocache}
OUT=${DISTROCACHE_TOOLS_BIN:-$CACHE_ROOT/tools}

source scripts/lib/go-build.sh
go_build_cached "$OUT" tests/tools/crane github.com/google/go-containerregistry/cmd/crane crane "$CRANE_VERSION"
go_build_cached "$OUT" tests/tools/actionlint github.com/rhysd/actionlint/cmd/actionlint actionlint "$ACTIONLINT_VERSION" \
  "-X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION"

go_build_cached "$OUT" tests/tools/gofakes3 github.com/johannesboyne/gofakes3/cmd/gofakes3 gofakes3 "$GOFAKES3_VERSION"

echo "$OUT"
