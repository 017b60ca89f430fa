//! Figures 5 and 6 for our relay: a fleet of logged-in idle terminals in one process.
//!
//! Each simulated terminal is relay-proto's [`Terminal`] (one slot, one spare: one
//! logged-in connection) on a plain TCP connection, driven the way relay-host's Linux
//! terminal drives it: bytes in, control frames out, timers from `poll_timeout`, reconnects
//! with the state machine's own back-off and jitter. Connections come from several
//! 127.0.1.x source addresses (bind before connect), so 100,000 of them do not exhaust one
//! address's ephemeral ports. First logins are ramped through a semaphore; reconnects after
//! a relay restart are not (a real fleet reconnects on its own schedule).
//!
//! The accounts are written straight into the relay's SQLite store ([`add_accounts`]) with
//! a cheap argon2id cost: the store verifies each password with the parameters in its PHC
//! string, so logins cost microseconds instead of the 19 MiB default hash.

use anyhow::{Context, Result, bail};
use relay_proto::terminal::{Config, Event, Handle, MIN_TRANSMIT_BUF, Offer, Terminal};
use relay_proto::{Password, RejectReason, UserId, frame::MAX_CONTROL_FRAME};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// One connection slot: the terminal keeps exactly one idle logged-in connection.
type Term = Terminal<1>;
const H: Handle = Handle(0);

/// Source addresses 127.0.1.1 ..= 127.0.1.SOURCES (about 28,000 ports each).
const SOURCES: usize = 16;
/// TCP connect bound (the state machine's handshake timer starts once connected).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The password of every fleet account.
pub const PASSWORD: &str = "bench-password";

/// What the fleet's terminals have seen, shared with the bench's main thread.
#[derive(Debug, Default)]
struct Shared {
    /// Terminals logged in right now.
    up: AtomicUsize,
    /// `LoggedIn` events in all (first logins and re-logins).
    logins: AtomicUsize,
    /// Failed TCP connects.
    connect_errors: AtomicUsize,
    /// Terminals the relay refused (they stop).
    refused: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, e: String) {
        let mut g = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(e);
    }
}

/// N idle terminals logged in to one relay. Dropping it closes every connection.
#[derive(Debug)]
pub struct Fleet {
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    pub n: usize,
}

