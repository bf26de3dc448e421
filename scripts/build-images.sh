#!/usr/bin/env bash
# Builds the two images, cache-node and operator, without a Docker daemon
# and without pulling a base image: each is one layer holding a static
# binary (glibc, linked with +crt-static) and the /etc/passwd and /etc/group
# that name the non-root user 65532, on an empty base; the image config runs
# it as 65532:65532 with no shell. The Dockerfiles build the same layout
# (they call `rootfs` below), so users with Docker get the same image.
#
#   bash scripts/build-images.sh                    # test build: host arch, OCI layouts in target/images/
#   bash scripts/build-images.sh --arch amd64,arm64 --repo ghcr.io/distrocache --tag 0.2.0
#                                                   # release: push a multi-arch index per image
#   bash scripts/build-images.sh rootfs cache-node /rootfs   # the layout alone (the Dockerfiles)
#
# --profile picks the cargo profile (default release); the test command
# uses image-test, the same binaries built without LTO, for less CPU time.
# A release build's cache node for the host's architecture is the
# profile-guided one (scripts/build-pgo.sh, which trains it on loopback).
#
# Without --repo the images go through a registry served by crane on
# 127.0.0.1 for the length of the build, then land as OCI image layouts in
# --out (default target/images/<image>), which the tests inspect and run.
# With --repo they are pushed there (crane uses the docker credential
# config, e.g. after `crane auth login`). Either way each architecture is
# pushed as <repo>/<image>:<tag>-<arch>, then joined in one index
# <repo>/<image>:<tag>. Cross-building arm64 on amd64 needs the Debian
# packages gcc-aarch64-linux-gnu and libc6-dev-arm64-cross and
# `rustup target add aarch64-unknown-linux-gnu`.
set -euo pipefail
cd "$(dirname "$0")/.."

# image -> cargo package, binary, exposed ports (keep in step with the
# Dockerfiles; tests/tests/images.rs compares them).
package_of() { case $1 in cache-node) echo cache-node ;; operator) echo distrocache-operator ;; *) return 1 ;; esac; }
binary_of() { case $1 in cache-node) echo cache-node ;; operator) echo distrocache-operator ;; *) return 1 ;; esac; }
ports_of() { case $1 in cache-node) echo 8080/tcp,8081/tcp ;; operator) echo 8081/tcp ;; *) return 1 ;; esac; }
IMAGES=(cache-node operator)
USER_ID=65532

host_arch() { case $(uname -m) in x86_64 | amd64) echo amd64 ;; aarch64 | arm64) echo arm64 ;; *) uname -m ;; esac; }
triple_of() { case $1 in amd64) echo x86_64-unknown-linux-gnu ;; arm64) echo aarch64-unknown-linux-gnu ;; *) return 1 ;; esac; }

