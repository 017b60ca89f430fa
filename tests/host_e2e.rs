//! End-to-end tests of the `relay` binary on 127.0.0.1: the relay server, exposing
//! terminals and requesting terminals as separate processes, real TCP and TLS.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Short deadlines so failures show within seconds.
const FAST: &str = "keepalive_interval = \"1s\"\nkeepalive_timeout = \"3s\"\nhandshake_timeout = \"2s\"\ndemand_timeout = \"5s\"\nmax_connections_per_account = 32\nmax_sessions_per_account = 30";
const T: Duration = Duration::from_secs(20);

#[test]
fn http_through_the_relay_with_curl() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let web = http_service("hello through the relay\n");
    let _cam = relay.expose("cam", &["--service", &format!("web=127.0.0.1:{web}")]);
    let (_me, port) = relay.forward("me", "cam/web");
    let Some((ok, out)) = curl(&format!("http://127.0.0.1:{port}/")) else {
        return;
    };
    assert!(ok, "curl failed: {out}");
    assert_eq!(out, "hello through the relay\n");
    // The relay logged the session with its byte counts.
    relay
        .proc()
        .wait_for("session ended", Duration::from_secs(10));
    let log = relay.proc().log();
    assert!(log.contains("session started"), "{log}");
    assert!(!log.contains(PASSWORD), "the relay logged a password");
}

#[test]
fn transfer_200_mb_with_matching_checksums() {
    let relay = Relay::start(FAST);
    relay.add_user("store");
    relay.add_user("up");
    let svc = checksum_service();
    let _store = relay.expose("store", &["--service", &format!("sum=127.0.0.1:{svc}")]);
    let (_up, port) = relay.forward("up", "store/sum");
    let total: usize = 200 * 1024 * 1024;
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut sum = Checksum::default();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0;
        while sent < total {
            fill(&mut buf, &mut seed);
            w.write_all(&buf).unwrap();
            sum.update(&buf);
            sent += buf.len();
        }
        w.shutdown(Shutdown::Write).unwrap();
        format!("{} {:016x}", sum.len, sum.value())
    });
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let local = sender.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "200 MiB through the relay (TLS both legs) in {secs:.1}s: {:.0} MiB/s",
        200.0 / secs
    );
    assert_eq!(answer.trim(), local, "checksums differ");
}

#[test]
fn fifty_concurrent_sessions() {
    fifty_sessions(Relay::start(FAST));
}

/// `worker_threads = 1`: the whole relay on tokio's current-thread scheduler (issue 13).
#[test]
fn fifty_concurrent_sessions_on_one_worker_thread() {
    fifty_sessions(Relay::start_with("worker_threads = 1", FAST));
}

/// `worker_threads = 3`: connections dealt to three current-thread runtimes (the main
/// thread and `relay-worker-1`, `-2`), so most sessions join connections on different
/// threads (relay-host/src/workers.rs).
#[test]
fn fifty_concurrent_sessions_across_three_worker_threads() {
    let relay = Relay::start_with("worker_threads = 3", FAST);
    let pid = relay.proc().child.id();
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    for worker in ["relay-worker-1", "relay-worker-2"] {
        assert!(
            names.iter().any(|n| n == worker),
            "no {worker} in {names:?}"
        );
    }
    fifty_sessions(relay);
}

/// RssAnon of process `pid`, KiB (/proc/PID/status).
fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Polls `f` every 20 ms until it holds or `deadline` passes; whether it held.
fn within(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Issue 13, memory at 1,000 req/s: a login's 19 MiB of argon2 memory stays in relay
/// serve for the logins that follow it, then goes back to the system within seconds, not
/// a minute (it was 19 of the relay's 30 MiB in the bench, seconds after one login).
#[test]
fn a_logins_password_memory_goes_back_within_seconds() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    let pid = relay.proc().child.id();
    let base = rss_anon_kib(pid);
    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    assert!(
        within(T, || rss_anon_kib(pid) >= base + 16 * 1024),
        "the login's argon2 memory (19 MiB) was never seen: {} KiB from {base} KiB",
        rss_anon_kib(pid)
    );
    assert!(
        within(Duration::from_secs(10), || rss_anon_kib(pid)
            <= base + 8 * 1024),
        "still {} KiB of RssAnon 10 s after the login (from {base} KiB)",
        rss_anon_kib(pid)
    );
}

