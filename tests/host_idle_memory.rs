//! Relay user-space memory per logged-in idle terminal, measured: N plain-TCP terminals
//! log in (with resumption credentials minted from the store's secret, so that argon2 does
//! not run N times) and stay idle; the relay's anonymous resident memory (`RssAnon`: heap
//! and stacks, not the mapped binary) is read before and after, and the difference divided
//! by the terminals added. The kernel's socket memory is not user space and not counted.
//!
//! - `idle_memory_1000_terminals` runs in CI: a generous bound (4 KiB), since at 1,000
//!   terminals allocator granularity is a visible share of the figure.
//! - `idle_memory_per_logged_in_terminal` is ignored by default (10,000 connections, or
//!   `RELAY_IDLE_TERMINALS`); it raises `RLIMIT_NOFILE` (as root it can raise the hard
//!   limit too) and spreads the connections over source addresses 127.0.0.2, .3, … so
//!   that 100,000 fit in the ephemeral port range:
//!   `RELAY_IDLE_TERMINALS=100000 cargo test --release -p relay-tests --test host_idle_memory -- --ignored --nocapture`

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_host::store::{AccountStore, SqliteStore};
use relay_host::token::{InstanceId, TokenKey};
use relay_proto::frame::{Credential, Frame, Hello, Login, caps};
use relay_proto::{ResumeToken, UserId};
use support::*;

/// Terminals logged in before the first reading (warms up the allocator and tables).
const WARM_UP: usize = 100;

/// Connections opened before their answers are read: stays under the listen backlog, so
/// no SYN is dropped and retried a second later.
const BATCH: usize = 500;

/// Connections per source address (the ephemeral port range holds about 28,000).
const PER_SOURCE: usize = 20_000;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Room for `n` descriptors in this process and the relay it starts (inherited).
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur >= n {
            return;
        }
        lim.rlim_cur = n.max(lim.rlim_cur);
        if lim.rlim_max < n {
            lim.rlim_max = n;
        }
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            // No CAP_SYS_RESOURCE: as far as the hard limit goes.
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            assert!(
                lim.rlim_cur >= n,
                "{n} descriptors needed, the hard limit is {} (raise it as root)",
                lim.rlim_cur
            );
        }
    }
}

/// Bytes of relay user-space memory per idle logged-in terminal, with `terminals` of them.
fn measure(terminals: usize) -> u64 {
    raise_fd_limit(terminals as u64 + 1_000);
    let relay = Relay::start(
        "keepalive_interval = \"300s\"\nkeepalive_timeout = \"600s\"\nhandshake_timeout = \"60s\"",
    );
    relay.add_user("t0");
    // Clone t0's account row straight in SQLite (same password hash and credential stamp).
    let stamp = {
        let db = rusqlite::Connection::open(relay.db()).unwrap();
        let (phc, created, stamp): (String, i64, i64) = db
            .query_row(
                "SELECT phc, created, credential FROM accounts WHERE name='t0'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        db.execute_batch("BEGIN").unwrap();
        for i in 1..terminals {
            db.execute(
                "INSERT INTO accounts (name, phc, created, credential) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![format!("t{i}"), phc, created, stamp],
            )
            .unwrap();
        }
        db.execute_batch("COMMIT").unwrap();
        stamp as u64
    };
    let secret = SqliteStore::open(&relay.db())
        .unwrap()
        .server_secret()
        .unwrap();
    let key = TokenKey::new(&secret);
    // Let the relay's account watcher see the new accounts.
    std::thread::sleep(Duration::from_secs(3));
    let pid = relay.proc().child.id();
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, relay.plain_port));
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let connect = |i: usize| -> TcpStream {
        let user = format!("t{i}");
        let token = key.issue(&user, stamp, InstanceId(i as u64 + 1), expiry);
        let frame = Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: UserId::new(&user).unwrap(),
            credential: Credential::Resume(ResumeToken::from_slice(&token).unwrap()),
        });
        let mut buf = [0u8; 512];
        let n = frame.encode(&mut buf).unwrap();
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8);
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket (descriptor limit?)");
        sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
        sock.connect(&server.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.write_all(&buf[..n]).unwrap();
        s
    };
    let login = |range: std::ops::Range<usize>, conns: &mut Vec<TcpStream>| {
        for batch in range.collect::<Vec<_>>().chunks(BATCH) {
            let first = conns.len();
            conns.extend(batch.iter().map(|&i| connect(i)));
            for s in &mut conns[first..] {
                let mut b = [0u8; 3];
                s.read_exact(&mut b).unwrap();
                assert_eq!(b[0], 0x02, "LOGIN_OK expected");
            }
        }
    };
    let mut conns = Vec::with_capacity(terminals);
    login(0..WARM_UP, &mut conns);
    std::thread::sleep(Duration::from_secs(1));
    let (rss0, anon0) = (status_kib(pid, "VmRSS:"), status_kib(pid, "RssAnon:"));
    let started = std::time::Instant::now();
    login(WARM_UP..terminals, &mut conns);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (rss1, anon1) = (status_kib(pid, "VmRSS:"), status_kib(pid, "RssAnon:"));
    let added = (terminals - WARM_UP) as u64;
    let per = anon1.saturating_sub(anon0) * 1024 / added;
    eprintln!(
        "relay with {WARM_UP} -> {terminals} idle terminals (logged in in {took:.1?}): \
         RssAnon {anon0} -> {anon1} KiB, VmRSS {rss0} -> {rss1} KiB: \
         {per} bytes per idle logged-in terminal"
    );
    // The terminals are still logged in: nothing closed them while they were measured
    // (the rest of their LOGIN_OK is all they can read).
    for s in conns.iter_mut().step_by(97) {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => panic!("an idle terminal was closed"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("an idle terminal's connection failed: {e}"),
            }
        }
    }
    per
}

#[test]
fn idle_memory_1000_terminals() {
    let per = measure(1_000);
    assert!(per < 4096, "{per} bytes per idle terminal");
}

#[test]
#[ignore = "opens 10,000 connections (or RELAY_IDLE_TERMINALS); run explicitly"]
fn idle_memory_per_logged_in_terminal() {
    let terminals = std::env::var("RELAY_IDLE_TERMINALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let per = measure(terminals);
    assert!(per <= 2048, "{per} bytes per idle terminal");
}
