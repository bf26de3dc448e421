# Builds Go programs through wrapper modules into a cache outside the clone,
# each stamped with its version and a hash of its wrapper's go.mod and go.sum:
# a binary whose stamp matches is not built again, so bumping a pinned
# dependency rebuilds what it builds. Sourced by build-control-plane.sh and
# build-tools.sh.

# -mod=readonly: a build uses the committed go.mod and go.sum as they are and
# fails if they are incomplete, rather than rewriting them.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

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
