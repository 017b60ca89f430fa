//! `relay serve`: relay-proto's core on real sockets.
//!
//! One [`Core`] (the protocol core plus a handle per connection) behind a
//! `std::sync::Mutex`, never held across an `await`. Each connection has two tasks:
//!
//! - a *reader* that reads the socket, offers the bytes to the core and runs the
//!   connection's deadline; for payload it first asks [`Relay::forward_target`] where the
//!   bytes go and reserves room in that connection's [`Outbox`] (no lock held), then hands
//!   the core exactly that many bytes and pushes the chunk into the receiver's FIFO;
//! - a *writer* ([`run_writer`]) that writes its FIFO in order and, when the FIFO is empty,
//!   pulls control output from the core ([`Relay::poll_transmit`]).
//!
//! So control output is pulled (an [`Event::Wake`] only wakes the writer), payload is
//! pushed by the sender's reader, and every push happens under the core lock: the FIFO's
//! order is the core's order, which is what the forwarding contract requires.
//!
//! Idle connections hold no read buffer: a buffer is allocated when the socket has data
//! and dropped when everything in it was handled; only a partial control frame is kept.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::{Buf, Bytes, BytesMut};
use relay_proto::frame::Credential;
use relay_proto::relay::{
    self, ConnId, Event, Heap, MIN_TRANSMIT_BUF, Offer, Policy, Relay, Verdict,
};
use relay_proto::{DemandError, ErrorCode, ResumeToken, UserId};
use tokio::io::{AsyncRead, ReadBuf, ReadHalf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::{Limits, ServeConfig};
use crate::listen::{Accepted, Acceptor, ClientStream, watch_accounts_with};
use crate::metrics::{LoginMethod, LoginOutcome, Metrics};
use crate::outbox::{Outbox, WriterEnd, run_writer};
use crate::store::{AccountName, AccountStore, AccountsSnapshot, VerifyError};
use crate::throttle::{DEFAULT_MAX_TRACKED, LoginThrottle};
use crate::tls::ServerIdentity;
use crate::token::{InstanceId, TokenKey};

/// How long a resumption credential stays valid after it is issued.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Bytes read from a socket at once. Payload chunks are split off this buffer.
const READ_BUF: usize = 32 * 1024;

/// The first read after a quiet spell: enough for control frames.
const SMALL_READ_BUF: usize = 2048;

/// Payload chunks smaller than this are copied out of the read buffer, so that a trickle
/// of tiny frames to a slow receiver cannot pin many whole read buffers.
const COPY_BELOW: usize = 2048;

/// How long shutdown waits for connections to flush their last frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The access rule over the newest account snapshot: `relay user allow` applies to the
/// next demand.
#[derive(Debug, Clone)]
pub struct SnapshotPolicy(pub Arc<AccountsSnapshot>);

impl Policy for SnapshotPolicy {
    fn may_reach(&self, from: &UserId, to: &UserId) -> bool {
        self.0.may_reach(from.as_str(), to.as_str())
    }
}

/// What the relay keeps per connection besides the core's entry.
#[derive(Debug)]
struct Conn {
    out: Outbox,
    /// Re-arms the reader's deadline (the core changed this connection's state).
    timer: Notify,
    peer: SocketAddr,
}

/// The protocol core and the connections' handles, behind one lock.
struct Core {
    relay: Relay<Heap, SnapshotPolicy>,
    /// Indexed by `ConnId.0` (the core reuses small keys).
    conns: Vec<Option<Arc<Conn>>>,
    epoch: std::time::Instant,
    bytes_seen: u64,
}

/// Everything the connection tasks share.
struct Server {
    core: Mutex<Core>,
    store: Arc<dyn AccountStore>,
    tokens: TokenKey,
    throttle: Mutex<LoginThrottle>,
    metrics: Arc<Metrics>,
    accounts: watch::Receiver<Arc<AccountsSnapshot>>,
    /// Wakes the account watcher at once (see [`snapshot_current`]).
    refresh_accounts: Arc<tokio::sync::Notify>,
    epoch: std::time::Instant,
}

/// The core's configuration from the operator's limits.
pub fn core_config(l: &Limits) -> relay::Config {
    let d = |d: Duration| relay_proto::Duration::from_millis(d.as_millis() as u64);
    relay::Config {
        keepalive: d(l.keepalive_interval),
        keepalive_timeout: d(l.keepalive_timeout),
        handshake_timeout: d(l.handshake_timeout),
        demand_timeout: d(l.demand_timeout),
        max_payload: l.max_frame_payload,
        max_conns_per_account: l.max_connections_per_account,
        max_sessions_per_account: l.max_sessions_per_account,
        ..relay::Config::default()
    }
}

fn to_relay_instant(epoch: std::time::Instant, t: std::time::Instant) -> relay_proto::Instant {
    relay_proto::Instant::from_millis(t.saturating_duration_since(epoch).as_millis() as u64)
}

fn to_tokio_instant(epoch: std::time::Instant, t: relay_proto::Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch + Duration::from_millis(t.as_millis()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn demand_outcome(e: &DemandError) -> &'static str {
    match e {
        DemandError::TargetOffline => "offline",
        DemandError::NoIdleConnection => "no_idle_connection",
        DemandError::Forbidden => "forbidden",
        DemandError::Rejected(_) => "rejected",
        DemandError::Timeout => "timeout",
        DemandError::TooManySessions => "too_many_sessions",
        DemandError::TargetGone => "target_gone",
    }
}

impl Core {
    fn now(&self) -> relay_proto::Instant {
        to_relay_instant(self.epoch, std::time::Instant::now())
    }

    fn conn(&self, id: ConnId) -> Option<&Arc<Conn>> {
        self.conns.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn is(&self, id: ConnId, me: &Arc<Conn>) -> bool {
        self.conn(id).is_some_and(|c| Arc::ptr_eq(c, me))
    }

    /// Pushes `id`'s pending control output into its FIFO. `true` if it pushed or closes.
    fn flush_control(&mut self, id: ConnId) -> bool {
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let Ok(t) = self.relay.poll_transmit(id, &mut buf) else {
            return false;
        };
        let Some(c) = self.conn(id) else {
            return false;
        };
        if t.len > 0 {
            c.out.push(Bytes::copy_from_slice(&buf[..t.len]), 0);
        }
        if t.close {
            c.out.close_after_flush();
        }
        t.len > 0 || t.close
    }

    /// The connection's socket is finished: tell the core, forget the handle.
    fn finish(&mut self, srv: &Arc<Server>, id: ConnId, me: &Arc<Conn>) {
        if self.is(id, me) {
            self.relay.closed(id);
            self.conns[id.0 as usize] = None;
            self.drain(srv);
        }
        me.out.kill();
        me.timer.notify_one();
    }

    /// Handles the core's events: wakes writers, starts login checks, logs, counts.
    fn drain(&mut self, srv: &Arc<Server>) {
        while let Some(e) = self.relay.poll_event() {
            match e {
                Event::Wake(c) => {
                    if let Some(c) = self.conn(c) {
                        c.out.wake.notify_one();
                        c.timer.notify_one();
                    }
                }
                Event::Authenticate {
                    conn,
                    user,
                    credential,
                } => {
                    if let Some(me) = self.conn(conn).cloned() {
                        tokio::spawn(authenticate(srv.clone(), conn, me, user, credential));
                    }
                }
                Event::LoggedIn {
                    conn,
                    user,
                    resumed,
                } => {
                    let peer = self.conn(conn).map(|c| c.peer);
                    tracing::info!(%user, resumed, conn = conn.0, ?peer, "login");
                }
                Event::LoginFailed { conn, user, code } => {
                    let peer = self.conn(conn).map(|c| c.peer);
                    tracing::info!(%user, conn = conn.0, ?peer, error = %code, "login refused");
                }
                Event::Replaced { user } => {
                    tracing::info!(%user, "a new login replaced the running instance")
                }
                Event::DemandFailed {
                    from,
                    to,
                    service,
                    error,
                } => {
                    srv.metrics.demand(demand_outcome(&error));
                    tracing::info!(%from, %to, service = service.as_str(), %error, "demand failed");
                }
                Event::SessionStarted {
                    session,
                    from,
                    to,
                    service,
                } => {
                    srv.metrics.demand("accepted");
                    tracing::info!(session, %from, %to, service = service.as_str(), "session started");
                }
                Event::SessionEnded {
                    session,
                    from,
                    to,
                    up,
                    down,
                    reason,
                } => {
                    tracing::info!(session, %from, %to, up, down, ?reason, "session ended");
                }
                Event::Offline { user } => tracing::info!(%user, "logged out (offline)"),
            }
        }
        let stats = self.relay.stats();
        srv.metrics
            .logged_in_terminals
            .set(self.relay.terminal_count() as i64);
        srv.metrics
            .active_sessions
            .set(stats.active_sessions as i64);
        if stats.bytes_relayed > self.bytes_seen {
            srv.metrics
                .bytes_relayed
                .inc_by(stats.bytes_relayed - self.bytes_seen);
            self.bytes_seen = stats.bytes_relayed;
        }
    }

    fn deadline(&self, id: ConnId) -> Option<tokio::time::Instant> {
        self.relay
            .poll_timeout(id)
            .map(|t| to_tokio_instant(self.epoch, t))
    }
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // The core is only ever changed through its own methods; a panic in one connection
        // task must not take the whole relay down with a poisoned lock.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checks a login off the core lock: throttle, then argon2 (on a blocking thread) or the
/// resumption credential, then hands the verdict to the core.
async fn authenticate(
    srv: Arc<Server>,
    conn: ConnId,
    me: Arc<Conn>,
    user: UserId,
    credential: Credential,
) {
    let ip = me.peer.ip();
    let method = match credential {
        Credential::Password(_) => LoginMethod::Password,
        Credential::Resume(_) => LoginMethod::Resumption,
    };
    let throttled = srv
        .throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .check(user.as_str(), ip, std::time::Instant::now());
    let verdict = if let Err(t) = throttled {
        tracing::info!(%user, peer = %me.peer, "login throttled: {t}");
        srv.metrics.login(method, LoginOutcome::Throttled);
        Verdict::Refuse(ErrorCode::Throttled)
    } else {
        let (ok, exists) = check_credential(&srv, &user, credential).await;
        if ok.is_some() {
            snapshot_current(&srv).await;
        }
        match ok {
            Some(instance) => {
                srv.metrics.login(method, LoginOutcome::Ok);
                let expiry = unix_now() + TOKEN_LIFETIME.as_secs();
                let token = srv
                    .tokens
                    .issue(user.as_str(), InstanceId(instance), expiry);
                Verdict::Accept {
                    instance,
                    token: ResumeToken::from_slice(&token).unwrap_or_default(),
                }
            }
            None => {
                srv.metrics.login(method, LoginOutcome::Failed);
                srv.throttle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_failure(
                        exists.then_some(user.as_str()),
                        ip,
                        std::time::Instant::now(),
                    );
                Verdict::Refuse(match method {
                    LoginMethod::Password => ErrorCode::AuthFailed,
                    LoginMethod::Resumption => ErrorCode::ResumeRejected,
                })
            }
        }
    };
    let mut core = srv.lock();
    if core.is(conn, &me) {
        let now = core.now();
        core.relay.login_verdict(now, conn, verdict);
        core.drain(&srv);
    }
}

/// Makes sure the accounts snapshot (which the access rule reads) is current before a
/// login is answered: an account added, or a rule changed, a moment ago would otherwise
/// be unknown for up to a poll (1 s). One cheap query per login; the poll still covers
/// changes made while a terminal stays logged in.
async fn snapshot_current(srv: &Arc<Server>) {
    let store = srv.store.clone();
    let Ok(Ok(generation)) = tokio::task::spawn_blocking(move || store.generation()).await else {
        return;
    };
    if srv.accounts.borrow().generation() == generation {
        return;
    }
    srv.refresh_accounts.notify_one();
    let mut rx = srv.accounts.clone();
    let wait = rx.wait_for(|s| s.generation() >= generation);
    let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
}

/// `(Some(instance), _)` if the credential is good; the `bool` says whether the account
/// exists (failures for unknown names are not counted against an account).
async fn check_credential(
    srv: &Arc<Server>,
    user: &UserId,
    credential: Credential,
) -> (Option<u64>, bool) {
    let exists = srv.accounts.borrow().exists(user.as_str());
    match credential {
        Credential::Password(password) => {
            let Ok(name) = AccountName::new(user.as_str()) else {
                return (None, false);
            };
            let store = srv.store.clone();
            let password = password.as_str().to_owned();
            let result =
                tokio::task::spawn_blocking(move || store.verify_password(&name, &password)).await;
            match result {
                Ok(Ok(())) => {
                    let mut b = [0u8; 8];
                    if getrandom::getrandom(&mut b).is_err() {
                        return (None, exists);
                    }
                    (Some(u64::from_le_bytes(b)), true)
                }
                Ok(Err(VerifyError::UnknownAccount)) => (None, false),
                Ok(Err(VerifyError::WrongPassword)) => (None, true),
                Ok(Err(VerifyError::Store(e))) => {
                    tracing::warn!("account store: {e}");
                    (None, exists)
                }
                Err(e) => {
                    tracing::warn!("password check: {e}");
                    (None, exists)
                }
            }
        }
        Credential::Resume(token) => {
            // The account must still exist: a deleted account's credentials die with it.
            // The snapshot lags the store by a poll: an account added a moment ago is
            // confirmed in the store itself (rare, so off the hot path).
            let exists = exists || {
                let store = srv.store.clone();
                let name = AccountName::new(user.as_str());
                tokio::task::spawn_blocking(move || {
                    name.is_ok_and(|n| store.exists(&n).unwrap_or(false))
                })
                .await
                .unwrap_or(false)
            };
            if !exists {
                return (None, false);
            }
            match srv
                .tokens
                .verify(user.as_str(), token.as_bytes(), unix_now())
            {
                Ok(InstanceId(i)) => (Some(i), true),
                Err(_) => (None, true),
            }
        }
    }
}

/// Reads whatever the socket has into `pending` (allocating a buffer only now), or
/// returns `Ok(0)` at end of stream. While nothing arrives, no buffer is held.
async fn read_some(
    rd: &mut ReadHalf<ClientStream>,
    pending: &mut BytesMut,
    big: &mut bool,
) -> io::Result<usize> {
    poll_fn(|cx| {
        // Small reads (control frames, keep-alives) get a small buffer: a big transient one
        // per idle connection's keep-alive fragments the heap. Bulk gets READ_BUF.
        let size = if *big { READ_BUF } else { SMALL_READ_BUF };
        let mut buf = if pending.is_empty() {
            BytesMut::with_capacity(size)
        } else {
            let mut b = BytesMut::with_capacity(size.max(pending.len() * 2));
            b.extend_from_slice(pending);
            b
        };
        let start = buf.len();
        let spare = buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity
                // (`ReadBuf::filled`), which start right at `buf.len()`.
                unsafe { buf.set_len(start + n) };
                *big = n >= SMALL_READ_BUF / 2;
                *pending = buf;
                Poll::Ready(Ok(n))
            }
        }
    })
    .await
}

/// One client connection, from accept to close.
async fn connection(srv: Arc<Server>, accepted: Accepted, handshake: Duration) {
    let Accepted {
        stream,
        peer,
        login_deadline,
        slot,
    } = accepted;
    let me = Arc::new(Conn {
        out: Outbox::new(),
        timer: Notify::new(),
        peer,
    });
    let id = {
        let mut core = srv.lock();
        // One deadline for TLS and login: the core counts from the TCP accept.
        let since = login_deadline.into_std() - handshake;
        let at = to_relay_instant(core.epoch, since);
        match core.relay.accept(at) {
            Ok(id) => {
                let i = id.0 as usize;
                if core.conns.len() <= i {
                    core.conns.resize(i + 1, None);
                }
                core.conns[i] = Some(me.clone());
                id
            }
            Err(e) => {
                tracing::warn!(%peer, "connection refused: {e:?}");
                return;
            }
        }
    };
    let (mut rd, wr) = tokio::io::split(stream);

    let writer = {
        let srv = srv.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let pull = || {
                let mut core = srv.lock();
                if !core.is(id, &me) {
                    return false;
                }
                let pushed = core.flush_control(id);
                core.drain(&srv);
                pushed
            };
            let end = run_writer(wr, &me.out, pull).await;
            if end != WriterEnd::Killed {
                srv.lock().finish(&srv, id, &me);
            }
        })
    };

    let mut pending = BytesMut::new();
    let mut big = false;
    let mut deadline = srv.lock().deadline(id);
    loop {
        if me.out.is_dead() {
            break;
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let read = tokio::select! {
            r = read_some(&mut rd, &mut pending, &mut big) => r,
            () = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                let mut core = srv.lock();
                if core.is(id, &me) {
                    let now = core.now();
                    core.relay.handle_timeout(now, id);
                    core.drain(&srv);
                    deadline = core.deadline(id);
                }
                continue;
            }
            () = me.timer.notified() => {
                deadline = srv.lock().deadline(id);
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !offer(&srv, id, &me, &mut pending, &mut deadline).await {
            break;
        }
        if pending.is_empty() {
            // Idle again: give the read buffer back (chunks split off it live on).
            pending = BytesMut::new();
        } else if pending.capacity() > 4 * pending.len() + 1024 {
            pending = BytesMut::from(&pending[..]);
        }
    }
    srv.lock().finish(&srv, id, &me);
    let _ = writer.await;
    drop(slot);
}

/// Offers `buf` to the core until it is used up or only a partial frame is left. Payload
/// goes to the receiver's FIFO after room is reserved there. `false`: stop reading.
async fn offer(
    srv: &Arc<Server>,
    id: ConnId,
    me: &Arc<Conn>,
    buf: &mut BytesMut,
    deadline: &mut Option<tokio::time::Instant>,
) -> bool {
    while !buf.is_empty() {
        // Control frames (and payload for a dead peer) under one lock.
        let target = {
            let mut core = srv.lock();
            if !core.is(id, me) {
                return false;
            }
            let now = core.now();
            let mut target = None;
            while !buf.is_empty() {
                if let Some((to, remaining)) = core.relay.forward_target(id) {
                    target = core.conn(to).cloned().map(|c| (to, remaining, c));
                    if target.is_some() {
                        break;
                    }
                }
                match core.relay.handle_input(now, id, buf) {
                    Offer::Consumed(n) => buf.advance(n),
                    Offer::NeedMore => break,
                    Offer::Forward { to, n } => {
                        // Only when the receiver has no handle any more: nothing to write.
                        let chunk = chunk_of(buf, n);
                        if let Some(c) = core.conn(to) {
                            c.out.push(chunk, 0);
                        }
                    }
                }
            }
            core.drain(srv);
            *deadline = core.deadline(id);
            match target {
                Some(t) => t,
                None => return true,
            }
        };
        let (to, remaining, dest) = target;
        let m = buf.len().min(remaining);
        // Room at the receiver first, without the lock: this is the backpressure. Our own
        // deadline keeps running meanwhile (a receiver that takes nothing for the whole
        // keep-alive deadline ends the session, as the core documents).
        let reserved = loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                ok = dest.out.reserve(m) => break ok,
                () = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                    let mut core = srv.lock();
                    if !core.is(id, me) { return false; }
                    let now = core.now();
                    core.relay.handle_timeout(now, id);
                    core.drain(srv);
                    *deadline = core.deadline(id);
                    if core.relay.forward_target(id).map(|t| t.0) != Some(to) {
                        break false;
                    }
                }
                () = me.timer.notified() => {
                    if me.out.is_dead() { return false; }
                    *deadline = srv.lock().deadline(id);
                }
            }
        };
        let mut core = srv.lock();
        if !core.is(id, me) {
            if reserved {
                dest.out.release(m as u32);
            }
            return false;
        }
        let now = core.now();
        // The receiver's pending output (this frame's DATA header) goes first. Not after
        // `handle_input`: the last chunk of a frame unlocks the receiver, and control frames
        // queued meanwhile (a keep-alive ack, TERMINATE) must follow the payload.
        core.flush_control(to);
        match core.relay.handle_input(now, id, &buf[..m]) {
            Offer::Forward { to: t, n } => {
                let chunk = chunk_of(buf, n);
                let same = core.is(t, &dest) && reserved;
                if reserved {
                    dest.out
                        .release(if same { (m - n) as u32 } else { m as u32 });
                }
                if let Some(c) = core.conn(t) {
                    c.out.push(chunk, if same { n as u32 } else { 0 });
                }
            }
            Offer::Consumed(n) => {
                buf.advance(n);
                if reserved {
                    dest.out.release(m as u32);
                }
            }
            Offer::NeedMore => {
                if reserved {
                    dest.out.release(m as u32);
                }
                core.drain(srv);
                return true;
            }
        }
        core.drain(srv);
        *deadline = core.deadline(id);
    }
    true
}

