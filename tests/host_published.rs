//! Published ports (issue 13) end to end: `relay serve` with `[[published]]` tables, a
//! device running `relay expose`, and plain TCP clients that run no terminal.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Short deadlines, so that the idle test below outlives the keep-alive timeout quickly.
const FAST: &str = "keepalive_interval = \"1s\"\nkeepalive_timeout = \"3s\"\nhandshake_timeout = \"2s\"\ndemand_timeout = \"5s\"";
const T: Duration = Duration::from_secs(20);

/// A `[[published]]` table.
fn published(port: u16, target: &str, service: &str, allow: &str) -> String {
    format!(
        "[[published]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"{target}\"\nservice = \"{service}\"\nallow = [{allow}]\n"
    )
}

/// GETs `path` from the metrics listener.
fn get(metrics: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Waits until `/metrics` has the line `line`.
fn wait_metric(metrics: u16, line: &str) {
    let deadline = Instant::now() + T;
    loop {
        let text = get(metrics, "/metrics");
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in:\n{text}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Connects to 127.0.0.1:`port` from source address `from`.
fn connect_from(from: &str, port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    s.connect(&dst.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Whether the relay closed `s` without a byte.
fn closed_at_once(mut s: TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0)) || s.read(&mut b).is_err()
}

#[test]
fn a_plain_tcp_client_reaches_an_exposed_service_through_a_published_port() {
    let (metrics, echo_port, web_port, ghost_port) =
        (free_port(), free_port(), free_port(), free_port());
    let top = format!(
        "metrics = \"127.0.0.1:{metrics}\"\n{}{}{}",
        published(echo_port, "cam", "echo", "\"127.0.0.1/32\""),
        published(web_port, "cam", "web", "\"127.0.0.0/8\", \"::1\""),
        published(ghost_port, "ghost", "", "\"127.0.0.0/8\""),
    );
    let relay = Relay::start_with(&top, FAST);
    let log = relay.proc().log();
    assert!(
        log.contains("PUBLISHED PORT") && log.contains("allow=127.0.0.1/32"),
        "each published port is logged loudly at start:\n{log}"
    );
    relay.add_user("cam");
    let echo = echo_service();
    let web = http_service("hello through a published port");
    let _cam = relay.expose(
        "cam",
        &[
            "--service",
            &format!("echo=127.0.0.1:{echo}"),
            "--service",
            &format!("web=127.0.0.1:{web}"),
        ],
    );

    // Byte-exact both ways, 2 MB, with a half-close at the end.
    let mut seed = 13;
    let mut data = vec![0u8; 2_000_000];
    fill(&mut data, &mut seed);
    assert!(round_trip(echo_port, &data) == data, "the echo differs");

    // HTTP with an ordinary client (the request as any HTTP client sends it).
    let mut s = TcpStream::connect(("127.0.0.1", web_port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello through a published port"),
        "{answer}"
    );

    // A session idle for longer than the keep-alive timeout stays up.
    let mut s = TcpStream::connect(("127.0.0.1", echo_port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 5];
    s.write_all(b"first").unwrap();
    s.read_exact(&mut b).unwrap();
    thread::sleep(Duration::from_secs(4));
    s.write_all(b"again").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"again");
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0, "the device's side ends too");

    // The sessions are the relay's, counted like any other.
    wait_metric(metrics, "relay_demands_total{outcome=\"accepted\"} 3");

    // A source outside the allow-list is closed at once and counted.
    let refused = connect_from("127.0.0.2", echo_port);
    assert!(closed_at_once(refused));
    wait_metric(metrics, "relay_published_refused_total 1");

    // A target that is not online: the client is closed, the demand counted.
    let s = TcpStream::connect(("127.0.0.1", ghost_port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    assert!(closed_at_once(s));
    wait_metric(metrics, "relay_demands_total{outcome=\"offline\"} 1");
    // The relay's sessions reach only the published ports' targets.
    let log = relay.proc().log();
    assert!(log.contains("from=@published to=cam"), "{log}");
}

#[test]
fn a_published_port_without_an_allow_list_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[[published]]\nlisten = \"127.0.0.1:1\"\ntarget = \"cam\"\nallow = []\n",
    )
    .unwrap();
    let out = std::process::Command::new(relay_bin())
        .arg("serve")
        .arg("--db")
        .arg(dir.path().join("relay.db"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("allow must list the source networks"), "{err}");
}

/// Retries `f` until it holds, within [`T`].
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {T:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_opens_and_closes_published_ports() {
    let (kept, added, removed) = (free_port(), free_port(), free_port());
    let any = "\"127.0.0.0/8\"";
    let before = format!(
        "{}{}",
        published(kept, "cam", "echo", any),
        published(removed, "cam", "echo", any)
    );
    let mut relay = Relay::start_with(&before, FAST);
    relay.add_user("cam");
    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    assert_eq!(round_trip(removed, b"old"), b"old");
    // A session on the port to be removed runs on after the reload.
    let mut running = TcpStream::connect(("127.0.0.1", removed)).unwrap();
    running.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 3];
    running.write_all(b"one").unwrap();
    running.read_exact(&mut b).unwrap();

    let after = format!(
        "{}{}\n[limits]\n{FAST}\n",
        published(kept, "cam", "echo", any),
        published(added, "cam", "echo", any)
    );
    relay.config = after;
    std::fs::write(relay.dir.path().join("relay.toml"), &relay.config).unwrap();
    relay.proc().signal("-HUP");

    eventually("the added port serves", || {
        TcpStream::connect(("127.0.0.1", added)).is_ok()
    });
    assert_eq!(round_trip(added, b"new"), b"new");
    eventually("the removed port is closed", || {
        TcpStream::connect(("127.0.0.1", removed)).is_err()
    });
    assert_eq!(round_trip(kept, b"kept"), b"kept");
    running.write_all(b"two").unwrap();
    running.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two", "the running session is untouched");
    relay.stop();
}
