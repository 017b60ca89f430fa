#!/usr/bin/env bash
# Installs the benchmark's peers. Idempotent: skips whatever is already there.
#   apt (Debian): socat iperf3 wrk openssh-server openssh-client strace
#   crates.io:    rathole, bore-cli  -> bench/out/tools/bin (cargo install --locked --root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# RELAY_BENCH_TOOLS keeps the built peers outside the clone (CI reuses them across runs).
tools="${RELAY_BENCH_TOOLS:-$here/out/tools}"
mkdir -p "$tools"

need_apt=()
for pair in socat:socat iperf3:iperf3 wrk:wrk sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client strace:strace; do
    bin="${pair%%:*}"; pkg="${pair#*:}"
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        need_apt+=("$pkg")
    fi
done
if ! command -v cc >/dev/null 2>&1; then need_apt+=(gcc libc6-dev); fi
if [ "${#need_apt[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "install.sh: apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
else
    echo "install.sh: apt packages present"
fi

jobs="${CARGO_BUILD_JOBS:-1}"
# Build in a private target dir so a workspace CARGO_TARGET_DIR is not disturbed.
cinstall() {
    echo "install.sh: cargo install --root $tools $*"
    CARGO_TARGET_DIR="$tools-target" cargo install -q -j "$jobs" --root "$tools" "$@"
}
if [ -x "$tools/bin/bore" ]; then
    echo "install.sh: bore present"
else
    cinstall --locked bore-cli
fi
if [ -x "$tools/bin/rathole" ]; then
    echo "install.sh: rathole present"
else
    # Not --locked: rathole 0.5.0's Cargo.lock pins time 0.3.29, which no longer compiles
    # on Rust >= 1.80 (E0282 in time's format_description), so a fresh resolution is used.
    # Plain TCP is all the benchmark uses, so TLS/noise/websocket (and openssl) are left out.
    cinstall rathole --no-default-features --features server,client
fi
echo "install.sh: done"
