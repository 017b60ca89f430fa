//! Issue 14 against the real `relay` binary on 127.0.0.1: one-shot commands that give up,
//! `expose` that says why it cannot connect once per reason, SIGHUP at an ssh logout and
//! SIGHUP as a reload, and logs in the right place.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const FAST: &str = "keepalive_interval = \"1s\"\nkeepalive_timeout = \"3s\"\nhandshake_timeout = \"10s\"\ndemand_timeout = \"5s\"";
const T: Duration = Duration::from_secs(20);

/// Runs `cmd` with stdin closed; kills it after `limit`. Returns (exit code, stderr, took).
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let mut p = Proc::spawn("one-shot", cmd);
    let mut code = None;
    while started.elapsed() < limit {
        if let Some(status) = p.child.try_wait().unwrap() {
            code = status.code();
            thread::sleep(Duration::from_millis(50));
            return (code, p.log(), started.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = p.child.kill();
    code.take();
    (None, p.log(), started.elapsed())
}

/// The lines a user sees, without the loud warning `--plain` always prints.
fn lines_but_plain_warning(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.contains("--plain: the password"))
        .collect()
}

/// Finding 1: `online` and `connect --stdio` against a closed port, TLS against the plain
/// port and `--plain` against the TLS port give up within the default time-out, with one
/// line and a non-zero exit (they retried forever).
#[test]
fn one_shot_commands_give_up_with_one_line() {
    let relay = Relay::start(FAST);
    relay.add_user("me");
    let closed = free_port();
    let fp = relay.fingerprint.clone();
    let tls_at = |port: u16, args: &[&str]| {
        let mut c = Command::new(relay_bin());
        c.arg(args[0])
            .args([
                "--server",
                &format!("127.0.0.1:{port}"),
                "--fingerprint",
                &fp,
            ])
            .args(["--user", "me"])
            .args(&args[1..])
            .env("RELAY_PASSWORD", PASSWORD);
        c
    };
    let plain_at = |port: u16, args: &[&str]| {
        let mut c = Command::new(relay_bin());
        c.arg(args[0])
            .args(["--server", &format!("127.0.0.1:{port}"), "--plain"])
            .args(["--user", "me"])
            .args(&args[1..])
            .env("RELAY_PASSWORD", PASSWORD);
        c
    };
    let stdio = ["connect", "cam/ssh", "--stdio"];
    let cases = [
        (
            "online, closed port",
            tls_at(closed, &["online"]),
            "refused",
        ),
        ("connect, closed port", tls_at(closed, &stdio), "refused"),
        (
            "TLS at the plain port",
            tls_at(relay.plain_port, &stdio),
            "TLS",
        ),
        (
            "--plain at the TLS port",
            plain_at(relay.tls_port, &["online"]),
            "--plain",
        ),
    ];
    for (what, cmd, needle) in cases {
        let (code, stderr, took) = run_bounded(cmd, Duration::from_secs(20));
        assert!(
            code.is_some(),
            "{what}: still running after {took:?}:\n{stderr}"
        );
        assert_ne!(code, Some(0), "{what}: exit 0");
        let lines = lines_but_plain_warning(&stderr);
        assert_eq!(lines.len(), 1, "{what}: not one line:\n{stderr}");
        assert!(
            lines[0].starts_with("relay: error: ") && lines[0].contains(needle),
            "{what}: {needle:?} not in {:?}",
            lines[0]
        );
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        eprintln!("{what} ({took:?}): {}", lines[0]);
    }
}

/// Finding 1: `expose` keeps retrying, and says why once per change of reason (it printed
/// the same warning at every attempt).
#[test]
fn expose_says_why_once_per_change_of_reason() {
    let port = free_port();
    let mut cmd = Command::new(relay_bin());
    cmd.args([
        "expose",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--plain",
    ])
    .args(["--user", "cam", "--service", "echo=127.0.0.1:9"])
    .env("RELAY_PASSWORD", PASSWORD);
    let p = Proc::spawn("expose", cmd);
    // Back-off starts at 0.5 s and doubles: by 4 s it has tried four times or more.
    thread::sleep(Duration::from_secs(4));
    assert_eq!(p.count("refused"), 1, "{}", p.log());
    // Something that accepts and hangs up at once: a new reason, said once.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let accepted = thread::spawn(move || {
        for s in listener.incoming().take(3) {
            drop(s);
        }
    });
    accepted.join().unwrap();
    p.wait_for("closed the connection", T);
    thread::sleep(Duration::from_secs(1));
    assert_eq!(p.count("closed the connection"), 1, "{}", p.log());
    assert_eq!(p.count("refused"), 1, "{}", p.log());
}