/// 50 sessions at once through `relay`, to two exposing terminals from four requesters.
fn fifty_sessions(relay: Relay) {
    let echo = echo_service();
    let svc = format!("echo=127.0.0.1:{echo}");
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for (i, target) in ["echo-a", "echo-b"].into_iter().enumerate() {
        relay.add_user(target);
        procs.push(relay.expose(target, &["--service", &svc, "--spare", "8"]));
        for j in 0..2 {
            let me = format!("req-{i}-{j}");
            relay.add_user(&me);
            let (p, port) = relay.forward(&me, &format!("{target}/echo"));
            procs.push(p);
            ports.push(port);
        }
    }
    // 50 sessions, all open at once: each sends, waits for its echo, then waits for all.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|k| {
            let port = ports[k % ports.len()];
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut seed = 1 + k as u64;
                let mut data = vec![0u8; 64 * 1024];
                fill(&mut data, &mut seed);
                s.write_all(&data).unwrap();
                let mut back = vec![0u8; data.len()];
                let r = s.read_exact(&mut back);
                barrier.wait();
                r.unwrap();
                assert_eq!(back, data, "session {k} echoed something else");
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
        })
        .collect();
    let failed = threads.into_iter().filter_map(|t| t.join().err()).count();
    if failed > 0 {
        for p in &procs {
            eprintln!("---- terminal log\n{}", p.log());
        }
        panic!(
            "{failed} sessions failed; relay log:\n{}",
            relay.proc().log()
        );
    }
    let log = relay.proc().log();
    assert!(log.matches("session started").count() >= 50, "{log}");
}

