#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit and end-to-end test.
# Needs the Rust toolchain (cargo-nextest if present, cargo test otherwise); as
# root it installs the few Debian packages the tests need.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Debian packages some end-to-end tests run as stock servers and clients
# (gRPC and WebSocket through the front door, the stock gRPC client of the
# security tests): installed when missing. Those
# tests skip without them, and fail when CI=true.
missing=()
for pkg in python3-grpcio python3-websockets; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
      echo "test.sh: could not install ${missing[*]}" >&2
  else
    echo "test.sh: ${missing[*]} missing and not root: the tests that need them skip" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# End-to-end tests run the real binaries: build them once here, never from a test.
cargo build --workspace --bins --locked
tests/scripts/build-test-images.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --config-file tests/nextest.toml
else
  cargo test --workspace --locked --no-fail-fast
fi