/// Finding 4: ssh sends SIGHUP to its ProxyCommand at every logout. `connect --stdio`
/// ends the session cleanly and exits 0 (it died with 129; the relay logged PeerLost).
#[test]
fn sighup_at_an_ssh_logout_ends_the_session_cleanly() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("laptop");
    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let direct = relay.terminal("laptop", &["connect", "cam/echo", "--stdio"]);
    // Through `sh -c exec` so that Proc keeps standard input (the pid stays the relay's).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\" \"$@\"")
        .arg(direct.get_program());
    cmd.args(direct.get_args()).env("RELAY_PASSWORD", PASSWORD);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut p = Proc::spawn("connect --stdio", cmd);
    let mut stdin = p.child.stdin.take().unwrap();
    let mut stdout = p.child.stdout.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    relay.proc().wait_for("session started", T);

    p.signal("-HUP");
    let (ok, log) = p.wait_exit(T);
    assert!(ok, "connect --stdio did not exit 0 on SIGHUP:\n{log}");
    relay.proc().wait_for("session ended", T);
    let relay_log = relay.proc().log();
    assert!(
        !relay_log.contains("PeerLost"),
        "the relay saw a lost peer:\n{relay_log}"
    );
    // Finding 5: nothing but errors goes into an ssh session's terminal.
    assert_eq!(log, "", "connect --stdio wrote to stderr");
    drop(stdin);
}

/// Finding 5: logs name peers plainly, `expose` says what it exposes, `-q` silences INFO,
/// `-v` shows DEBUG.
#[test]
fn logs_are_plain_and_the_levels_follow_q_and_v() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    let echo = echo_service();
    let svc = format!("echo=127.0.0.1:{echo}");
    let cam = relay.expose("cam", &["--service", &svc]);
    // `online --json`, and nothing on standard error by default.
    let online = relay
        .terminal("cam", &["online", "--json"])
        .output()
        .unwrap();
    assert!(online.status.success());
    assert_eq!(String::from_utf8_lossy(&online.stdout), "[\"cam\"]\n");
    assert_eq!(String::from_utf8_lossy(&online.stderr), "");
    assert!(
        cam.log().contains(&svc),
        "services not logged:\n{}",
        cam.log()
    );
    relay.proc().wait_for("login", T);
    let relay_log = relay.proc().log();
    assert!(relay_log.contains("peer=127.0.0.1:"), "{relay_log}");
    assert!(!relay_log.contains("Some("), "{relay_log}");
    drop(cam);

    let before = relay.proc().count("user=cam");
    let q = Proc::spawn(
        "expose -q",
        relay.terminal("cam", &["expose", "-q", "--service", &svc]),
    );
    relay.proc().wait_for_n("user=cam", before + 1, T);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(q.log(), "", "expose -q logged");
    drop(q);
    let v = Proc::spawn(
        "expose -v",
        relay.terminal("cam", &["expose", "-v", "--service", &svc]),
    );
    v.wait_for("DEBUG", T);
}

