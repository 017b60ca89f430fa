#!/usr/bin/env bash
# The TAP example against the real relay, behind a masquerading gateway, in network
# namespaces this script makes (and removes on exit). Topology:
#
#   [ns gw]  tap_device (smoltcp, 10.77.1.2) --tap0-- 10.77.1.1 gateway 10.77.2.1 --veth--+
#   [ns pub] 10.77.2.2: `relay serve` (:7835), `relay connect`, curl  <--------------------+
#
# The device talks to the relay over the encrypted device channel (Noise NK, the relay's
# channel key pinned with --relay-key), on the relay's TLS port; the relay has no plain
# listener. tcpdump captures the device's link (tap0) in the gateway namespace.
# The gateway forwards and MASQUERADEs 10.77.1.0/24, and the public side has no route
# back to it: the device is reachable only through the connections it opens itself. Its
# TCP/IP is smoltcp on the TAP (no kernel TCP on the device side); the relay, `relay
# connect` and curl run on the kernel stack of the public namespace.
#
# What must hold:
#   1. the relay sees the device's login arrive from the gateway's address (NAT works);
#   2. the device's stack answers on its LAN, and has no route from the public side;
#   3. curl fetches the device's HTTP status page through `relay connect --listen`;
#   4. 1 MiB of random bytes round-trips byte-exact through the device's echo service
#      (`relay connect --stdio`, sha256 compared), and the device's status page counts it;
#   5. the capture holds that traffic (over 1 MiB) and neither the password, nor
#      any 16-byte piece of the payload, nor the status page's text appears in it;
#   6. a device pinning a wrong key fails with a clear error, the relay sees no login,
#      and every TCP payload the device sends is a 52-byte first handshake message.
#
# Needs root, ip(8), iptables, curl, sha256sum (exit 77 = skipped, only for missing
# root or tools), and tcpdump and python3 (a failure when missing: .ci/install installs
# them). Builds `relay` and the example (debug) first.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "embedded_nat: needs root; skipped"; exit 77; }
for t in ip iptables curl sha256sum head timeout; do
  command -v "$t" >/dev/null || { echo "embedded_nat: $t missing; skipped"; exit 77; }
done
for t in tcpdump python3; do
  command -v "$t" >/dev/null || { echo "embedded_nat: FAILED: $t missing (.ci/install installs it)" >&2; exit 1; }
done

SUF=$$
GW=rlye-gw-$SUF
PUB=rlye-pub-$SUF
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
TMP=$(mktemp -d)
PIDS=()
PASSED=0

cleanup() {
  local rc=$?
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$GW" 2>/dev/null || true
  ip netns del "$PUB" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    for f in relay device device-wrong-key connect-http connect-echo session.pcap wrong-key.pcap; do
      [ -f "$TMP/$f.log" ] && { echo "--- $f log (last 40 lines)"; tail -n 40 "$TMP/$f.log"; }
    done
    echo "embedded_nat: $PASSED passed, 1 failed"
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "embedded_nat: FAILED: $*" >&2; exit 1; }
ok() { PASSED=$((PASSED + 1)); echo "embedded_nat: ok $PASSED: $*"; }

# Waits up to $3 seconds for the log file $1 to contain the pattern $2.
wait_log() {
  local deadline=$((SECONDS + $3))
  until grep -q -- "$2" "$1" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || fail "no '$2' in $(basename "$1") after $3 s"
    sleep 0.2
  done
}

# Debug builds: `cargo test --workspace` has built both already, so this costs nothing
# in scripts/test-all (a release build here would be a second, slow one: the benchmark
# step builds its own with other profile settings).
cargo build -q -p relay-host --bin relay
cargo build -q -p relay-examples --example tap_device
RELAY="$CARGO_TARGET_DIR/debug/relay"
DEVICE="$CARGO_TARGET_DIR/debug/examples/tap_device"

