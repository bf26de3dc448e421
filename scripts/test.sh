#!/usr/bin/env bash
# Runs every test of the repository: formatting, lints (workflows included),
# unit, property, HTTP, multi-node, image and control-plane tests. Installs
# and builds what the tests need on a fresh machine (Debian packages, the
# Kubernetes control plane and Go tools from Go modules, the container
# images without a Docker daemon), so nothing has to be set up by hand first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
free_disk() { df -h --output=avail . | tail -n 1 | tr -d ' '; }

# Incremental state only pays for edits between builds; on a fresh clone it
# added GBs to target/ (a CI machine once ran out of disk while linking the
# test binaries). Set CARGO_INCREMENTAL=1 to keep it while iterating.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
step "free disk: $(free_disk) (the whole run needs about 5 GB in target/, and 5 GB more while the control plane builds)"

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  ((${#missing[@]})) || return 0
  step "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# promtool (package prometheus) lints the /metrics output in the HTTP tests;
# runc runs the built images in tests/tests/images.rs.
# python3-venv holds the virtualenv of the OpenAPI tools (scripts/openapi-tools.sh).
apt_install prometheus runc python3-venv

step "building the test control plane (cached after the first run)"
DISTROCACHE_K8S_BIN=$(bash scripts/build-control-plane.sh | tail -n 1)
export DISTROCACHE_K8S_BIN

step "building crane, actionlint and gofakes3 (cached after the first run)"
# gofakes3 is the S3-compatible server the backup tests start
# (cache-node/tests/s3_support).
DISTROCACHE_TOOLS=$(bash scripts/build-tools.sh | tail -n 1)
export DISTROCACHE_TOOLS

step "installing openapi-spec-validator and schemathesis (PyPI, cached after the first run)"
# cache-node/tests/openapi.rs validates cache-node/openapi.json and runs
# schemathesis against a live node with them.
DISTROCACHE_OPENAPI_TOOLS=$(bash scripts/openapi-tools.sh | tail -n 1)
export DISTROCACHE_OPENAPI_TOOLS

step "actionlint (.github/workflows)"
"$DISTROCACHE_TOOLS/actionlint" -color=false .github/workflows/*.yml

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the binaries the end-to-end tests run as pods)"
cargo build --workspace --bins --locked

step "building the images without a Docker daemon (static binaries, crane)"
# Into target/images/, where tests/tests/images.rs inspects and runs them.
# The image-test profile skips LTO (the release workflow builds --release).
bash scripts/build-images.sh --profile image-test

step "cargo test (free disk: $(free_disk))"
# --nocapture: the multi-node, operator and end-to-end tests print what they
# measured (time to Ready, keys moved, requests failed during a restart),
# which is worth having in every CI log. --no-fail-fast: one failing test
# binary does not hide what the others would have said.
cargo test --workspace --locked --no-fail-fast -- --nocapture