/// Account name of fleet terminal `i`.
pub fn user(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

impl Fleet {
    /// Starts `n` terminals (`prefix`0 ..) against the relay's plain listener `relay`;
    /// at most `ramp` first logins are in flight at once. Returns at once.
    pub fn start(relay: SocketAddr, prefix: &str, n: usize, ramp: usize) -> Result<Fleet> {
        // One worker thread: the fleet takes at most one of the machine's cores.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::default());
        let sem = Arc::new(Semaphore::new(ramp.max(1)));
        let epoch = tokio::time::Instant::now();
        let password = Password::new(PASSWORD).map_err(|e| anyhow::anyhow!("password: {e}"))?;
        for i in 0..n {
            let name = user(prefix, i);
            let id = UserId::new(&name).map_err(|e| anyhow::anyhow!("user {name}: {e}"))?;
            let t = TermTask {
                term: Term::new(
                    Config::default(),
                    id,
                    password.clone(),
                    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ),
                source: Ipv4Addr::new(127, 0, 1, 1 + (i % SOURCES) as u8),
                relay,
                epoch,
                shared: shared.clone(),
            };
            rt.spawn(t.run(sem.clone()));
        }
        Ok(Fleet {
            rt: Some(rt),
            shared,
            n,
        })
    }

    /// Terminals logged in right now (as the terminals see it).
    pub fn logged_in(&self) -> usize {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// `LoggedIn` events so far (first logins and re-logins).
    pub fn logins(&self) -> usize {
        self.shared.logins.load(Ordering::Relaxed)
    }

    /// Failed TCP connects so far.
    pub fn connect_errors(&self) -> usize {
        self.shared.connect_errors.load(Ordering::Relaxed)
    }

    /// Fails if the relay refused any terminal (it would never log in).
    pub fn check(&self) -> Result<()> {
        let refused = self.shared.refused.load(Ordering::Relaxed);
        if refused > 0 {
            let first = self
                .shared
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            bail!("the relay refused {refused} terminal(s): {first}");
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Aborts every terminal task: their sockets close.
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

struct TermTask {
    term: Term,
    source: Ipv4Addr,
    relay: SocketAddr,
    epoch: tokio::time::Instant,
    shared: Arc<Shared>,
}

impl TermTask {
    fn now(&self) -> relay_proto::Instant {
        relay_proto::Instant::from_millis(self.epoch.elapsed().as_millis() as u64)
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((self.source, 0)))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, s.connect(self.relay)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Runs until the relay refuses the terminal, or until the fleet's runtime shuts down.
    async fn run(mut self, sem: Arc<Semaphore>) {
        let mut sock: Option<TcpStream> = None;
        let mut inbuf = vec![0u8; MAX_CONTROL_FRAME * 2];
        let mut have = 0usize;
        let mut out = [0u8; MIN_TRANSMIT_BUF];
        // Held from the first connect to the first login: the ramp.
        let mut permit = None;
        let mut first = true;
        let mut up = false;
        let now = self.now();
        self.term.start(now);
        loop {
            // Events and output until both are quiet.
            let mut busy = true;
            while busy {
                busy = false;
                while let Some(ev) = self.term.poll_event() {
                    busy = true;
                    match ev {
                        Event::Open(h) => {
                            if first {
                                permit = sem.clone().acquire_owned().await.ok();
                            }
                            match self.connect().await {
                                Ok(s) => {
                                    sock = Some(s);
                                    have = 0;
                                    let now = self.now();
                                    self.term.connected(h, now);
                                }
                                Err(e) => {
                                    self.shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                                    self.shared.error(format!("connect: {e}"));
                                    let now = self.now();
                                    self.term.connect_failed(h, now);
                                }
                            }
                        }
                        Event::Closed { .. } => sock = None,
                        Event::LoggedIn => {
                            up = true;
                            first = false;
                            permit = None;
                            self.shared.up.fetch_add(1, Ordering::Relaxed);
                            self.shared.logins.fetch_add(1, Ordering::Relaxed);
                        }
                        Event::Down if up => {
                            up = false;
                            self.shared.up.fetch_sub(1, Ordering::Relaxed);
                        }
                        Event::LoginRefused { code, text } => {
                            self.shared.refused.fetch_add(1, Ordering::Relaxed);
                            self.shared.error(format!("{code:?}: {text}"));
                            drop(permit);
                            return;
                        }
                        Event::Notice { handle, .. } => {
                            let _ = self.term.reject(handle, RejectReason::Other);
                        }
                        _ => {}
                    }
                }
                if let Some(s) = sock.as_mut() {
                    loop {
                        let now = self.now();
                        match self.term.poll_transmit(H, now, &mut out) {
                            Ok(n) if n > 0 => {
                                busy = true;
                                if s.write_all(&out[..n]).await.is_err() {
                                    sock = None;
                                    let now = self.now();
                                    self.term.transport_closed(H, now);
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
            }
            let deadline = self
                .term
                .poll_timeout()
                .map(|t| self.epoch + Duration::from_millis(t.as_millis()));
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let Some(s) = sock.as_mut() else {
                if deadline.is_none() {
                    return; // stopped: nothing will ever happen again
                }
                timer.await;
                let now = self.now();
                self.term.handle_timeout(now);
                continue;
            };
            tokio::select! {
                r = s.read(&mut inbuf[have..]) => match r {
                    Ok(0) | Err(_) => {
                        sock = None;
                        let now = self.now();
                        self.term.transport_closed(H, now);
                    }
                    Ok(n) => {
                        have += n;
                        let mut off = 0;
                        while off < have {
                            let now = self.now();
                            match self.term.handle_input(H, now, &inbuf[off..have]) {
                                // Idle terminals get no session payload; skip it if any.
                                Offer::Consumed(k) | Offer::Payload(k) if k > 0 => off += k,
                                _ => break,
                            }
                        }
                        inbuf.copy_within(off..have, 0);
                        have -= off;
                        if have == inbuf.len() {
                            // A frame larger than any control frame: not for an idle terminal.
                            sock = None;
                            let now = self.now();
                            self.term.transport_closed(H, now);
                        }
                    }
                },
                _ = timer => {
                    let now = self.now();
                    self.term.handle_timeout(now);
                }
            }
        }
    }
}

/// Adds accounts `prefix`0 .. `prefix`(n-1) with password [`PASSWORD`] to the store at
/// `db`, which `relay user add` has created (schema and server secret). One cheap argon2id
/// hash (8 KiB, 1 pass) is shared by every row; one transaction.
pub fn add_accounts(db: &Path, prefix: &str, n: usize) -> Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::from_b64("cmVsYXktYmVuY2g").map_err(|e| anyhow::anyhow!("{e}"))?;
    let phc = hasher
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string();
    let mut conn = rusqlite::Connection::open(db).with_context(|| db.display().to_string())?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO accounts (name, phc, created) VALUES (?1, ?2, 0)")?;
        for i in 0..n {
            st.execute(rusqlite::params![user(prefix, i), phc])
                .context("insert account (has the store's schema changed?)")?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The value of an unlabelled gauge or counter from a Prometheus endpoint.
pub fn metric(addr: SocketAddr, name: &str) -> Result<f64> {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .with_context(|| format!("no {name} at http://{addr}/metrics"))
}

/// Polls until `relay_logged_in_terminals` at `addr` is at least `want` and `fleet` sees
/// all its terminals logged in; fails after `deadline`.
pub fn wait_logged_in(
    fleet: &Fleet,
    addr: SocketAddr,
    want: usize,
    deadline: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = 0.0;
    loop {
        fleet.check()?;
        if let Ok(v) = metric(addr, "relay_logged_in_terminals") {
            last = v;
            if v >= want as f64 && fleet.logged_in() >= fleet.n {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > deadline {
            bail!(
                "after {deadline:?}: the relay reports {last} logged-in terminals, the fleet {} of {} ({} connect errors)",
                fleet.logged_in(),
                fleet.n,
                fleet.connect_errors()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
