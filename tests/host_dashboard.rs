//! The operator dashboard in a real browser: headless Chromium driven through
//! chromedriver's WebDriver HTTP API logs nothing in itself, sees a logged-in terminal on
//! the page, ends its session and kicks it with the page's buttons, sees them go (the
//! device told why), and saves a screenshot as docs/dashboard.png.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::*;

const T: Duration = Duration::from_secs(30);

/// One WebDriver command: (HTTP status, JSON answer).
fn webdriver(port: u16, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("chromedriver");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("an HTTP answer");
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Polls until `f` gives a value (the page reloads itself every two seconds).
fn eventually<V>(what: &str, mut f: impl FnMut() -> Option<V>) -> V {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < T, "{what}: not within {T:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kick_a_terminal_from_the_dashboard_in_chromium() {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromedriver (apt-get install chromium chromium-driver; .ci/install does)");
    let admin = free_port();
    let relay = Relay::start_with(
        &format!("metrics = \"127.0.0.1:{admin}\""),
        "handshake_timeout = \"10s\"",
    );
    relay.add_user("cam-1");
    let echo = echo_service();
    let cam = relay.expose("cam-1", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    // A running session and a failed login, for the page to show.
    relay.add_user("laptop");
    let (_forward, local) = relay.forward("laptop", "cam-1/echo");
    let mut session = TcpStream::connect(("127.0.0.1", local)).unwrap();
    session.write_all(b"hi").unwrap();
    session.read_exact(&mut [0u8; 2]).unwrap();
    let mut wrong = relay.terminal("mallory", &["online"]);
    assert!(!wrong.output().unwrap().status.success());

    let port = free_port();
    let mut cmd = Command::new(driver);
    cmd.arg(format!("--port={port}"));
    let _driver = Proc::spawn("chromedriver", cmd);
    eventually("chromedriver listening", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let profile = tempfile::tempdir().unwrap();
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,700",
        &format!("--user-data-dir={}", profile.path().display()),
    ];
    let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": args}}}});
    let (status, answer) = webdriver(port, "POST", "/session", Some(caps));
    assert_eq!(status, 200, "{answer}");
    let session = answer["value"]["sessionId"].as_str().unwrap().to_owned();
    let at = |p: &str| format!("/session/{session}{p}");
    let url = json!({"url": format!("http://127.0.0.1:{admin}/")});
    assert_eq!(webdriver(port, "POST", &at("/url"), Some(url)).0, 200);

    let find = |css: &str| {
        let (status, v) = webdriver(
            port,
            "POST",
            &at("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        (status == 200).then(|| {
            v["value"]
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
    };
    eventually("cam-1 on the page", || find("#kick-cam-1"));
    eventually("the session and the failed login on the page", || {
        find("#sessions tr + tr").and(find("#failures tr + tr"))
    });
    let (_, shot) = webdriver(port, "GET", &at("/screenshot"), None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["value"].as_str().unwrap())
        .unwrap();
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
    std::fs::write(docs, png).unwrap();

    let click = |button: &str| {
        let click = webdriver(
            port,
            "POST",
            &at(&format!("/element/{button}/click")),
            Some(json!({})),
        );
        assert_eq!(click.0, 200, "{}", click.1);
    };
    let end = find("#sessions button").expect("an end button");
    click(&end);
    relay.proc().wait_for("session ended from the dashboard", T);
    eventually("the session gone from the page", || {
        find("#sessions tr + tr").is_none().then_some(())
    });
    let button = eventually("cam-1 still on the page", || find("#kick-cam-1"));
    click(&button);
    relay.proc().wait_for("kicked from the dashboard", T);
    eventually("cam-1 gone from the page", || {
        find("#terminal-cam-1").is_none().then_some(())
    });
    cam.wait_for("connections closed by the operator", T);
    webdriver(port, "DELETE", &at(""), None);
}
