#!/usr/bin/env bash
# Flash and RAM of the firmware-shaped binary on thumbv7em-none-eabihf (Cortex-M4F):
# the full build (smoltcp + relay terminal over the device channel, 2 connections), the
# `plain-terminal` build (the terminal over plain TCP) and the `no-terminal` build (the
# same superloop on smoltcp alone); the differences are what the relay and the channel
# cost.
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
cargo build -j1 --release --quiet --features plain-terminal
cp "$BIN" "$BIN.plain"
cargo build -j1 --release --quiet
cp "$BIN" "$BIN.full"

echo "== arm-none-eabi-size (opt-level=z, lto, panic=abort) =="
arm-none-eabi-size "$BIN.no-terminal" "$BIN.plain" "$BIN.full"

flash() { arm-none-eabi-size "$1" | awk 'NR==2{print $1 + $2}'; }
f0=$(flash "$BIN.no-terminal")
fp=$(flash "$BIN.plain")
f1=$(flash "$BIN.full")
read -r d0 b0 < <(arm-none-eabi-size "$BIN.no-terminal" | awk 'NR==2{print $2, $3}')
read -r d1 b1 < <(arm-none-eabi-size "$BIN.full" | awk 'NR==2{print $2, $3}')
echo
echo "== flash split =="
printf 'smoltcp + runtime (no-terminal build): %6d B flash (.text+.data)\n' "$f0"
printf 'relay (relay-proto + relay-embedded):  %6d B flash  (= plain-terminal - no-terminal)\n' $((fp - f0))
printf 'device channel (Noise NK, clatter):    %6d B flash  (= full - plain-terminal)\n' $((f1 - fp))
printf 'static RAM difference (.data+.bss):    %6d B  (full - no-terminal)\n' $(((d1 + b1) - (d0 + b0)))

# The probe static RELAY_FOOTPRINT holds size_of values computed for the target.
read -r addr size < <(arm-none-eabi-nm -S "$BIN.full" | awk '$4=="RELAY_FOOTPRINT"{print $1, $2}')
start=$((16#$addr))
words=$(arm-none-eabi-objdump -s --start-address=$start --stop-address=$((start + 16#$size)) "$BIN.full" \
  | awk '/^ [0-9a-f]+ /{printf "%s %s %s %s ", $2, $3, $4, $5}')
le() { local w=$1; echo $((16#${w:6:2}${w:4:2}${w:2:2}${w:0:2})); }
read -r w0 w1 w2 w3 w4 w5 <<<"$words"
echo
echo "== RAM on the target (size_of, no heap) =="
printf 'Terminal<2> (relay-proto state machine): %5d B\n' "$(le "$w0")"
printf 'Agent<2> (terminal + per-connection glue + one shared scratch): %5d B  (%d B per connection)\n' "$(le "$w1")" $(( $(le "$w1") / 2 ))
printf 'socket buffers per connection: rx %d B + tx %d B\n' "$(le "$w2")" "$(le "$w3")"
c1=$(le "$w4"); c2=$(le "$w5")
link=$((c2 - c1)); shared=$((c1 - link))
printf 'Channel<2> (device channel): %5d B = %d B per connection + %d B shared (handshake state, staging)\n' "$c2" "$link" "$shared"
echo
echo "== the device channel, all together (targets: 40,960 B flash; 1,536 B RAM per connection) =="
printf 'relay-proto + relay-embedded + channel: %d B flash; RAM per connection with the channel: %d B (Agent/2 + channel link) + %d B shared\n' \
  $((f1 - f0)) $(( $(le "$w1") / 2 + link )) "$shared"