/// Runs `relay connect --stdio` with an empty stdin; returns (success, stderr).
fn stdio_attempt(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_error(what: &str, mut cmd: Command, needle: &str) {
    let started = Instant::now();
    let (ok, err) = stdio_attempt(&mut cmd);
    assert!(!ok, "{what}: succeeded");
    let last = err.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("relay: error:") && last.contains(needle),
        "{what}: expected one clear line with {needle:?}, got:\n{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "{what}: slow");
    eprintln!("{what}: {last}");
}

#[test]
fn each_failure_has_its_own_clear_error() {
    let relay = Relay::start(FAST);
    for u in ["cam", "me", "idle", "locked", "picky"] {
        relay.add_user(u);
    }
    let echo = echo_service();
    let svc = format!("echo=127.0.0.1:{echo}");
    let _cam = relay.expose("cam", &["--service", &svc]);
    let _picky = relay.expose("picky", &["--service", &svc, "--allow", "cam"]);
    relay.user_cmd(&["allow", "locked", "--targets", "idle"]);

    let mut wrong = relay.terminal("me", &["connect", "cam/echo", "--stdio"]);
    wrong.env("RELAY_PASSWORD", "not the password");
    expect_error("wrong password", wrong, "wrong user ID or password");
    expect_error(
        "unknown user",
        relay.terminal("nobody", &["connect", "cam/echo", "--stdio"]),
        "wrong user ID or password",
    );
    expect_error(
        "unknown target",
        relay.terminal("me", &["connect", "ghost/echo", "--stdio"]),
        "target is not logged in",
    );
    expect_error(
        "target offline",
        relay.terminal("me", &["connect", "idle/echo", "--stdio"]),
        "target is not logged in",
    );
    expect_error(
        "access rule forbids",
        relay.terminal("locked", &["connect", "cam/echo", "--stdio"]),
        "access rule forbids",
    );
    expect_error(
        "rejected demand",
        relay.terminal("me", &["connect", "picky/echo", "--stdio"]),
        "target rejected the demand: requester not allowed",
    );
    expect_error(
        "unknown service",
        relay.terminal("me", &["connect", "cam/nope", "--stdio"]),
        "target rejected the demand: no such service",
    );
    let mut pinned = relay.terminal("me", &["connect", "cam/echo", "--stdio"]);
    let bad = format!(
        "{}{}",
        if relay.fingerprint.starts_with("00") {
            "11"
        } else {
            "00"
        },
        &relay.fingerprint[2..]
    );
    pinned.args(["--fingerprint", &bad]);
    // clap takes the last --fingerprint: rebuild the command with only the bad one.
    let mut cmd = Command::new(relay_bin());
    cmd.args(["connect", "--server"])
        .arg(format!("127.0.0.1:{}", relay.tls_port))
        .args(["--fingerprint", &bad, "--user", "me", "cam/echo", "--stdio"])
        .env("RELAY_PASSWORD", PASSWORD);
    drop(pinned);
    expect_error("TLS fingerprint mismatch", cmd, "fingerprint mismatch");
    // And the failures never leaked a password into the relay's log.
    assert!(!relay.proc().log().contains(PASSWORD));
}

#[test]
fn ssh_through_the_relay() {
    let Some(sshd) = Sshd::start() else {
        eprintln!(
            "!!! SKIPPED ssh_through_the_relay: sshd/ssh not installed (apt-get install openssh-server openssh-client)"
        );
        return;
    };
    let relay = Relay::start(FAST);
    relay.add_user("cam-1");
    relay.add_user("laptop");
    let _cam = relay.expose(
        "cam-1",
        &["--service", &format!("ssh=127.0.0.1:{}", sshd.port)],
    );
    let proxy = format!(
        "{} connect --server 127.0.0.1:{} --fingerprint {} --user laptop --stdio cam-1/ssh",
        relay_bin().display(),
        relay.tls_port,
        relay.fingerprint
    );
    let out = sshd
        .client()
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .arg(format!("{}@cam-1", sshd.user))
        .arg("echo ssh-through-relay-ok; uname -s")
        .env("RELAY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ssh-through-relay-ok"),
        "ssh failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_9_of_the_exposing_terminal_ends_the_session_with_an_error() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let mut cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (me, port) = relay.forward("me", "cam/echo");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    let killed = Instant::now();
    cam.child.kill().unwrap(); // SIGKILL
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = killed.elapsed();
    me.wait_for("session to cam ended", Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(4),
        "the requester's session outlived the keep-alive deadline (3s): {took:?}"
    );
    let log = me.log();
    assert!(log.contains("ERROR"), "{log}");
    eprintln!("session ended {took:?} after kill -9");
}

#[test]
fn relay_restart_terminals_come_back_and_new_sessions_work() {
    let mut relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (me, port) = relay.forward("me", "cam/echo");
    assert_eq!(round_trip(port, b"before"), b"before");
    relay.stop();
    cam.wait_for("lost the relay", T);
    relay.launch();
    cam.wait_for_n("logged in to the relay", 2, T);
    me.wait_for_n("logged in to the relay", 2, T);
    // Extra connections used the resumption credential, not argon2.
    relay.proc().wait_for("resumed=true", T);
    // Under a loaded machine the first demand may still race the pool's refill: allow a
    // few tries, and show the requester's log if none works.
    let ok = (0..5).any(|_| {
        let back = round_trip(port, b"after restart");
        back == b"after restart" || {
            thread::sleep(Duration::from_secs(1));
            false
        }
    });
    assert!(ok, "no session after the restart:\n{}", me.log());
}

#[test]
fn a_restarted_device_replaces_its_old_instance_at_once() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let old_svc = http_service("old\n");
    let new_svc = http_service("new\n");
    let mut old = relay.expose("cam", &["--service", &format!("web=127.0.0.1:{old_svc}")]);
    let (_me, port) = relay.forward("me", "cam/web");
    let started = Instant::now();
    let _new = relay.expose("cam", &["--service", &format!("web=127.0.0.1:{new_svc}")]);
    let (ok, log) = old.wait_exit(T);
    assert!(!ok && log.contains("replaced"), "{log}");
    let Some((ok, out)) = curl(&format!("http://127.0.0.1:{port}/")) else {
        return;
    };
    assert!(ok && out == "new\n", "{out}");
    eprintln!("replaced and reachable in {:?}", started.elapsed());
}