/// Finding 5: a certificate nobody vouches for is one line that says how to pin it.
#[test]
fn an_unknown_issuer_is_one_line_with_the_pinning_hint() {
    let relay = Relay::start(FAST);
    relay.add_user("me");
    // A CA that did not sign the relay's certificate: another generated one.
    let other = tempfile::tempdir().unwrap();
    relay_host::tls::ServerIdentity::load_or_generate(&other.path().join("x.db")).unwrap();
    let mut cmd = Command::new(relay_bin());
    cmd.args([
        "online",
        "--server",
        &format!("127.0.0.1:{}", relay.tls_port),
    ])
    .arg("--ca")
    .arg(other.path().join("x-cert.pem"))
    .args(["--user", "me"])
    .env("RELAY_PASSWORD", PASSWORD);
    let (code, stderr, _) = run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--fingerprint"), "{stderr}");
}

/// Finding 4: SIGHUP makes `relay serve` reload its config: a new certificate for new
/// connections, new limits, the change logged; running sessions go on (it died with 129).
#[test]
fn sighup_reloads_the_config_and_keeps_sessions() {
    let keys = tempfile::tempdir().unwrap();
    let (a, _) =
        relay_host::tls::ServerIdentity::load_or_generate(&keys.path().join("a.db")).unwrap();
    let (b, _) =
        relay_host::tls::ServerIdentity::load_or_generate(&keys.path().join("b.db")).unwrap();
    let pem = |n: &str| keys.path().join(n).display().to_string();
    let top = format!(
        "cert = {:?}\nkey = {:?}",
        pem("a-cert.pem"),
        pem("a-key.pem")
    );
    let relay = Relay::start_with(&top, FAST);
    assert_eq!(relay.fingerprint, a.fingerprint().to_string());
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (_fwd, port) = relay.forward("me", "cam/echo");
    let mut session = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 4];
    session.write_all(b"one\n").unwrap();
    session.read_exact(&mut buf).unwrap();

    let top = format!(
        "cert = {:?}\nkey = {:?}",
        pem("b-cert.pem"),
        pem("b-key.pem")
    );
    let config = format!("{top}\n[limits]\n{FAST}\nlogin_failures_per_source_per_minute = 7\n");
    std::fs::write(relay.dir.path().join("relay.toml"), config).unwrap();
    relay.proc().signal("-HUP");
    relay.proc().wait_for("reloaded", T);
    let log = relay.proc().log();
    assert!(
        log.contains("cert") && log.contains("login_failures_per_source_per_minute"),
        "{log}"
    );

    session.write_all(b"two\n").unwrap();
    session.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two\n");
    let online = |fp: String| {
        let mut c = Command::new(relay_bin());
        c.args([
            "online",
            "--server",
            &format!("127.0.0.1:{}", relay.tls_port),
        ])
        .args(["--fingerprint", &fp, "--user", "me"])
        .env("RELAY_PASSWORD", PASSWORD)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
    };
    let new = online(b.fingerprint().to_string());
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    let old = online(a.fingerprint().to_string());
    assert!(String::from_utf8_lossy(&old.stderr).contains("fingerprint mismatch"));
}

