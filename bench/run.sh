#!/usr/bin/env bash
# One command: installs the peers, builds the bench (and our relay, when relay-host has its
# `relay` binary), runs the benchmark and writes the report.
#   bash bench/run.sh            # full: 5 repeats, 10 s each -> docs/BENCHMARKS.md
#   bash bench/run.sh --quick    # smoke test (CI): ~1 s per figure -> bench/out/quick/
# Any other bench flag passes through (see: bash bench/run.sh --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ws="$here/.."
bash "$here/install.sh"
target="${CARGO_TARGET_DIR:-$ws/target}"
jobs="${CARGO_BUILD_JOBS:-1}"
( cd "$ws" && cargo build -q --release -j "$jobs" -p relay-bench --bin bench )
if [ -z "${RELAY_BIN:-}" ]; then
    # Our relay plugs in as soon as relay-host builds a `relay` binary.
    if ( cd "$ws" && cargo build -q --release -j "$jobs" -p relay-host --bin relay 2>/dev/null ); then
        export RELAY_BIN="$target/release/relay"
    fi
fi
exec "$target/release/bench" "$@"
