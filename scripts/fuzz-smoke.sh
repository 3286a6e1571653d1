#!/usr/bin/env bash
# Fuzz smoke run for the tunnel (crates/tunnel/fuzz): installs cargo-fuzz if
# missing (idempotent), builds the targets once and runs each for a short
# bounded time. Any crash fails the run and leaves its input under
# crates/tunnel/fuzz/artifacts/<target>/.
#
# Only the stable toolchain is installed: cargo-fuzz needs -Z flags, which
# RUSTC_BOOTSTRAP=1 unlocks. Sanitizers are off (-s none): the code is safe
# Rust, the targets look for panics and broken invariants, and the run is
# several times faster.
#
# FUZZ_SECONDS (default 15) is the time per target.
set -euo pipefail
cd "$(dirname "$0")/../crates/tunnel/fuzz"

seconds="${FUZZ_SECONDS:-15}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=(packet_decode agent_identifiers http_connect server_state)
cargo fuzz build -s none
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    echo "== fuzz $t (${seconds}s)"
    mkdir -p "corpus/$t"
    # -rss_limit_mb bounds memory; -timeout flags an input that hangs.
    if ! cargo fuzz run -s none "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz $t: crash; its input is under crates/tunnel/fuzz/artifacts/$t" >&2
        exit 1
    fi
    grep -E '^(#[0-9]+.*DONE|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" || tail -n 3 "$log"
done