ip netns add "$GW"
ip netns add "$PUB"
ip link add "veth-g$SUF" netns "$GW" type veth peer name "veth-p$SUF" netns "$PUB"
ip -n "$GW" link set lo up
ip -n "$PUB" link set lo up
ip -n "$GW" addr add 10.77.2.1/24 dev "veth-g$SUF"
ip -n "$PUB" addr add 10.77.2.2/24 dev "veth-p$SUF"
ip -n "$GW" link set "veth-g$SUF" up
ip -n "$PUB" link set "veth-p$SUF" up
ip -n "$GW" tuntap add dev tap0 mode tap
ip -n "$GW" addr add 10.77.1.1/24 dev tap0
ip -n "$GW" link set tap0 up
ip netns exec "$GW" sysctl -q -w net.ipv4.ip_forward=1
ip netns exec "$GW" iptables -t nat -A POSTROUTING -s 10.77.1.0/24 -o "veth-g$SUF" -j MASQUERADE

# The relay, with a fresh account store: the device, and one account per client (a new
# password login of the same user ID would replace the running one).
DB="$TMP/relay.db"
for account in cam-1:device-secret web:user-secret echo:user-secret; do
  printf '%s\n' "${account#*:}" | "$RELAY" user add "${account%%:*}" --db "$DB" --password-stdin \
    >>"$TMP/relay.log" 2>&1
done
ip netns exec "$PUB" "$RELAY" serve --db "$DB" --listen 10.77.2.2:7835 >>"$TMP/relay.log" 2>&1 &
PIDS+=($!)
wait_log "$TMP/relay.log" "listening" 20
KEY=$(grep -o 'channel_key=[^ ]*' "$TMP/relay.log" | head -n1 | cut -d= -f2-)
[ -n "$KEY" ] || fail "no channel key in the relay's log"

# Captures the device's link (tap0) into $1 until stopped with stop_capture.
capture() {
  ip netns exec "$GW" tcpdump -i tap0 -s 0 -U --immediate-mode -Z root -w "$1" tcp >"$1.log" 2>&1 &
  CAPTURE=$!
  PIDS+=("$CAPTURE")
  wait_log "$1.log" "listening on" 10
}
stop_capture() { kill -INT "$CAPTURE"; wait "$CAPTURE" 2>/dev/null || true; }
capture "$TMP/session.pcap"

ip netns exec "$GW" "$DEVICE" --tap tap0 --ip 10.77.1.2/24 --gw 10.77.1.1 \
  --relay 10.77.2.2:7835 --relay-key "$KEY" --user cam-1 --password device-secret \
  >"$TMP/device.log" 2>&1 &
DEVICE_PID=$!
PIDS+=("$DEVICE_PID")
wait_log "$TMP/device.log" "logged in" 20
wait_log "$TMP/relay.log" "login user=cam-1" 5
grep -Eq "login user=cam-1 .*peer=(Some\()?10\.77\.2\.1:" "$TMP/relay.log" \
  || fail "the relay did not see cam-1 arrive from the gateway's address 10.77.2.1"
ok "device logged in through NAT (the relay saw it as 10.77.2.1)"

# A TCP probe to the device's port 80 (nothing listens there): from the gateway, smoltcp
# answers with a reset; from the public side there is no route at all.
probe() { ip netns exec "$1" timeout 3 bash -c 'exec 3<>/dev/tcp/10.77.1.2/80' 2>&1 || true; }
probe "$GW" | grep -q "Connection refused" || fail "the device's stack does not answer on its LAN"
probe "$PUB" | grep -q "Network is unreachable" \
  || fail "the device's LAN address is reachable directly from the public side"
ok "device answers on its LAN and is not routable from the public side"

export RELAY_PASSWORD=user-secret
CONNECT=("$RELAY" connect --server 10.77.2.2:7835 --relay-key "$KEY")
ip netns exec "$PUB" "${CONNECT[@]}" --user web cam-1/http --listen 127.0.0.1:8080 \
  >"$TMP/connect-http.log" 2>&1 &
