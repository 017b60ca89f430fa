//! The device channel (Noise NK, docs/PROTOCOL.md §1.4) with the `relay` binary on both
//! ends: Linux terminals pin the relay's channel key with `--relay-key`, as a device does.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const FAST: &str = "keepalive_interval = \"1s\"\nkeepalive_timeout = \"3s\"\nhandshake_timeout = \"2s\"\ndemand_timeout = \"5s\"";
const T: Duration = Duration::from_secs(20);

/// Runs `cmd` to its end; returns whether it succeeded, its last stderr line, and how
/// long it took.
fn run(mut cmd: Command) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default().to_owned();
    (out.status.success(), last, started.elapsed())
}

#[test]
fn a_session_runs_over_the_channel_with_either_relay_key() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let [current, next] = relay.channel_keys.clone();
    let echo = echo_service();
    let svc = format!("echo=127.0.0.1:{echo}");
    let cam = Proc::spawn(
        "expose cam",
        relay.terminal_channel(&current, "cam", &["expose", "--service", &svc]),
    );
    cam.wait_for("logged in to the relay", T);
    // The requesting side pins the next key: both are accepted during a rotation.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let me = Proc::spawn(
        "connect me",
        relay.terminal_channel(&next, "me", &["connect", "cam/echo", "--listen", &listen]),
    );
    me.wait_for("forwarding local connections", T);
    let mut data = vec![0u8; 1 << 20];
    fill(&mut data, &mut 7);
    assert!(round_trip(port, &data) == data, "echo through the channel");
}

#[test]
fn a_relay_without_the_pinned_key_is_a_clear_error() {
    let relay = Relay::start(FAST);
    relay.add_user("me");
    let wrong = "ab".repeat(32);
    let (ok, last, took) = run(relay.terminal_channel(&wrong, "me", &["online"]));
    assert!(!ok, "a wrong relay key logged in");
    assert!(
        last.starts_with("relay: error:") && last.contains("does not hold the pinned relay key"),
        "{last}"
    );
    assert!(took < Duration::from_secs(15), "slow: {took:?}");
}

/// Something that answers the first message with an invalid second one (an impostor, or
/// an attacker altering it): the terminal stops, and nothing after its first message, the
/// LOGIN with the password least of all, ever reaches the wire.
#[test]
fn a_forged_handshake_answer_never_gets_the_login() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let impostor = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut first = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut first).unwrap();
        let mut forged = vec![0u8, 48];
        forged.extend_from_slice(&[0x5a; 48]);
        s.write_all(&forged).unwrap();
        let mut after = Vec::new();
        let _ = s.read_to_end(&mut after);
        (first.len(), after)
    });
    let mut cmd = Command::new(relay_bin());
    cmd.args(["online", "--server", &format!("127.0.0.1:{port}")])
        .args(["--relay-key", &"ab".repeat(32), "--user", "me"])
        .env("RELAY_PASSWORD", PASSWORD);
    let (ok, last, _) = run(cmd);
    assert!(!ok);
    assert!(last.contains("the channel handshake failed"), "{last}");
    let (first, after) = impostor.join().unwrap();
    assert_eq!(first, 50, "e (32) + the encrypted receive limit (2 + 16)");
    assert!(after.is_empty(), "sent after a failed handshake: {after:?}");
}
