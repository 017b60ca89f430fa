#!/usr/bin/env bash
# Flash and RAM of the embassy example for NUCLEO-F429ZI (thumbv7em-none-eabihf): the
# full build (embassy-stm32 + embassy-net + the relay agent over the device channel, 2
# connections), the `plain-terminal` build (the agent over plain TCP) and the
# `no-terminal` build (the same sockets as a plain TCP echo client); the differences are
# what the relay and the channel cost on top of embassy.
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

BIN="$CARGO_TARGET_DIR/$TARGET/release/relay-embassy-stm32"
for build in no-terminal plain-terminal full; do
  features=()
  [ "$build" = full ] || features=(--features "$build")
  cargo build -j1 --release --quiet "${features[@]}"
  cp "$BIN" "$BIN.$build"
done

echo "== arm-none-eabi-size (NUCLEO-F429ZI, embassy; opt-level=z, lto, panic=abort) =="
arm-none-eabi-size "$BIN.no-terminal" "$BIN.plain-terminal" "$BIN.full"
flash() { arm-none-eabi-size "$1" | awk 'NR==2{print $1 + $2}'; }
f0=$(flash "$BIN.no-terminal")
fp=$(flash "$BIN.plain-terminal")
f1=$(flash "$BIN.full")
echo
echo "== flash split =="
printf 'embassy-stm32 + embassy-net + executor (no-terminal build): %6d B flash (.text+.data)\n' "$f0"
printf 'relay (relay-proto + relay-embedded + embassy binding):      %6d B flash  (= plain-terminal - no-terminal)\n' $((fp - f0))
printf 'device channel (Noise NK, clatter):                          %6d B flash  (= full - plain-terminal)\n' $((f1 - fp))

read -r addr size < <(arm-none-eabi-nm -S "$BIN.full" | awk '$4=="RELAY_FOOTPRINT"{print $1, $2}')
start=$((16#$addr))
words=$(arm-none-eabi-objdump -s --start-address=$start --stop-address=$((start + 16#$size)) "$BIN.full" \
  | awk '/^ [0-9a-f]+ /{printf "%s %s %s %s ", $2, $3, $4, $5}')
le() { local w=$1; echo $((16#${w:6:2}${w:4:2}${w:2:2}${w:0:2})); }
read -r w0 w1 w2 w3 <<<"$words"
agent=$(le "$w0"); tcp=$(le "$w1"); c1=$(le "$w2"); c2=$(le "$w3")
link=$((c2 - c1)); shared=$((c1 - link))
echo
echo "== RAM on the target (size_of, no heap; socket buffers not included) =="
printf 'Agent<2>: %d B; EmbassyTcp<2> (sockets + carry buffers): %d B; Channel<2>: %d B\n' "$agent" "$tcp" "$c2"
echo
echo "== the relay on embassy, all together (targets: 40,960 B flash; 1,536 B RAM per connection) =="
printf 'relay-proto + relay-embedded + embassy binding + channel: %d B flash; RAM per connection: %d B (Agent/2 + EmbassyTcp/2 + channel link %d) + %d B shared\n' \
  $((f1 - f0)) $((agent / 2 + tcp / 2 + link)) "$link" "$shared"