/// Item 4: with the relay named in the client config, `relay connect cam-1/ssh --stdio`
/// needs no flags, and QUICKSTART's `Host *.relay` block makes `ssh USER@cam-1.relay` work.
#[test]
fn client_config_and_the_ssh_config_block() {
    let sshd = Sshd::start().expect("sshd and ssh (apt-get install openssh-server openssh-client)");
    let relay = Relay::start(FAST);
    relay.add_user("cam-1");
    relay.add_user("laptop");
    let _cam = relay.expose(
        "cam-1",
        &["--service", &format!("ssh=127.0.0.1:{}", sshd.port)],
    );
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("relay/relays.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "[relays.test]\nserver = \"127.0.0.1:{}\"\nfingerprint = \"{}\"\nuser = \"laptop\"\n\
             password_command = \"echo '{PASSWORD}'\"\n",
            relay.tls_port, relay.fingerprint
        ),
    )
    .unwrap();

    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/QUICKSTART.md"),
    )
    .unwrap();
    let start = doc.find("Host *.relay").expect("the ssh config block");
    let block = &doc[start..start + doc[start..].find("```").unwrap()];
    let ssh_config = home.path().join("ssh_config");
    std::fs::write(&ssh_config, block).unwrap();
    let bin_dir = relay_bin().parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = sshd
        .client()
        .arg("-F")
        .arg(&ssh_config)
        .arg(format!("{}@cam-1.relay", sshd.user))
        .arg("echo through-the-relay-config")
        .env("XDG_CONFIG_HOME", home.path())
        .env("PATH", path)
        .env_remove("RELAY_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("through-the-relay-config"),
        "ssh failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP/1.1 request to the admin listener; the whole answer.
fn admin_http(port: u16, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("admin listener");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The dashboard's form action that starts with `prefix` (`/kick?user=cam-1`), once the
/// page shows it, `&amp;` undone.
fn dashboard_action(port: u16, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let page = admin_http(port, "GET", "/");
        let found = page.split("action=\"").skip(1).find_map(|rest| {
            let action = rest.split('"').next()?.replace("&amp;", "&");
            action.starts_with(prefix).then_some(action)
        });
        if let Some(action) = found {
            return action;
        }
        assert!(start.elapsed() < T, "no {prefix} on the page:\n{page}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 14's dashboard: a kick closes the device's connections with ERROR `Kicked`, which
/// the device shows as such (it was told "account removed by the operator", and stopped
/// for good), and, its account being intact, it logs in again after its back-off.
#[test]
fn a_kicked_device_is_told_so_and_comes_back() {
    let admin = free_port();
    let relay = Relay::start_with(&format!("metrics = \"127.0.0.1:{admin}\""), FAST);
    relay.add_user("cam-1");
    let echo = echo_service();
    let cam = relay.expose("cam-1", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let kick = dashboard_action(admin, "/kick?user=cam-1");
    let answer = admin_http(admin, "POST", &kick);
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    cam.wait_for("connections closed by the operator", T);
    assert_eq!(cam.count("account removed"), 0, "{}", cam.log());
    relay.proc().wait_for_n("kicked from the dashboard", 1, T);
    dashboard_action(admin, "/kick?user=cam-1");
}

/// Issue 14's dashboard: a running session's row counts its bytes, and *end* on it ends
/// that session only. The laptop's
/// local connection closes, both sides are told why, and both stay logged in (the device
/// is still on the page, a new session works).
#[test]
fn the_dashboard_ends_one_session() {
    let admin = free_port();
    let relay = Relay::start_with(&format!("metrics = \"127.0.0.1:{admin}\""), FAST);
    relay.add_user("cam-1");
    relay.add_user("laptop");
    let echo = echo_service();
    let cam = relay.expose("cam-1", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (forward, local) = relay.forward("laptop", "cam-1/echo");
    let mut session = TcpStream::connect(("127.0.0.1", local)).unwrap();
    session.write_all(b"hi").unwrap();
    session.read_exact(&mut [0u8; 2]).unwrap();

    // The page counts the session's bytes (as of its last reload).
    let start = Instant::now();
    while !admin_http(admin, "GET", "/").contains("<td class=up>2</td><td class=down>2</td>") {
        assert!(start.elapsed() < T, "no byte counts on the page");
        thread::sleep(Duration::from_millis(100));
    }
    let end = dashboard_action(admin, "/end?session=");
    let answer = admin_http(admin, "POST", &end);
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    relay.proc().wait_for("session ended from the dashboard", T);
    session.set_read_timeout(Some(T)).expect("a read deadline");
    assert_eq!(
        session.read(&mut [0u8; 1]).unwrap(),
        0,
        "the local side closes"
    );
    forward.wait_for("the relay's operator ended the session", T);
    cam.wait_for("reason=EndedByOperator", T);
    // Only the session went: the device is still there and takes a new one.
    dashboard_action(admin, "/kick?user=cam-1");
    assert_eq!(round_trip(local, b"again"), b"again");
    assert_eq!(cam.count("closed a connection"), 0, "{}", cam.log());
}
