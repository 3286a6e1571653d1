#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (idempotent),
# then format check, clippy -D warnings and every test. Run as root on Debian:
# privileged tests skip outside CI when not root, and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Building needs nothing but cargo: no build script may run protoc.
export PROTOC=/nonexistent/protoc

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test.log

# Fuzz smoke run of the tunnel's parsers and server state machine and of
# imds-proxy's HTTP/1 layer and request path
# (cargo-fuzz; bounded: FUZZ_SECONDS per target, default 15).
echo "== fuzz smoke"
scripts/fuzz-smoke.sh

# Last, so it is the closing line: cargo's exit status already failed the run
# on any failed test; this sums the suites for a reader of the CI log.
echo "== summary"
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' target/test.log
