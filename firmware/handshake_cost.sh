#!/usr/bin/env bash
# Instructions of one device-side channel handshake on a Cortex-M4 (QEMU netduinoplus2,
# an STM32F405): builds the `handshake-cost` binary (opt-level z, LTO, like the
# firmware), runs it one instruction per translation block with every execution traced,
# and counts the instructions executed between cost_on() and cost_off() (the device's
# two halves of the handshake; the relay's half, run in between, is not counted).
# Instructions, not cycles: a Cortex-M4 takes one or more cycles per instruction
# (multiplies and loads more), so the cycle count is higher. Needs qemu-system-arm.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
for tool in qemu-system-arm; do
  command -v "$tool" >/dev/null || { echo "handshake_cost.sh: $tool missing" >&2; exit 1; }
done
cargo build -j1 --release --quiet --features handshake-cost --bin handshake-cost
BIN="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/handshake-cost"
FIFO=$(mktemp -u)
mkfifo "$FIFO"
trap 'rm -f "$FIFO"' EXIT
# One trace line per executed instruction, ending with the function it belongs to.
awk '
  /^Trace/ { if ($NF == "cost_on") counting = 1; else if ($NF == "cost_off") counting = 0; else if (counting) n++ }
  END { printf "device-side handshake: %d instructions (Cortex-M4, QEMU)\n", n }' <"$FIFO" &
counter=$!
timeout 600 qemu-system-arm -M netduinoplus2 -nographic -semihosting-config enable=on,target=native \
  -kernel "$BIN" -singlestep -d nochain,exec -D "$FIFO" \
  || { echo "handshake_cost.sh: the handshake failed on the target" >&2; exit 1; }
wait "$counter"