#[test]
fn hostile_clients_are_closed_and_a_session_alongside_is_undisturbed() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let svc = checksum_service();
    let _cam = relay.expose("cam", &["--service", &format!("sum=127.0.0.1:{svc}")]);
    let (_me, port) = relay.forward("me", "cam/sum");
    // A session streams 30 MiB while the hostile clients come and go.
    let session = thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut sum = Checksum::default();
        let mut seed = 7u64;
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..480 {
            fill(&mut buf, &mut seed);
            s.write_all(&buf).unwrap();
            sum.update(&buf);
            thread::sleep(Duration::from_millis(5));
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(
            answer.trim(),
            format!("{} {:016x}", sum.len, sum.value()),
            "the session alongside was disturbed"
        );
    });
    let plain = relay.plain_port;
    let closed_within = |mut s: TcpStream, limit: Duration| {
        let start = Instant::now();
        s.set_read_timeout(Some(limit + Duration::from_secs(2)))
            .unwrap();
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok() || start.elapsed() < limit,
            "not closed within {limit:?}: {r:?}"
        );
        start.elapsed()
    };
    // Garbage bytes: an unknown frame type.
    let mut g = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    g.write_all(&[0xEE; 64]).unwrap();
    let t = closed_within(g, Duration::from_secs(1));
    eprintln!("garbage: closed after {t:?}");
    // An oversize length prefix on a control frame (LOGIN, 65,535 bytes).
    let mut o = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    o.write_all(&[0x01, 0xFF, 0xFF, 0, 0, 0]).unwrap();
    let t = closed_within(o, Duration::from_secs(1));
    eprintln!("oversize length: closed after {t:?}");
    // Never logs in: closed at the handshake deadline (2s).
    let n = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    let t = closed_within(n, Duration::from_secs(3));
    assert!(t >= Duration::from_millis(1500), "closed too early: {t:?}");
    eprintln!("never logs in: closed after {t:?}");
    // 1,000 connections that open and stall (half plain, half TLS without a handshake).
    let start = Instant::now();
    let stalled: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let p = if i % 2 == 0 { plain } else { relay.tls_port };
            TcpStream::connect(("127.0.0.1", p)).unwrap()
        })
        .collect();
    for s in stalled {
        let left = Duration::from_secs(5).saturating_sub(start.elapsed());
        closed_within(s, left.max(Duration::from_millis(100)));
    }
    eprintln!(
        "1,000 stalled connections closed after {:?}",
        start.elapsed()
    );
    session.join().expect("session alongside");
}

#[test]
fn online_lists_logged_in_terminals() {
    let relay = Relay::start(FAST);
    for u in ["cam", "me", "zed"] {
        relay.add_user(u);
    }
    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let _zed = relay.expose("zed", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    // `online` logs in as a requester: it lists the reachable terminals, not itself.
    assert_eq!(relay.online_list("me"), ["cam", "zed"]);
}

/// The splice(2) path (`relay serve --splice`, plain TCP on both legs): 64 MiB with
/// checksums matched on both ends, so bytes moved socket to pipe to socket arrive whole
/// and in order between DATA headers.
#[test]
fn splice_path_transfers_with_matching_checksums() {
    let mut relay = Relay::start(FAST);
    let toml = relay.dir.path().join("relay.toml");
    std::fs::write(&toml, format!("splice = true\n{}", relay.config)).unwrap();
    relay.proc = None;
    relay.launch();
    relay.add_user("store");
    relay.add_user("up");
    let svc = checksum_service();
    let service = format!("sum=127.0.0.1:{svc}");
    let store = Proc::spawn(
        "expose store",
        relay.terminal_plain("store", &["expose", "--service", &service]),
    );
    store.wait_for("logged in to the relay", Duration::from_secs(20));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let up = Proc::spawn(
        "connect up",
        relay.terminal_plain("up", &["connect", "store/sum", "--listen", &listen]),
    );
    up.wait_for("forwarding local connections", Duration::from_secs(20));
    let total: usize = 64 * 1024 * 1024;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut sum = Checksum::default();
        let mut seed = 0x0fed_cba9_8765_4321u64;
        // Odd sizes: frame boundaries fall anywhere in the pipe's pages.
        let mut buf = vec![0u8; 100_003];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            fill(&mut buf[..n], &mut seed);
            w.write_all(&buf[..n]).unwrap();
            sum.update(&buf[..n]);
            sent += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
        format!("{} {:016x}", sum.len, sum.value())
    });
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let local = sender.join().unwrap();
    assert_eq!(answer.trim(), local, "checksums differ");
}

