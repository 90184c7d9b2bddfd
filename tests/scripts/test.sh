#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit and end-to-end test.
# Needs only the Rust toolchain (cargo-nextest if present, cargo test otherwise).
set -euo pipefail
cd "$(dirname "$0")/../.."

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
