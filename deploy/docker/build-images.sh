#!/usr/bin/env bash
# Builds the container images of skymirror on this machine, with nothing pulled:
#
#   skymirror-daemon:TAG   the `skymirror` binary: daemon, CLI and front door (`edge`)
#   skymirror-agent:TAG    the `skymirror-agent` binary (use it with --driver docker)
#   skymirror-example:TAG  the example app (`skymirror-example`)
#
# Each image is `FROM scratch` plus a root filesystem staged here: the binary and
# the shared libraries it links (as `ldd` lists them, copied from this machine),
# so no base image is needed and the images run the very binaries built here.
#
# Usage: deploy/docker/build-images.sh [--profile release|debug] [--tag TAG] [--no-build]
#   --profile  which cargo profile's binaries to package (default: release)
#   --tag      image tag (default: latest)
#   --no-build package binaries already built instead of running `cargo build`
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=release
tag=latest
build=true
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs release or debug}; shift 2 ;;
    --tag) tag=${2:?--tag needs a tag}; shift 2 ;;
    --no-build) build=false; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release|debug) ;;
  *) echo "build-images: --profile must be release or debug, not $profile" >&2; exit 2 ;;
esac

if ! docker info >/dev/null 2>&1; then
  echo "build-images: error: no reachable Docker engine (docker info failed)" >&2
  exit 1
fi

if $build; then
  flags=(--locked -p skymirror -p skymirror-agent -p skymirror-example --bins)
  [ "$profile" = release ] && flags+=(--release)
  cargo build "${flags[@]}"
fi
bin_dir=${CARGO_TARGET_DIR:-target}/$profile

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# stage BINARY CONTEXT: CONTEXT/rootfs gets /BINARY's name, the libraries it
# links at their own paths, and an empty /tmp.
stage() {
  local binary=$1 context=$2 lib
  if [ ! -x "$binary" ]; then
    echo "build-images: error: $binary is missing; build it first or drop --no-build" >&2
    exit 1
  fi
  mkdir -p "$context/rootfs/tmp"
  chmod 1777 "$context/rootfs/tmp"
  cp "$binary" "$context/rootfs/"
  # `ldd` lists "name => /path (addr)" and the loader as "/path (addr)"; a
  # static binary has none.
  for lib in $(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true); do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
  done
}

for image in daemon agent example; do
  case "$image" in
    daemon) binary=skymirror ;;
    agent) binary=skymirror-agent ;;
    example) binary=skymirror-example ;;
  esac
  stage "$bin_dir/$binary" "$work/$image"
  # Quiet unless it fails (the engine's notes about its builder are noise here).
  if ! out=$(docker build --quiet --file "deploy/docker/$image.Dockerfile" \
    --tag "skymirror-$image:$tag" "$work/$image" 2>&1); then
    echo "$out" >&2
    echo "build-images: error: docker build of skymirror-$image:$tag failed" >&2
    exit 1
  fi
  echo "build-images: built skymirror-$image:$tag ($profile $binary)" >&2
done
