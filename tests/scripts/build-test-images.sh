#!/usr/bin/env bash
# Builds the Docker images the docker driver's tests run: `skymirror-example:test`
# and `skymirror-example:test2` (the same static `skymirror-example` binary in a
# `FROM scratch` image, under two tags so a test can change an app's image).
#
# Nothing is pulled: `FROM scratch` needs no registry. Without a reachable Docker
# engine the images cannot be built: with CI=true that fails the run; otherwise
# the script says so and exits 0, and the docker tests skip themselves.
#
# The image runs `/skymirror-example` as its entrypoint; it listens on $PORT and
# binds 127.0.0.1 unless given `--host 0.0.0.0`, which the tests pass as `args`.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ]; then
    echo "build-test-images: error: no reachable Docker engine (docker info failed); CI=true needs one for the docker driver tests" >&2
    exit 1
  fi
  echo "build-test-images: no reachable Docker engine; skipping the test images (the docker driver tests will skip)" >&2
  exit 0
fi

# A static binary runs in an empty image; the explicit --target keeps these
# flags from rebuilding the host's own build.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -p skymirror-example --target x86_64-unknown-linux-gnu --locked
binary=target/x86_64-unknown-linux-gnu/debug/skymirror-example

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/skymirror-example"
cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY skymirror-example /skymirror-example
EXPOSE 8080
ENTRYPOINT ["/skymirror-example"]
DOCKERFILE

docker build --quiet --tag skymirror-example:test --tag skymirror-example:test2 "$context" >/dev/null
echo "build-test-images: built skymirror-example:test and skymirror-example:test2" >&2
