#!/usr/bin/env bash
# Installs the Python tools the OpenAPI tests run (cache-node/tests/openapi.rs):
# openapi-spec-validator (is cache-node/openapi.json a valid OpenAPI 3.1
# document?) and schemathesis (property-based requests generated from the
# document against a live node). Both from PyPI, pinned, into a virtualenv
# cached outside the clone like the control plane; a version bump gets a
# fresh virtualenv.
#
# Prints the virtualenv's bin directory on its last line.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.9.0
CACHE_ROOT=${DISTROCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distrocache}
VENV=$CACHE_ROOT/openapi-tools-st$SCHEMATHESIS_VERSION-osv$VALIDATOR_VERSION

# The stamp is written last, so an interrupted install is redone, not trusted.
if [ ! -f "$VENV/.complete" ]; then
  command -v python3 >/dev/null || { echo "python3 is required (Debian: python3 python3-venv)" >&2; exit 1; }
  rm -rf "$VENV"
  mkdir -p "$CACHE_ROOT"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "openapi-spec-validator==$VALIDATOR_VERSION" >&2
  touch "$VENV/.complete"
fi

echo "$VENV/bin"
