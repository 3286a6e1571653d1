#!/usr/bin/env bash
# Fuzz smoke run for the tunnel (crates/tunnel/fuzz) and imds-proxy
# (crates/imds/fuzz): installs cargo-fuzz if missing (idempotent), builds
# each crate's targets once and runs each target for a short bounded time.
# Any crash fails the run and leaves its input under
# crates/<crate>/fuzz/artifacts/<target>/ (the failure message names it).
#
# Only the stable toolchain is installed: cargo-fuzz needs -Z flags, which
# RUSTC_BOOTSTRAP=1 unlocks. Sanitizers are off (-s none): the code is safe
# Rust, the targets look for panics and broken invariants, and the run is
# several times faster.
#
# FUZZ_SECONDS (default 15) is the time per target.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

seconds="${FUZZ_SECONDS:-15}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# fuzz_crate DIR TARGET...: the cargo-fuzz crate in DIR (from the repo root).
fuzz_crate() {
    local dir="$1"
    shift
    (
        cd "$root/$dir"
        cargo fuzz build -s none
        for t in "$@"; do
            echo "== fuzz $t (${seconds}s)"
            mkdir -p "corpus/$t"
            # -rss_limit_mb bounds memory; -timeout flags an input that hangs.
            if ! cargo fuzz run -s none "$t" "corpus/$t" -- \
                -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
                >"$log" 2>&1; then
                tail -n 40 "$log" >&2
                echo "fuzz $t: crash; its input is under $dir/artifacts/$t" >&2
                exit 1
            fi
            grep -E '^(#[0-9]+.*DONE|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" || tail -n 3 "$log"
        done
    )
}

fuzz_crate crates/tunnel/fuzz packet_decode agent_identifiers http_connect server_state grpc_frontend grpc_wire
fuzz_crate crates/imds/fuzz h1_request h1_response chunked proxy_exchange