# build_binaries <arch> <image>...: static release binaries; prints their directory.
build_binaries() {
  local arch=$1 triple args=()
  shift
  triple=$(triple_of "$arch") || { echo "unknown architecture $arch (amd64 or arm64)" >&2; return 1; }
  for image in "$@"; do
    uses_pgo "$arch" "$image" && continue
    args+=(-p "$(package_of "$image")" --bin "$(binary_of "$image")")
  done
  local upper=${triple^^}
  upper=${upper//-/_}
  # --target keeps +crt-static away from build scripts and proc macros.
  export "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static"
  if [ "$arch" != "$(host_arch)" ]; then
    local gcc="${triple%%-*}-linux-gnu-gcc"
    export "CARGO_TARGET_${upper}_LINKER=$gcc" "CC_${triple//-/_}=$gcc"
  fi
  if [ ${#args[@]} -gt 0 ]; then
    cargo build --profile "$PROFILE" --locked --target "$triple" "${args[@]}" >&2
  fi
  echo "target/$triple/$PROFILE"
}

# uses_pgo <arch> <image> / shipped_binary <arch> <image> <bin_dir>: the
# binary the image holds (build_binaries leaves out the ones built here). For
# the cache node of a release build for the build host's architecture, the
# profile-guided build (scripts/build-pgo.sh: its profile comes from running
# the instrumented binary, which a cross build cannot, so other
# architectures ship the plain release build).
uses_pgo() { [ "$2" = cache-node ] && [ "$PROFILE" = release ] && [ "$1" = "$(host_arch)" ]; }

shipped_binary() {
  if uses_pgo "$1" "$2"; then
    bash scripts/build-pgo.sh | tail -n 1
  else
    echo "$3/$(binary_of "$2")"
  fi
}

# strip_of <arch>: binutils' strip for that architecture's binaries.
strip_of() {
  if [ "$1" = "$(host_arch)" ]; then echo strip; else echo "$(triple_of "$1" | cut -d- -f1)-linux-gnu-strip"; fi
}

# make_rootfs <binary> <image> <arch> <dir>: the image's filesystem. The
# binary loses its line tables (about half its size; panics still name
# their functions).
make_rootfs() {
  local binary=$1 image=$2 arch=$3 dir=$4
  local target="$dir/usr/local/bin/$(binary_of "$image")"
  rm -rf "$dir"
  mkdir -p "$dir/usr/local/bin" "$dir/etc"
  install -m 0755 "$binary" "$target"
  "$(strip_of "$arch")" --strip-debug "$target"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
    "$USER_ID" "$USER_ID" >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%s:\n' "$USER_ID" >"$dir/etc/group"
  chmod 0644 "$dir/etc/passwd" "$dir/etc/group"
}

PROFILE=release

if [ "${1:-}" = rootfs ]; then
  [ $# -eq 3 ] || { echo "usage: $0 rootfs <image> <dir>" >&2; exit 2; }
  image=$2
  package_of "$image" >/dev/null || { echo "unknown image $image (${IMAGES[*]})" >&2; exit 2; }
  dir=$(build_binaries "$(host_arch)" "$image")
  binary=$(shipped_binary "$(host_arch)" "$image" "$dir")
  make_rootfs "$binary" "$image" "$(host_arch)" "$3"
  exit 0
fi

ARCHES=$(host_arch)
REPO=""
TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' operator/Cargo.toml | head -n 1)
OUT=target/images
while [ $# -gt 0 ]; do
  case $1 in
    --arch) ARCHES=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    *) echo "unknown argument $1; see the comment at the top of $0" >&2; exit 2 ;;
  esac
done

CRANE="$(bash scripts/build-tools.sh | tail -n 1)/crane"
WORK=$(mktemp -d)
registry_pid=""
cleanup() {
  [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "$REPO" ]; then
  # A registry on loopback for this build only; it picks its own port.
  mkdir -p "$WORK/registry"
  # The log exists before crane starts: the child opens it only after the
  # fork, and reading a file not there yet would end this script (set -e).
  : >"$WORK/registry.log"
  "$CRANE" registry serve --address 127.0.0.1:0 --disk "$WORK/registry" 2>"$WORK/registry.log" &
  registry_pid=$!
  port=""
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$WORK/registry.log")
    [ -n "$port" ] && break
    kill -0 "$registry_pid" 2>/dev/null || { cat "$WORK/registry.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$port" ] || { echo "the local registry did not start" >&2; exit 1; }
  REPO="127.0.0.1:$port/distrocache"
fi

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
for arch in ${ARCHES//,/ }; do
  echo "==> building static binaries for linux/$arch" >&2
  bin_dir=$(build_binaries "$arch" "${IMAGES[@]}")
  for image in "${IMAGES[@]}"; do
    ref="$REPO/$image:$TAG-$arch"
    binary=$(shipped_binary "$arch" "$image" "$bin_dir")
    make_rootfs "$binary" "$image" "$arch" "$WORK/rootfs-$image-$arch"
    # Root-owned, fixed times and order: the same sources give the same layer.
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu \
      -C "$WORK/rootfs-$image-$arch" -cf "$WORK/layer-$image-$arch.tar" etc usr
    "$CRANE" append --oci-empty-base -f "$WORK/layer-$image-$arch.tar" -t "$ref" >/dev/null
    "$CRANE" mutate "$ref" -t "$ref" \
      --user "$USER_ID:$USER_ID" \
      --entrypoint "/usr/local/bin/$(binary_of "$image")" \
      --exposed-ports "$(ports_of "$image")" \
      --set-platform "linux/$arch" \
      --label "org.opencontainers.image.title=$image" \
      --label "org.opencontainers.image.version=$TAG" \
      --label "org.opencontainers.image.revision=$revision" \
      --label "org.opencontainers.image.source=https://github.com/distrocache/distrocache" \
      --label "org.opencontainers.image.licenses=Apache-2.0" >/dev/null
    echo "  $ref" >&2
  done
done

for image in "${IMAGES[@]}"; do
  manifests=()
  for arch in ${ARCHES//,/ }; do manifests+=(-m "$REPO/$image:$TAG-$arch"); done
  digest=$("$CRANE" index append "${manifests[@]}" -t "$REPO/$image:$TAG")
  echo "$REPO/$image:$TAG -> $digest" >&2
  if [ -n "$registry_pid" ]; then
    rm -rf "${OUT:?}/$image"
    mkdir -p "$OUT"
    "$CRANE" pull --format=oci "$REPO/$image:$TAG" "$OUT/$image"
    echo "  OCI layout: $OUT/$image" >&2
  fi
done
