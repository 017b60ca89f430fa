//! The original picture, for real: two LANs behind masquerading gateways and a relay in a
//! "public" network namespace. LAN 2's terminal cannot be reached directly from LAN 1,
//! and can through the relay. Needs root, `ip` and `iptables`; skipped loudly otherwise.
//! Namespaces are named `rlyt-*-<pid>` and removed afterwards.

#[path = "host_support.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn sh(script: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let p = &self.0;
        for n in ["pub", "gw1", "gw2", "lan1", "lan2"] {
            let _ = sh(&format!("ip netns del {p}{n} 2>/dev/null"));
        }
    }
}

#[test]
fn lan2_is_reachable_from_lan1_only_through_the_relay() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !root || !sh("command -v ip >/dev/null && command -v iptables >/dev/null") {
        eprintln!(
            "!!! SKIPPED lan2_is_reachable_from_lan1_only_through_the_relay: needs root, ip and iptables (apt-get install iproute2 iptables)"
        );
        return;
    }
    let p = format!("rlyt{}", std::process::id() % 100_000);
    let _guard = Netns(p.clone());
    // pub: 203.0.113.0/24 (relay .1, gw1 .11, gw2 .12); LAN1 10.1.0.0/24; LAN2 10.2.0.0/24.
    let setup = format!(
        "set -e
        for n in pub gw1 gw2 lan1 lan2; do ip netns add {p}$n; ip -n {p}$n link set lo up; done
        ip link add {p}a type veth peer name {p}b
        ip link set {p}a netns {p}pub; ip link set {p}b netns {p}gw1
        ip link add {p}c type veth peer name {p}d
        ip link set {p}c netns {p}pub; ip link set {p}d netns {p}gw2
        ip -n {p}pub link add br0 type bridge; ip -n {p}pub link set br0 up
        ip -n {p}pub link set {p}a master br0; ip -n {p}pub link set {p}c master br0
        ip -n {p}pub link set {p}a up; ip -n {p}pub link set {p}c up
        ip -n {p}pub addr add 203.0.113.1/24 dev br0
        ip -n {p}gw1 addr add 203.0.113.11/24 dev {p}b; ip -n {p}gw1 link set {p}b up
        ip -n {p}gw2 addr add 203.0.113.12/24 dev {p}d; ip -n {p}gw2 link set {p}d up
        ip link add {p}e type veth peer name {p}f
        ip link set {p}e netns {p}gw1; ip link set {p}f netns {p}lan1
        ip -n {p}gw1 addr add 10.1.0.1/24 dev {p}e; ip -n {p}gw1 link set {p}e up
        ip -n {p}lan1 addr add 10.1.0.2/24 dev {p}f; ip -n {p}lan1 link set {p}f up
        ip -n {p}lan1 route add default via 10.1.0.1
        ip link add {p}g type veth peer name {p}h
        ip link set {p}g netns {p}gw2; ip link set {p}h netns {p}lan2
        ip -n {p}gw2 addr add 10.2.0.1/24 dev {p}g; ip -n {p}gw2 link set {p}g up
        ip -n {p}lan2 addr add 10.2.0.2/24 dev {p}h; ip -n {p}lan2 link set {p}h up
        ip -n {p}lan2 route add default via 10.2.0.1
        for g in gw1 gw2; do
          ip netns exec {p}$g sysctl -qw net.ipv4.ip_forward=1
        done
        ip netns exec {p}gw1 iptables -t nat -A POSTROUTING -o {p}b -j MASQUERADE
        ip netns exec {p}gw2 iptables -t nat -A POSTROUTING -o {p}d -j MASQUERADE"
    );
    assert!(sh(&setup), "network namespace setup failed");

    // The relay in the public namespace; accounts made beforehand.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    for u in ["cam", "me"] {
        assert!(sh(&format!(
            "printf '{PASSWORD}' | {} user add {u} --password-stdin --db {} >/dev/null",
            relay_bin().display(),
            db.display()
        )));
    }
    let in_ns = |ns: &str, args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{p}{ns}")])
            .arg(relay_bin())
            .args(args);
        c.env("RELAY_PASSWORD", PASSWORD);
        c
    };
    let relay = Proc::spawn(
        "relay",
        in_ns(
            "pub",
            &[
                "serve",
                "--db",
                db.to_str().unwrap(),
                "--listen",
                "203.0.113.1:7835",
            ],
        ),
    );
    relay.wait_for("listening", Duration::from_secs(20));
    let fp = relay
        .log()
        .split("fingerprint=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    // LAN 2: an HTTP-ish service on the device, exposed through the relay.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "behind NAT\n").unwrap();
    let svc = Proc::spawn("service", {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &format!("{p}lan2"),
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(&www);
        c
    });
    std::thread::sleep(Duration::from_secs(1));
    let cam = Proc::spawn(
        "expose",
        in_ns(
            "lan2",
            &[
                "expose",
                "--server",
                "203.0.113.1",
                "--fingerprint",
                &fp,
                "--user",
                "cam",
                "--service",
                "web=127.0.0.1:8000",
            ],
        ),
    );
    cam.wait_for("logged in to the relay", Duration::from_secs(20));
    // Directly from LAN 1: neither the device's LAN address nor its gateway's public one.
    for addr in ["10.2.0.2", "203.0.113.12"] {
        assert!(
            !sh(&format!(
                "ip netns exec {p}lan1 timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/8000' 2>/dev/null"
            )),
            "{addr}:8000 reachable directly from LAN 1"
        );
    }
    // Through the relay.
    let me = Proc::spawn(
        "connect",
        in_ns(
            "lan1",
            &[
                "connect",
                "--server",
                "203.0.113.1",
                "--fingerprint",
                &fp,
                "--user",
                "me",
                "cam/web",
                "--listen",
                "127.0.0.1:8080",
            ],
        ),
    );
    me.wait_for("forwarding local connections", Duration::from_secs(20));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{p}lan1"),
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://127.0.0.1:8080/",
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("behind NAT"),
        "through the relay: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The relay saw the gateways' public addresses, not the LAN ones.
    assert!(relay.log().contains("203.0.113.12:"), "{}", relay.log());
    assert!(!relay.log().contains("10.2.0.2"), "{}", relay.log());
    drop((me, cam, svc, relay));
}
