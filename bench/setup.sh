# shellcheck shell=bash
# Sourced by the bench scripts: their setup, the tools they install and
# waiting for a node to be ready.
#
#   need CMD[=PACKAGE]...        # installs what is missing, from Debian packages
#   wait_ready URL [TRIES]       # until URL/api/v1/ready answers 2xx, or exit 1
#
# need installs, for every CMD not on PATH, its Debian package (PACKAGE, or
# CMD itself when no =PACKAGE is given), all in one apt-get run, saying
# "installing ..." on stderr first; when every CMD is there it does nothing.
# A failed install fails it (which stops a calling script under set -e):
#
#   need wrk nginx=nginx-light redis-server redis-benchmark=redis-tools
#
# wait_ready polls URL/api/v1/ready (curl -sfk: an https:// URL is not
# checked against any CA, as the bench's nodes use their own; each try
# given 1 s) every 0.05 s, TRIES times (default 600, at least 30 s);
# it returns once the node answers ready, and otherwise prints "URL never
# ready" on stderr and exits the script (or the subshell it runs in) with
# status 1. A single node is ready as soon as it serves; a cluster member
# once it holds its ring and its keys:
#
#   wait_ready "http://$A:$PORT"; wait_ready "https://$T:$PORT" 1200
need() {
  local spec missing=()
  for spec in "$@"; do
    command -v "${spec%%=*}" >/dev/null || missing+=("${spec#*=}")
  done
  ((${#missing[@]})) || return 0
  echo "installing ${missing[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

wait_ready() {
  local url=$1 tries=${2:-600} i
  for ((i = 0; i < tries; i++)); do
    curl -sfk --max-time 1 "$url/api/v1/ready" >/dev/null && return 0
    sleep 0.05
  done
  echo "$url never ready" >&2
  exit 1
}