/// `relay user del` while the relay runs: the account's connections close at once (its
/// session ends on the requester's side), its terminal is told why and stops, and it
/// cannot log in again.
#[test]
fn deleting_an_account_closes_its_connections_at_once() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let mut cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (_me, port) = relay.forward("me", "cam/echo");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");

    let deleted = Instant::now();
    relay.user_cmd(&["del", "cam"]);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = deleted.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the deleted account's session lasted {took:?}"
    );
    let (ok, log) = cam.wait_exit(Duration::from_secs(10));
    assert!(!ok, "the removed terminal stops with an error:\n{log}");
    assert!(log.contains("account removed"), "{log}");
    relay.proc().wait_for("offline", Duration::from_secs(5));
    // The account is gone for good: a new login is refused.
    let out = relay.terminal("cam", &["online"]).output().unwrap();
    assert!(!out.status.success());
    eprintln!("session closed {took:?} after relay user del");
}

/// `--metrics` (here the config file's `metrics` key) serves Prometheus text whose
/// counters follow what happened, and `/healthz`.
#[test]
fn metrics_and_healthz_follow_the_traffic() {
    let metrics = free_port();
    let relay = Relay::start_with(&format!("metrics = \"127.0.0.1:{metrics}\""), FAST);
    for u in ["cam", "me", "ops"] {
        relay.add_user(u);
    }
    let get = |path: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let health = get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let echo = echo_service();
    let _cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (_me, port) = relay.forward("me", "cam/echo");
    let data = vec![7u8; 100_000];
    assert_eq!(round_trip(port, &data), data);
    expect_error(
        "unknown target",
        relay.terminal("ops", &["connect", "ghost", "--stdio"]),
        "not logged in",
    );
    let bad = relay
        .terminal("cam", &["online"])
        .env("RELAY_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // ops's connections close as its process exits: wait for the relay to see it.
    let mut text = get("/metrics");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.contains("relay_logged_in_terminals 2\n") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        text = get("/metrics");
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{text}"))
    };
    assert!(value("relay_connections ") >= 4.0, "{text}");
    assert_eq!(value("relay_logged_in_terminals "), 2.0, "{text}");
    // Both directions of the echo, payload only.
    assert!(value("relay_relayed_bytes_total ") >= 200_000.0, "{text}");
    // cam, me and ops; ops has gone.
    assert!(value("relay_logins_total{method=\"password\",outcome=\"ok\"} ") >= 3.0);
    assert!(value("relay_logins_total{method=\"password\",outcome=\"failed\"} ") >= 1.0);
    assert!(value("relay_logins_total{method=\"resumption\",outcome=\"ok\"} ") >= 2.0);
    assert_eq!(
        value("relay_demands_total{outcome=\"accepted\"} "),
        1.0,
        "{text}"
    );
    assert_eq!(
        value("relay_demands_total{outcome=\"offline\"} "),
        1.0,
        "{text}"
    );
}

