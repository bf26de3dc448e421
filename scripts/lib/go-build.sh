# Builds Go programs through wrapper modules into a cache outside the clone,
# each stamped with its version and a hash of its wrapper's go.mod and go.sum:
# a binary whose stamp matches is not built again, so bumping a pinned
# dependency rebuilds what it builds. Sourced by build-control-plane.sh and
# build-tools.sh.

# -mod=readonly: a build uses the committed go.mod and go.sum as they are and
# fails if they are incomplete, rather than rewriting them.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

# Only the binaries are kept. The Go build and module caches of these builds
# live under the cache root (set by the sourcing script) and go when the
# script exits: the Kubernetes build alone leaves 3.6 GB of build cache and
# 1.2 GB of modules, which a CI machine short of disk cannot spare, and a
# stamped binary is only rebuilt when its pin changes.
GO_WORK_DIR="$CACHE_ROOT/go-work"
export GOCACHE="$GO_WORK_DIR/build" GOMODCACHE="$GO_WORK_DIR/mod"
go_work_cleanup() {
  [ -d "$GO_WORK_DIR" ] || return 0
  chmod -R u+w "$GO_WORK_DIR" # the module cache is read-only
  rm -rf "$GO_WORK_DIR"
}
trap go_work_cleanup EXIT

# go_build_cached <out dir> <wrapper dir> <package> <binary name> <version> [ldflags]
go_build_cached() {
  local out=$1 dir=$2 pkg=$3 name=$4 version=$5 ldflags=${6:-}
  local stamp="$out/.$name.version" want
  mkdir -p "$out"
  want="$version $(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)"
  if [ -x "$out/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "  $name $version: cached" >&2
    return
  fi
  echo "  $name $version: building" >&2
  local start=$SECONDS
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "$want" >"$stamp"
  echo "  $name: built in $((SECONDS - start))s" >&2
}
