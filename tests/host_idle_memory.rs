//! Relay user-space memory per logged-in idle terminal, measured: 10,000 plain-TCP
//! terminals log in (with resumption credentials minted from the store's secret, so that
//! argon2 does not run 10,000 times) and stay idle; the relay's RSS is read before and
//! after. Ignored by default (it needs ~20,000 file descriptors); run with
//! `cargo test -p relay-tests --test host_idle_memory -- --ignored --nocapture`.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_host::store::{AccountStore, SqliteStore};
use relay_host::token::{InstanceId, TokenKey};
use relay_proto::frame::{Credential, Frame, Hello, Login, caps};
use relay_proto::{ResumeToken, UserId};
use support::*;

const TERMINALS: usize = 10_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
#[ignore = "opens 10,000 connections; run explicitly"]
fn idle_memory_per_logged_in_terminal() {
    let relay = Relay::start(
        "keepalive_interval = \"300s\"\nkeepalive_timeout = \"600s\"\nhandshake_timeout = \"60s\"",
    );
    relay.add_user("t0");
    // Clone t0's account row 10,000 times straight in SQLite (same password hash).
    {
        let db = rusqlite::Connection::open(relay.db()).unwrap();
        let (phc, created): (String, i64) = db
            .query_row(
                "SELECT phc, created FROM accounts WHERE name='t0'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        db.execute_batch("BEGIN").unwrap();
        for i in 1..TERMINALS {
            db.execute(
                "INSERT INTO accounts (name, phc, created) VALUES (?1, ?2, ?3)",
                rusqlite::params![format!("t{i}"), phc, created],
            )
            .unwrap();
        }
        db.execute_batch("COMMIT").unwrap();
    }
    let secret = SqliteStore::open(&relay.db())
        .unwrap()
        .server_secret()
        .unwrap();
    let key = TokenKey::new(&secret);
    // Let the relay's account watcher see the new accounts.
    std::thread::sleep(Duration::from_secs(3));
    let pid = relay.proc().child.id();
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let login = |i: usize| -> TcpStream {
        let user = format!("t{i}");
        let token = key.issue(&user, InstanceId(i as u64 + 1), expiry);
        let frame = Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: UserId::new(&user).unwrap(),
            credential: Credential::Resume(ResumeToken::from_slice(&token).unwrap()),
        });
        let mut buf = [0u8; 512];
        let n = frame.encode(&mut buf).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", relay.plain_port)).unwrap();
        s.write_all(&buf[..n]).unwrap();
        s
    };
    // Warm up (allocator arenas, tables) with a first batch, then measure.
    let mut conns: Vec<TcpStream> = (0..100).map(login).collect();
    for s in &mut conns {
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], 0x02, "LOGIN_OK expected");
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);
    let mut more: Vec<TcpStream> = (100..TERMINALS).map(login).collect();
    for s in &mut more {
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], 0x02, "LOGIN_OK expected");
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let n = (TERMINALS - 100) as u64;
    let per = (after.saturating_sub(before)) * 1024 / n;
    eprintln!(
        "relay RSS: {before} KiB with 100 terminals, {after} KiB with {TERMINALS}: {per} bytes per idle logged-in terminal"
    );
    assert!(per < 4096, "{per} bytes per idle terminal");
    drop(more);
    drop(conns);
}
