#!/usr/bin/env bash
# Builds the Docker images the docker and lab tests run, from the debug binaries
# the test command has just built (never building anything itself):
# skymirror-daemon:test, skymirror-agent:test and skymirror-example:test, plus
# skymirror-example:test2 (the same image under another tag, so a test can
# change an app's image) and two with a HEALTHCHECK of their own. See
# deploy/docker/build-images.sh; nothing is pulled.
#
# Without a reachable Docker engine the images cannot be built: with CI=true
# that fails the run; otherwise the script says so and exits 0, and the docker
# tests skip themselves.
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

deploy/docker/build-images.sh --profile debug --tag test --no-build
docker tag skymirror-example:test skymirror-example:test2

# The example image with a HEALTHCHECK of its own that always passes, and one
# that always fails (`--exit-code N` makes the app exit at once with N).
for verdict in passing:0 failing:1; do
  if ! out=$(docker build --quiet --tag "skymirror-example:test-healthcheck-${verdict%%:*}" - 2>&1 <<DOCKERFILE
FROM skymirror-example:test
HEALTHCHECK --interval=200ms --timeout=2s --retries=1 \
  CMD ["/skymirror-example", "--exit-code", "${verdict##*:}"]
DOCKERFILE
  ); then
    echo "$out" >&2
    exit 1
  fi
done
echo "build-test-images: tagged skymirror-example:test2, built skymirror-example:test-healthcheck-{passing,failing}" >&2