/// The first `n` bytes of `buf` as a chunk: split off (no copy) when large, copied when
/// small so tiny chunks do not pin the whole read buffer.
fn chunk_of(buf: &mut BytesMut, n: usize) -> Bytes {
    if n < COPY_BELOW {
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        chunk
    } else {
        buf.split_to(n).freeze()
    }
}

/// Runs the relay until SIGTERM/SIGINT. Blocks the calling thread.
pub fn run(
    config: ServeConfig,
    store: Arc<dyn AccountStore>,
    identity: ServerIdentity,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(config, store, identity, async {
        if let Err(e) = crate::listen::shutdown_signal().await {
            tracing::warn!("cannot watch for signals: {e}");
            std::future::pending::<()>().await;
        }
    }))
}

/// The relay server until `stop` resolves; then a clean shutdown.
pub async fn serve(
    config: ServeConfig,
    store: Arc<dyn AccountStore>,
    identity: ServerIdentity,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = config.limits.clone();
    let metrics = Arc::new(Metrics::new());
    let secret = store.server_secret()?;
    let refresh_accounts = Arc::new(tokio::sync::Notify::new());
    let accounts = watch_accounts_with(
        store.clone(),
        Duration::from_secs(1),
        refresh_accounts.clone(),
    )?;
    let policy = SnapshotPolicy(accounts.borrow().clone());
    let epoch = std::time::Instant::now();
    let srv = Arc::new(Server {
        core: Mutex::new(Core {
            relay: Relay::new(core_config(&limits), policy),
            conns: Vec::new(),
            epoch,
            bytes_seen: 0,
        }),
        store: store.clone(),
        tokens: TokenKey::new(&secret),
        throttle: Mutex::new(LoginThrottle::new(
            limits.login_failures_per_account_per_minute,
            limits.login_failures_per_source_per_minute,
            DEFAULT_MAX_TRACKED,
        )),
        metrics: metrics.clone(),
        accounts: accounts.clone(),
        refresh_accounts,
        epoch,
    });
    let _ = srv.epoch;

    // Account edits: new access rules for the next demand; deleted accounts close now.
    {
        let srv = srv.clone();
        let mut rx = accounts;
        tokio::spawn(async move {
            let mut current = rx.borrow_and_update().clone();
            while rx.changed().await.is_ok() {
                let newer = rx.borrow_and_update().clone();
                let removed = current.removed(&newer);
                let mut core = srv.lock();
                *core.relay.policy_mut() = SnapshotPolicy(newer.clone());
                for name in removed {
                    if let Ok(user) = UserId::new(&name) {
                        tracing::info!(user = %name, "account deleted: closing its connections");
                        core.relay.remove_user(&user);
                    }
                }
                core.drain(&srv);
                drop(core);
                current = newer;
            }
        });
    }

    if let Some(addr) = config.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, metrics).await {
                tracing::warn!("metrics server: {e}");
            }
        });
    }

    let slots = Arc::new(Semaphore::new(limits.max_total_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut acceptors = Vec::new();
    let tls = identity.server_config()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    acceptors.push(Acceptor::new(
        listener,
        Some(tls),
        slots.clone(),
        limits.handshake_timeout,
        metrics.clone(),
    ));
    if let Some(plain) = config.allow_plain {
        let listener = TcpListener::bind(plain)
            .await
            .with_context(|| format!("listening on {plain}"))?;
        tracing::warn!(%plain, "PLAIN TCP listener: passwords and data on it are NOT encrypted");
        acceptors.push(Acceptor::new(
            listener,
            None,
            slots.clone(),
            limits.handshake_timeout,
            metrics.clone(),
        ));
    }
    let mut tasks = Vec::new();
    for a in acceptors {
        let addr = a.local_addr()?;
        tracing::info!(%addr, tls = !format!("{a:?}").contains("tls: false"), "listening");
        let srv = srv.clone();
        let handshake = limits.handshake_timeout;
        tasks.push(tokio::spawn(a.run(stop_rx.clone(), move |acc| {
            connection(srv.clone(), acc, handshake)
        })));
    }

    stop.await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    {
        let mut core = srv.lock();
        tracing::info!(
            connections = core.relay.connection_count(),
            "shutting down: ending sessions and closing connections"
        );
        core.relay.shutdown();
        core.drain(&srv);
    }
    let until = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while srv.lock().relay.connection_count() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("relay stopped");
    Ok(())
}
