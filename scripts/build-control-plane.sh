#!/usr/bin/env bash
# Builds the test control plane (DESIGN 6) from Go modules: kube-apiserver,
# kube-controller-manager and kubectl from k8s.io/kubernetes, etcd from
# go.etcd.io/etcd/server/v3 and helm from helm.sh/helm/v3, each through its
# wrapper module under tests/k8s/. The binaries land in a cache outside the
# clone, each stamped with its version and a hash of its wrapper's go.mod and
# go.sum; a binary whose stamp matches is not built again, so a change to a
# wrapper (a pinned dependency bumped) rebuilds what it builds.
#
# Prints the cache directory on its last line; the Rust test harness finds it
# through DISTROCACHE_K8S_BIN (set by scripts/test.sh) or the same default.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.4
HELM_VERSION=v3.19.5
CACHE_ROOT=${DISTROCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distrocache}
OUT=${DISTROCACHE_K8S_BIN:-$CACHE_ROOT/k8s-$K8S_VERSION}
mkdir -p "$OUT"

source scripts/lib/go-build.sh
# build <wrapper dir under tests/k8s> <package> <binary name> <version> [ldflags]
build() { go_build_cached "$OUT" "tests/k8s/$1" "${@:2}"; }

# The version variables `kubectl version` and the API server's /version read;
# without them both report v0.0.0-master.
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build kubernetes k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$K8S_VERSION" "$k8s_ldflags"
build kubernetes k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$K8S_VERSION" "$k8s_ldflags"
build kubernetes k8s.io/kubernetes/cmd/kubectl kubectl "$K8S_VERSION" "$k8s_ldflags"
build etcd go.etcd.io/etcd/server/v3 etcd "$ETCD_VERSION"
build helm helm.sh/helm/v3/cmd/helm helm "$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

echo "$OUT"
