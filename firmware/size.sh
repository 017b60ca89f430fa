#!/usr/bin/env bash
# Flash and RAM of the firmware-shaped binary on thumbv7em-none-eabihf (Cortex-M4F):
# the full build (smoltcp + relay terminal, 2 connections) and the `no-terminal` build
# (the same superloop on smoltcp alone); the difference is what the relay costs.
# Installs nothing but the Rust target; needs `arm-none-eabi-size` (Debian package
# binutils-arm-none-eabi).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
TARGET=thumbv7em-none-eabihf
rustup target add "$TARGET" >/dev/null
for tool in arm-none-eabi-size arm-none-eabi-nm arm-none-eabi-objdump; do
  command -v "$tool" >/dev/null || { echo "size.sh: $tool missing (apt-get install binutils-arm-none-eabi)" >&2; exit 1; }
done

BIN="$CARGO_TARGET_DIR/$TARGET/release/relay-firmware"
cargo build -j1 --release --quiet --features no-terminal
cp "$BIN" "$BIN.no-terminal"
cargo build -j1 --release --quiet
cp "$BIN" "$BIN.full"

echo "== arm-none-eabi-size (opt-level=z, lto, panic=abort) =="
arm-none-eabi-size "$BIN.no-terminal" "$BIN.full"

read -r t0 d0 b0 _ < <(arm-none-eabi-size "$BIN.no-terminal" | awk 'NR==2{print $1, $2, $3}')
read -r t1 d1 b1 _ < <(arm-none-eabi-size "$BIN.full" | awk 'NR==2{print $1, $2, $3}')
echo
echo "== flash split =="
printf 'smoltcp + runtime (no-terminal build): %6d B flash (.text+.data)\n' $((t0 + d0))
printf 'relay (relay-proto + relay-embedded):  %6d B flash  (= full - no-terminal)\n' $(((t1 + d1) - (t0 + d0)))
printf 'static RAM difference (.data+.bss):    %6d B\n' $(((d1 + b1) - (d0 + b0)))

# The probe static RELAY_FOOTPRINT holds size_of values computed for the target.
read -r addr size < <(arm-none-eabi-nm -S "$BIN.full" | awk '$4=="RELAY_FOOTPRINT"{print $1, $2}')
start=$((16#$addr))
words=$(arm-none-eabi-objdump -s --start-address=$start --stop-address=$((start + 16#$size)) "$BIN.full" \
  | awk '/^ [0-9a-f]+ /{print $2, $3, $4, $5}')
le() { local w=$1; echo $((16#${w:6:2}${w:4:2}${w:2:2}${w:0:2})); }
read -r w0 w1 w2 w3 <<<"$words"
echo
echo "== RAM on the target (size_of, no heap) =="
printf 'Terminal<2> (relay-proto state machine): %5d B\n' "$(le "$w0")"
printf 'Agent<2> (terminal + per-connection glue + one shared scratch): %5d B  (%d B per connection)\n' "$(le "$w1")" $(( $(le "$w1") / 2 ))
printf 'socket buffers per connection: rx %d B + tx %d B\n' "$(le "$w2")" "$(le "$w3")"
