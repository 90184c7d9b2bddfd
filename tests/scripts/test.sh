#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit and end-to-end test.
# Needs the Rust toolchain (cargo-nextest if present, cargo test otherwise);
# installs Debian's python3-grpcio for the stock-client test when it is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# End-to-end tests run the real binaries: build them once here, never from a test.
cargo build --workspace --bins --locked
tests/scripts/build-test-images.sh
# The stock-client test (tests/tests/security.rs) runs Python's grpcio.
if ! python3 -c 'import grpc' 2>/dev/null && ! /usr/bin/python3 -c 'import grpc' 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y --no-install-recommends python3-grpcio
  fi
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --config-file tests/nextest.toml
else
  cargo test --workspace --locked --no-fail-fast
fi