PIDS+=($!)
wait_log "$TMP/connect-http.log" "forwarding local connections" 20
page=$(ip netns exec "$PUB" curl -sS --max-time 10 http://127.0.0.1:8080/status) \
  || fail "curl through the relay failed"
echo "$page" | sed 's/^/    /'
grep -q "relay-embedded device" <<<"$page" && grep -q "logged_in: true" <<<"$page" \
  || fail "the status page is not the device's"
ok "HTTP status page served by the device, fetched with curl through the relay"

head -c 1048576 /dev/urandom >"$TMP/payload"
ip netns exec "$PUB" timeout 60 "${CONNECT[@]}" --user echo cam-1/echo --stdio \
  <"$TMP/payload" >"$TMP/echoed" 2>"$TMP/connect-echo.log" \
  || fail "relay connect --stdio to cam-1/echo exited with $?"
sent=$(sha256sum <"$TMP/payload" | cut -d' ' -f1)
got=$(sha256sum <"$TMP/echoed" | cut -d' ' -f1)
[ "$sent" = "$got" ] \
  || fail "echo differs: sent 1048576 B sha256 $sent, got $(stat -c %s "$TMP/echoed") B sha256 $got"
page=$(ip netns exec "$PUB" curl -sS --max-time 10 http://127.0.0.1:8080/status) \
  || fail "second curl through the relay failed"
grep -q "bytes_echoed: 1048576" <<<"$page" || fail "the device did not count 1048576 echoed bytes"
ok "1 MiB random payload echoed byte-exact by the device (sha256 $sent, device counted it)"

stop_capture
python3 - "$TMP/session.pcap" "$TMP/payload" <<'PY' || fail "the capture shows session bytes in clear"
import sys
cap = open(sys.argv[1], "rb").read()
payload = open(sys.argv[2], "rb").read()
assert len(cap) > len(payload), f"a capture of {len(cap)} B missed the 1 MiB echo"
clear = [what for what in (b"device-secret", b"relay-embedded device", b"bytes_echoed") if what in cap]
pieces = [o for o in range(0, len(payload) - 16, 1024) if payload[o:o + 16] in cap]
assert not clear and not pieces, f"in clear: {clear}, payload pieces at {pieces[:5]}"
print(f"    capture: {len(cap)} B, no password, no status page, none of {len(payload) // 1024} payload pieces")
PY
ok "tcpdump on the device's link: neither the password nor the session's bytes in clear"

# A device that pins another key: the relay cannot read its first message and closes;
# the device says why and never sends anything else, its password least of all.
kill "$DEVICE_PID"; wait "$DEVICE_PID" 2>/dev/null || true
logins=$(grep -c "login user=cam-1" "$TMP/relay.log")
capture "$TMP/wrong-key.pcap"
ip netns exec "$GW" "$DEVICE" --tap tap0 --ip 10.77.1.2/24 --gw 10.77.1.1 \
  --relay 10.77.2.2:7835 --relay-key "$(printf 'ab%.0s' $(seq 32))" --user cam-1 \
  --password device-secret >"$TMP/device-wrong-key.log" 2>&1 &
PIDS+=($!)
wait_log "$TMP/device-wrong-key.log" "does not hold the pinned key" 20
stop_capture
[ "$(grep -c "login user=cam-1" "$TMP/relay.log")" = "$logins" ] || fail "the relay saw a login from the wrong-key device"
sizes=$(ip netns exec "$GW" tcpdump -r "$TMP/wrong-key.pcap" -nn 'src host 10.77.1.2 and dst port 7835' 2>/dev/null \
  | grep -o 'length [0-9]*' | awk '$2 > 0 {print $2}' | sort -u | tr '\n' ' ')
[ "$sizes" = "52 " ] || fail "the wrong-key device sent TCP payloads of sizes '$sizes' (only 52-byte handshakes expected)"
! grep -qaF device-secret "$TMP/wrong-key.pcap" || fail "the password is in the wrong-key capture"
ok "a device with a wrong relay key: '$(grep -m1 -o 'relay channel.*' "$TMP/device-wrong-key.log")', no login, only 52-byte handshakes sent"

echo "embedded_nat: $PASSED passed, 0 failed"
