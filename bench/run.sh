#!/usr/bin/env bash
# One command: installs the peers, builds the bench and our relay, runs the benchmark and
# writes the report.
#   bash bench/run.sh            # full: 5 repeats, 10 s each -> docs/BENCHMARKS.md
#   bash bench/run.sh --quick    # smoke test (CI): ~1 s per figure -> bench/out/quick/
# Any other bench flag passes through (see: bash bench/run.sh --help).
# RELAY_BIN=PATH uses that relay binary instead of building relay-host.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ws="$here/.."
bash "$here/install.sh"
target="${CARGO_TARGET_DIR:-$ws/target}"
jobs="${CARGO_BUILD_JOBS:-1}"
build=(-p relay-bench --bin bench)
if [ -z "${RELAY_BIN:-}" ]; then
    build+=(-p relay-host --bin relay)
fi
for a in "$@"; do
    if [ "$a" = --quick ]; then
        # The smoke test times nothing: skip the release profile's thin LTO and single codegen
        # unit, which cost more build time than the whole quick run.
        export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
            CARGO_PROFILE_RELEASE_DEBUG=0
    fi
done
# One cargo invocation: the bench and the relay share every dependency's build.
( cd "$ws" && cargo build -q --release -j "$jobs" "${build[@]}" )
export RELAY_BIN="${RELAY_BIN:-$target/release/relay}"
exec "$target/release/bench" "$@"
