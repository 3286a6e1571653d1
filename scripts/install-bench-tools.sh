#!/usr/bin/env bash
# Installs the peers the side-by-side tunnel bench (crates/tunnel/benches/peers.rs)
# compares against, only what is missing. Not run by scripts/test.sh (rathole
# compiles for minutes). Tools go to <repo>/target/tools, not into the workspace.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tools="$repo/target/tools"
rathole_version="${RATHOLE_VERSION:-0.5.0}"

if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
  "$repo/scripts/install-deps.sh"   # brings openssh-server and openssh-client
fi
# sshd's privilege-separation directory (Debian's service unit creates it at boot).
if [ ! -d /run/sshd ] && [ "$(id -u)" -eq 0 ]; then
  install -d -m 0755 /run/sshd
fi

if [ -x "$tools/bin/rathole" ] && "$tools/bin/rathole" --version 2>/dev/null | grep -q "$rathole_version"; then
  echo "install-bench-tools: rathole $rathole_version already in $tools/bin"
else
  # Not --locked: rathole 0.5.0's lock pins time 0.3.29, which no longer
  # compiles on current rustc (E0282 in time's format_description). Without
  # native-tls (no OpenSSL headers needed); TCP and noise transports kept.
  echo "== cargo install rathole $rathole_version (server,client,noise) --root $tools"
  cargo install rathole --version "$rathole_version" --no-default-features \
    --features server,client,noise --root "$tools"
fi
"$tools/bin/rathole" --version