/// Issue 10, finding 1: one account, many processes. A device runs `relay expose`; with
/// the same account two `relay connect --listen` forwards and `relay online` run at
/// once, and `relay online` with the device's own user ID too. Requesters replace no
/// instance: every process stays up and both forwards carry sessions at the same time.
#[test]
fn requesters_of_one_account_run_side_by_side_and_replace_nothing() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let mut cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (mut first, p1) = relay.forward("me", "cam/echo");
    let (mut second, p2) = relay.forward("me", "cam/echo");
    for user in ["me", "cam"] {
        let out = relay
            .terminal(user, &["online"])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && listed.lines().any(|l| l == "cam"),
            "online as {user}: {listed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sessions: Vec<_> = [
        (p1, b"through the first".to_vec()),
        (p2, b"and the second".to_vec()),
    ]
    .into_iter()
    .map(|(port, data)| thread::spawn(move || (round_trip(port, &data), data)))
    .collect();
    for s in sessions {
        let (got, sent) = s.join().unwrap();
        assert_eq!(got, sent);
    }
    for p in [&mut cam, &mut first, &mut second] {
        let exited = p.child.try_wait().unwrap();
        assert!(exited.is_none(), "{} exited: {}", p.name, p.log());
    }
}

/// A refused session closes its local connection at once, and the forward goes on: found
/// when merging protocol core v2 (a failed demand leaves its connection idle, and the
/// local end parked on it stayed open, so `curl` through `connect --listen` hung).
#[test]
fn a_refused_session_closes_its_local_connection_and_the_next_one_is_served() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let dead = free_port(); // nothing listens there: the device answers ServiceUnavailable
    let _cam = relay.expose("cam", &["--service", &format!("web=127.0.0.1:{dead}")]);
    let (fwd, port) = relay.forward("me", "cam/web");
    for attempt in 1..=2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("attempt {attempt}: not closed: {e}; log:\n{}", fwd.log()));
        assert_eq!(n, 0, "attempt {attempt}: EOF, no bytes");
        fwd.wait_for_n("service unavailable", attempt, Duration::from_secs(10));
    }
}

/// A local connection made while the forward is reconnecting waits for the relay to come
/// back and is served then (the demand holds a connection slot until the reconnect's
/// login: relay-proto's terminal decides it, relay-host only runs the driver).
///
/// The forward reaches the relay through a [`Gate`] that opens only once the device is
/// back: a forward that logs in first is answered TargetOffline, which the protocol allows
/// (seen in CI when both raced), and is not what this test is about.
#[test]
fn a_forward_used_while_the_relay_restarts_is_served_once_it_is_back() {
    let mut relay = Relay::start(FAST);
    relay.add_user("cam");
    relay.add_user("me");
    let echo = echo_service();
    let cam = relay.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let gate = Gate::new(relay.tls_port);
    let port = free_port();
    let mut cmd = relay.terminal("me", &["connect", "cam/echo"]);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    let me = Proc::spawn("connect me", with_server(cmd, gate.port));
    me.wait_for("forwarding local connections", T);
    assert_eq!(round_trip(port, b"before"), b"before");
    gate.close();
    relay.stop();
    me.wait_for("lost the relay", T);
    let during = thread::spawn(move || round_trip(port, b"during the restart"));
    relay.launch();
    cam.wait_for_n("logged in to the relay", 2, T);
    gate.open();
    let back = during.join().unwrap();
    assert_eq!(back, b"during the restart", "log:\n{}", me.log());
}

/// `cmd` (a terminal command) with its `--server` moved to 127.0.0.1:`port`.
fn with_server(cmd: Command, port: u16) -> Command {
    let mut args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let i = args.iter().position(|a| a == "--server").unwrap() + 1;
    args[i] = format!("127.0.0.1:{port}");
    let mut moved = Command::new(cmd.get_program());
    moved.args(args);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            moved.env(k, v);
        }
    }
    moved
}

/// A TCP proxy to the relay that a test opens and closes: closed, it drops every
/// connection it accepts (the terminal sees its relay unreachable); open, it joins each to
/// a new connection to the relay.
struct Gate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    fn new(relay_port: u16) -> Gate {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let is_open = open.clone();
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", relay_port)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Gate { port, open }
    }

    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
