//! `relay serve`: relay-proto's core on real sockets.
//!
//! Each connection is one task ([`ConnIo`]) that polls both directions of its socket:
//!
//! - *reading*: it reads the socket and offers the bytes to the core; for payload it first
//!   asks where the bytes go (`forward_target`) and takes credit in that connection's
//!   [`Fifo`] (or waits for it without reading more: backpressure), then hands the core
//!   exactly that many bytes and pushes the chunk into the receiver's FIFO;
//! - *writing*: it writes its own FIFO in order and, when the FIFO is empty, pulls control
//!   output from the core (`poll_transmit`).
//!
//! So control output is pulled (a wake only wakes the task), payload is pushed by the
//! sender, and every push happens under the lock that ordered it: the FIFO's order is the
//! core's order, which is what the forwarding contract requires.
//!
//! ## Locking
//!
//! The core is split in two (relay-proto's router and its [`Pair`]s), and so are the locks:
//!
//! - **The router lock** ([`Server::core`], a `std::sync::Mutex` around [`Core`]): the
//!   router (logins, demands, pairing, releases, the online list, operator actions,
//!   deadlines) and the handles of all connections. Never held across an `await` or I/O.
//! - **A pair lock per running session** ([`Link::pair`]): once a session runs, the
//!   router hands its data path out ([`Relay::hand_out`]) and both connections' tasks
//!   offer their bytes to the [`Pair`] under this lock only, and pull their output (DATA
//!   headers, keep-alive acks, the peer's TERMINATE) from it. A paired session's DATA,
//!   KEEPALIVEs and first TERMINATE take no process-wide lock, nor does the other side's
//!   DATA after it. The second TERMINATE ends the session ([`PairOffer::Finished`]): the
//!   task lets go of the pair lock, then takes the router lock once to give the pair back
//!   (the router sends both RELEASEs and ends the session). A frame the pair does not
//!   take (LIST, LOGOUT, anything out of place) goes to the router, which takes the pair
//!   back first. `relay_router_locks_total` counts the router lock's acquisitions: a
//!   session takes it a few times to be handed out and at its end (and when a deadline
//!   of its connections fires), never per frame (tests/datapath_locks.rs).
//! - **Leaf locks**: each connection's [`Fifo`] and its `link` slot; nothing is locked
//!   while one of them is held.
//!
//! Order: router, then pair, then leaves. The router takes a pair back ([`Links`], its
//! `Handback`) under its own lock whenever one of its transitions touches a handed-out
//! connection (a close, a deadline, a logout or replaced instance, an operator action);
//! the data path never takes the router lock while it holds a pair lock. So logins,
//! demands and the timer sweep hold only the router lock, which a paired session's bytes
//! do not need; a sweep that reaches a handed-out connection's deadline locks that one
//! pair. With `--splice`, sessions are not handed out (the splice path moves payload
//! through the router's `forward_target`/`forwarded`).
//!
//! Deadlines (handshake, keep-alive, demand) are not a timer per connection: the core's
//! deadlines sit in one ordered set ([`Core::arm`]) and one timer task runs those that
//! are due. An entry is only moved *earlier*; a deadline that moved later (a keep-alive
//! arrived) fires early once, which the core allows, and is re-armed then. So an idle
//! connection costs one set entry and keep-alives cost no timer work. A handed-out
//! session's deadline is the one its connections had when handed out: when it fires the
//! router takes the pair back and re-arms (once per keep-alive timeout per session).
//!
//! Idle connections hold no read buffer: a buffer is allocated when the socket has data
//! and dropped when everything in it was handled; only a partial control frame is kept.

use std::collections::{BTreeSet, HashMap};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Buf, Bytes, BytesMut};
use relay_proto::frame::{Demand, Redirect};
use relay_proto::relay::{
    self, ConnId, Event, Handback, Heap, MIN_TRANSMIT_BUF, Node, Offer, Pair, PairOffer, Policy,
    Relay,
};
use relay_proto::{DemandError, UserId};
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
#[cfg(target_os = "linux")]
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;

use crate::presence::Presence;
#[cfg(target_os = "linux")]
use crate::splice::Pipe;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::admin::{AdminRequest, Board};
use crate::auth::{Auth, Login};
use crate::config::{Limits, ServeConfig};
use crate::fifo::{Chunk, Direct, Fifo, Next};
use crate::listen::{Accepted, Acceptor, ClientStream, ConnectionSlot, watch_accounts_with};
use crate::metrics::Metrics;
use crate::published::{Published, PublishedStream};
use crate::reload::Reloader;
use crate::store::{AccountStore, AccountsSnapshot};
use crate::workers::{self, Workers};

/// Bytes read from a socket at once. Payload chunks are split off this buffer.
const READ_BUF: usize = 32 * 1024;

/// The first read after a quiet spell: enough for control frames.
const SMALL_READ_BUF: usize = 2048;

/// Chunks handed to one vectored write.
const WRITE_BATCH: usize = 16;

/// Payload chunks smaller than this are copied out of the read buffer, so that a trickle
/// of tiny frames to a slow receiver cannot pin many whole read buffers.
const COPY_BELOW: usize = 2048;

/// Deadlines run per hold of the router lock in a timer sweep.
const SWEEP_BATCH: usize = 256;

/// How long shutdown waits for connections to flush their last frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The access rule over the newest account snapshot: `relay user allow` applies to the
/// next demand. The relay itself ([`crate::published::REQUESTER`]) may reach the targets
/// of the published ports, and only those: the `[[published]]` tables are its rule.
/// With a cluster (`--database`), the presence copy says where a target that is not
/// logged in here is (redirects, docs/CLUSTER.md part 5).
#[derive(Debug, Clone)]
pub struct SnapshotPolicy(
    pub Arc<AccountsSnapshot>,
    pub Arc<[UserId]>,
    pub Option<Arc<Presence>>,
);

impl Policy for SnapshotPolicy {
    fn may_reach(&self, from: &UserId, to: &UserId) -> bool {
        if from.as_str() == crate::published::REQUESTER {
            return self.1.contains(to);
        }
        self.0.may_reach(from.as_str(), to.as_str())
    }

    fn locate(&self, user: &UserId) -> Option<Node> {
        self.2.as_ref()?.locate(user)
    }

    fn node(&self, node: Node) -> Option<Redirect> {
        self.2.as_ref()?.node(node)
    }

    fn remote(&self, from: u32) -> Option<(u32, UserId)> {
        self.2.as_ref()?.remote(from)
    }
}

/// The targets of the published ports: whom the relay itself may reach.
fn published_targets(ports: &[Published]) -> Arc<[UserId]> {
    ports.iter().map(|p| p.target.clone()).collect()
}

/// What the relay keeps per connection besides the core's entry, shared by the
/// connection's task, its peer's task (pushes, credit) and the core's lock holder (wakes).
#[derive(Debug)]
struct Conn {
    out: Fifo,
    peer: SocketAddr,
    /// Payload for this connection may arrive as [`Chunk::Pipe`] (plain TCP, splice on).
    splice: bool,
    /// Its session's data path while the router has handed it out ([`Link`]).
    link: Mutex<Option<Arc<Link>>>,
}

impl Conn {
    /// The handed-out data path this connection's bytes go through, if any.
    fn linked(&self) -> Option<Arc<Link>> {
        lock(&self.link).clone()
    }
}

/// A running session's data path, handed out of the router ([`Relay::hand_out`]): the
/// core's [`Pair`] behind its own lock, and the two connections it joins. `pair` is
/// `None` once the router took it back; the connections then go to the router again.
struct Link {
    pair: Mutex<Paired>,
    ends: [(ConnId, Arc<Conn>); 2],
}

/// What [`Link::pair`] guards.
struct Paired {
    pair: Option<Pair>,
    /// Payload bytes forwarded and not yet in `relay_bytes_relayed`: published in steps
    /// of [`PUBLISH_BYTES`], not per chunk (two atomics on cache lines that every
    /// thread writes); the rest when the router takes the pair back and counts it.
    unpublished: u64,
}

/// See [`Paired::unpublished`].
const PUBLISH_BYTES: u64 = 64 * 1024;

/// What [`offer_paired`] did.
enum ViaPair {
    Done(Step),
    /// A frame for the router; the pair is still handed out (the router takes it back).
    Router,
    /// The session is over ([`PairOffer::Finished`]): the router must take the pair back.
    Finished,
    /// The router took the pair back already.
    Gone,
}

impl Link {
    fn end(&self, id: ConnId) -> Option<&Arc<Conn>> {
        self.ends.iter().find(|(c, _)| *c == id).map(|(_, c)| c)
    }
}

/// Locks a mutex whatever a panicking holder left: every update under these locks is
/// one step through the core's or the FIFO's own methods.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The router's way back to the pairs it handed out: the links by connection index.
#[derive(Debug, Default)]
struct Links(HashMap<usize, Arc<Link>>);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("ends", &[self.ends[0].0, self.ends[1].0])
            .finish()
    }
}

impl Handback for Links {
    /// Runs under the router's lock and takes the pair's (router, then pair: the data
    /// path never takes them the other way round).
    fn take(&mut self, conn: ConnId) -> Option<Pair> {
        let link = self.0.get(&conn.index())?.clone();
        // (An index reused by a newer connection names another link's end: not this.)
        link.end(conn)?;
        let pair = lock(&link.pair).pair.take();
        for (id, end) in &link.ends {
            self.0.remove(&id.index());
            let mut slot = lock(&end.link);
            if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) {
                *slot = None;
            }
        }
        pair
    }
}

/// [`Slot::armed`] when the connection has no entry in [`Core::timers`].
const NOT_ARMED: u64 = u64::MAX;

/// A connection's handle in the core's table.
struct Slot {
    conn: Arc<Conn>,
    /// The time (core milliseconds) of its entry in [`Core::timers`], or [`NOT_ARMED`].
    armed: u64,
}

/// The protocol core and the connections' handles, behind one lock.
struct Core {
    relay: Relay<Heap, SnapshotPolicy, Links>,
    /// Indexed by [`ConnId::index`] (the core reuses small keys).
    conns: Vec<Option<Slot>>,
    /// Deadlines of all connections, `(core milliseconds, connection)`, earliest first.
    timers: BTreeSet<(u64, ConnId)>,
    /// Wakes the timer task when an entry earlier than all others was added.
    timer_wake: Arc<Notify>,
    epoch: std::time::Instant,
}

/// Everything the connection tasks share.
struct Server {
    core: Mutex<Core>,
    epoch: std::time::Instant,
    /// Payload bytes counted in `relay_bytes_relayed`: the router's count, and ahead of
    /// it the bytes of pairs still handed out (the router counts those when it takes a
    /// pair back).
    bytes_seen: AtomicU64,
    auth: Auth,
    metrics: Arc<Metrics>,
    /// Payload between plain-TCP connections moves with `splice(2)` ([`crate::splice`]).
    splice: bool,
    /// The operator dashboard's view ([`crate::admin`]).
    board: Arc<Board>,
    /// A fenced cluster node serves no terminal ([`fence`]); changed under the core lock.
    fenced: std::sync::atomic::AtomicBool,
}

/// The core's configuration from the operator's limits.
pub fn core_config(l: &Limits) -> relay::Config {
    let d = |d: Duration| relay_proto::Duration::from_millis(d.as_millis() as u64);
    relay::Config {
        keepalive_interval: d(l.keepalive_interval),
        keepalive_timeout: d(l.keepalive_timeout),
        handshake_timeout: d(l.handshake_timeout),
        demand_timeout: d(l.demand_timeout),
        max_frame_payload: l.max_frame_payload,
        max_connections_per_account: l.max_connections_per_account,
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
        self.conns
            .get(id.index())
            .and_then(Option::as_ref)
            .map(|s| &s.conn)
    }

    /// Makes sure `id` has a timer entry no later than the core's next deadline for it.
    /// A later deadline keeps the earlier entry (it fires early, harmlessly, and re-arms).
    fn arm(&mut self, id: ConnId) {
        let Some(at) = self.relay.poll_timeout(id) else {
            return;
        };
        let at = at.as_millis();
        let Some(Some(slot)) = self.conns.get_mut(id.index()) else {
            return;
        };
        if at >= slot.armed {
            return;
        }
        if slot.armed != NOT_ARMED {
            self.timers.remove(&(slot.armed, id));
        }
        slot.armed = at;
        if self.timers.first().is_none_or(|&(first, _)| at < first) {
            self.timer_wake.notify_one();
        }
        self.timers.insert((at, id));
    }

    /// Runs the deadlines that are due and re-arms those connections.
    /// At most [`SWEEP_BATCH`] of them per call, so that a sweep over many deadlines
    /// lets go of the router between batches. `true` if more are due.
    fn fire(&mut self, srv: &Arc<Server>) -> bool {
        let now = self.now();
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.timers.first() {
            if at > now.as_millis() {
                break;
            }
            if due.len() == SWEEP_BATCH {
                break;
            }
            self.timers.pop_first();
            if let Some(Some(slot)) = self.conns.get_mut(id.index()) {
                slot.armed = NOT_ARMED;
            }
            due.push(id);
        }
        for &id in &due {
            self.relay.handle_timeout(now, id);
        }
        let more = due.len() == SWEEP_BATCH;
        for id in due {
            self.arm(id);
        }
        self.drain(srv);
        more
    }

    /// Hands `id`'s running session out of the router if it may be ([`Relay::hand_out`]):
    /// both connections then forward through their [`Link`]. `true` if it did.
    fn hand_out(&mut self, id: ConnId) -> bool {
        let Some(mut pair) = self.relay.hand_out(id) else {
            return false;
        };
        let [a, b] = pair.conns();
        let (Some(ca), Some(cb)) = (self.conn(a).cloned(), self.conn(b).cloned()) else {
            // A connection without its handle (cannot be: both are live): give it back.
            self.relay.give_back(pair);
            return false;
        };
        let link = Arc::new(Link {
            pair: Mutex::new(Paired {
                pair: None,
                unpublished: 0,
            }),
            ends: [(a, ca.clone()), (b, cb.clone())],
        });
        deliver_wakes(&mut pair, &link);
        lock(&link.pair).pair = Some(pair);
        for (c, conn) in [(a, &ca), (b, &cb)] {
            self.relay.handback_mut().0.insert(c.index(), link.clone());
            *lock(&conn.link) = Some(link.clone());
        }
        true
    }

    /// The peer address for a log line ("gone" once the connection is).
    fn peer_of(&self, id: ConnId) -> String {
        self.conn(id)
            .map_or_else(|| "gone".to_owned(), |c| c.peer.to_string())
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
            c.out
                .push(Chunk::Bytes(Bytes::copy_from_slice(&buf[..t.len]), 0));
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
            if let Some(slot) = self.conns[id.index()].take()
                && slot.armed != NOT_ARMED
            {
                self.timers.remove(&(slot.armed, id));
            }
            self.drain(srv);
        }
        me.out.kill();
    }

    /// Handles the core's events: wakes tasks, starts login checks, logs, counts.
    fn drain(&mut self, srv: &Arc<Server>) {
        while let Some(e) = self.relay.poll_event() {
            match e {
                Event::Wake(c) => {
                    if let Some(conn) = self.conn(c) {
                        conn.out.wake();
                        // Its state changed: a deadline may have come nearer.
                        self.arm(c);
                    }
                }
                Event::Authenticate {
                    conn,
                    user,
                    credential,
                    kind,
                } => {
                    if let Some(me) = self.conn(conn).cloned() {
                        let login = Login {
                            user,
                            credential,
                            kind,
                        };
                        tokio::spawn(authenticate(srv.clone(), conn, me, login));
                    }
                }
                Event::LoggedIn {
                    conn,
                    user,
                    resumed,
                } => {
                    let peer = self.peer_of(conn);
                    srv.board.logged_in(user.as_str(), &peer);
                    tracing::info!(%user, resumed, conn = conn.index(), %peer, "login");
                }
                Event::LoginFailed { conn, user, code } => {
                    let peer = self.peer_of(conn);
                    srv.board
                        .login_failed(user.as_str(), &peer, &code.to_string());
                    tracing::info!(%user, conn = conn.index(), %peer, error = %code, "login refused");
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
                Event::DemandRedirected { from, to, service } => {
                    srv.metrics.demand("redirected");
                    tracing::info!(%from, %to, service = service.as_str(), "demand redirected to the target's node");
                }
                Event::SessionStarted {
                    session,
                    from,
                    to,
                    service,
                } => {
                    srv.metrics.demand("accepted");
                    srv.board.session_started(
                        session,
                        from.as_str(),
                        to.as_str(),
                        service.as_str(),
                    );
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
                    srv.board.session_ended(session);
                    tracing::info!(session, %from, %to, up, down, ?reason, "session ended");
                }
                Event::Offline { user } => {
                    srv.board.offline(user.as_str());
                    tracing::info!(%user, "logged out (offline)")
                }
                e @ (Event::InstanceStarted { .. }
                | Event::InstanceArrived { .. }
                | Event::InstanceEnded { .. }) => srv.auth.instance_changed(e),
            }
        }
        let stats = self.relay.stats();
        srv.metrics
            .logged_in_terminals
            .set(self.relay.terminal_count() as i64);
        srv.metrics
            .active_sessions
            .set(stats.active_sessions as i64);
        let seen = srv.bytes_seen.load(Ordering::Relaxed);
        if stats.bytes_relayed > seen {
            srv.count_bytes(stats.bytes_relayed - seen);
        }
    }
}

impl Server {
    /// The router lock, counted in `relay_router_locks_total`.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.metrics.router_locks.inc();
        // The core is only ever changed through its own methods; a panic in one connection
        // task must not take the whole relay down with a poisoned lock.
        lock(&self.core)
    }

    fn now(&self) -> relay_proto::Instant {
        to_relay_instant(self.epoch, std::time::Instant::now())
    }

    fn count_bytes(&self, n: u64) {
        self.metrics.bytes_relayed.inc_by(n);
        self.bytes_seen.fetch_add(n, Ordering::Relaxed);
    }
}

/// The one timer of all connections: sleeps until the earliest entry of [`Core::timers`]
/// (or until an earlier one is added) and runs what is due. Holds the server only while
/// it runs deadlines, so it ends once the server is gone.
async fn run_timers(srv: Weak<Server>, wake: Arc<Notify>, epoch: std::time::Instant) {
    loop {
        let next = {
            let Some(srv) = srv.upgrade() else { return };
            srv.lock().timers.first().map(|&(at, _)| at)
        };
        match next {
            Some(at) => {
                let at = to_tokio_instant(epoch, relay_proto::Instant::from_millis(at));
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        let Some(srv) = srv.upgrade() else { return };
                        while srv.lock().fire(&srv) {
                            tokio::task::yield_now().await;
                        }
                    }
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Checks a login off the core lock ([`Auth::check`]), then hands the verdict to the core.
async fn authenticate(srv: Arc<Server>, conn: ConnId, me: Arc<Conn>, login: Login) {
    let verdict = srv.auth.check(&login, me.peer).await;
    let mut core = srv.lock();
    if srv.fenced.load(Ordering::Relaxed) {
        // Another node may hold this user ID now: no login here until unfenced.
        return core.finish(&srv, conn, &me);
    }
    if core.is(conn, &me) {
        let now = core.now();
        core.relay.login_verdict(now, conn, verdict);
        core.arm(conn);
        core.drain(&srv);
    }
}

/// How a connection's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The core asked to close; the FIFO was flushed and the socket shut down.
    Closed,
    /// Someone else finished the connection (shutdown, replaced, deleted account).
    Killed,
    /// End of stream, a read or write error, or the core forgot the connection.
    Gone,
}

/// What [`offer`] left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Everything handled (or only a partial control frame is left in the buffer).
    Done,
    /// Payload waits for credit at its receiver; the task is registered for it.
    Stalled,
    /// The core no longer knows this connection.
    Stop,
}

/// A connection's stream: a terminal's, or a published port's client in a requester
/// terminal's place ([`crate::published`]).
type IoStream = Either<ClientStream, PublishedStream>;

/// One connection's I/O, owned by its single task: the socket, the bytes read and not yet
/// handled, and the chunk being written. Both directions are polled by that one task, so
/// a connection costs one task and no second stack of futures.
struct ConnIo {
    stream: IoStream,
    /// Bytes read and not yet handled: a partial control frame, or payload waiting for
    /// credit. Empty (no allocation) while the connection is idle.
    pending: BytesMut,
    /// The last read filled most of a small buffer: read big next time.
    big: bool,
    /// Payload in `pending` waits for credit: offer it again before reading.
    stalled: bool,
    /// The chunk being written (advanced as it goes) and the credit it returns.
    writing: Option<(Bytes, u32)>,
    /// Written since the last flush (TLS keeps records until flushed).
    unflushed: bool,
    /// Written since the core was last asked for output.
    wrote: bool,
    /// The pipe this connection's payload goes through ([`crate::splice`]) and the
    /// receiver it was filled for; only while it forwards.
    #[cfg(target_os = "linux")]
    pipe: Option<(Arc<Pipe>, Arc<Conn>)>,
    /// The pipe chunk being written to this socket and the bytes of it still to go.
    #[cfg(target_os = "linux")]
    splicing: Option<(Arc<Pipe>, usize)>,
    /// The handed-out data path of its session, once seen ([`current_link`]).
    link: Option<Arc<Link>>,
}

impl ConnIo {
    fn new(stream: IoStream) -> Self {
        Self {
            stream,
            pending: BytesMut::new(),
            big: false,
            stalled: false,
            writing: None,
            unflushed: false,
            wrote: false,
            #[cfg(target_os = "linux")]
            pipe: None,
            #[cfg(target_os = "linux")]
            splicing: None,
            link: None,
        }
    }

    /// Drives both directions until neither can make progress (`Pending`) or the
    /// connection ends.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        srv: &Arc<Server>,
        id: ConnId,
        me: &Arc<Conn>,
    ) -> Poll<End> {
        loop {
            if let Poll::Ready(end) = self.poll_write(cx, srv, id, me) {
                return Poll::Ready(end);
            }
            match self.poll_read(cx, srv, id, me) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return Poll::Ready(End::Gone),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes the FIFO in order; when it is empty, pulls control output from the core.
    /// `Pending` when the socket is full or there is nothing to write.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        srv: &Arc<Server>,
        id: ConnId,
        me: &Arc<Conn>,
    ) -> Poll<End> {
        loop {
            if self.writing.is_some()
                && let Err(end) = ready!(self.poll_write_batch(cx, me))
            {
                return Poll::Ready(end);
            }
            #[cfg(target_os = "linux")]
            if self.splicing.is_some()
                && let Err(end) = ready!(self.poll_splice_out(cx, me))
            {
                return Poll::Ready(end);
            }
            match me.out.pop(cx) {
                Next::Chunk(Chunk::Bytes(b, credit)) => self.writing = Some((b, credit)),
                #[cfg(target_os = "linux")]
                Next::Chunk(Chunk::Pipe(pipe, n)) => self.splicing = Some((pipe, n)),
                Next::Stop => return Poll::Ready(End::Killed),
                Next::Close => {
                    let s = Pin::new(&mut self.stream);
                    if ready!(s.poll_flush(cx)).is_ok() {
                        let _ = ready!(Pin::new(&mut self.stream).poll_shutdown(cx));
                    }
                    return Poll::Ready(End::Closed);
                }
                Next::Empty { pull } => {
                    if (pull || std::mem::take(&mut self.wrote))
                        && pull_control(srv, id, me, &mut self.link)
                    {
                        continue;
                    }
                    if self.unflushed {
                        match Pin::new(&mut self.stream).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Writes the chunk under way together with the byte chunks queued behind it, in one
    /// vectored write each time (a DATA header and its payload leave in one system call,
    /// hence one segment). The batch lives on the stack: nothing is kept per connection.
    fn poll_write_batch(&mut self, cx: &mut Context<'_>, me: &Arc<Conn>) -> Poll<Result<(), End>> {
        let mut more: heapless::Vec<(Bytes, u32), { WRITE_BATCH - 1 }> = heapless::Vec::new();
        me.out.pop_more(&mut more);
        let mut next = 0;
        while let Some((chunk, credit)) = &mut self.writing {
            let mut iov = [io::IoSlice::new(&[]); WRITE_BATCH];
            iov[0] = io::IoSlice::new(chunk);
            let mut k = 1;
            for (b, _) in &more[next..] {
                iov[k] = io::IoSlice::new(b);
                k += 1;
            }
            let mut n = match Pin::new(&mut self.stream).poll_write_vectored(cx, &iov[..k]) {
                Poll::Ready(Ok(n)) if n > 0 => n,
                Poll::Ready(_) => return Poll::Ready(Err(End::Gone)),
                Poll::Pending => {
                    me.out.unpop(more.into_iter().skip(next));
                    return Poll::Pending;
                }
            };
            self.unflushed = true;
            self.wrote = true;
            while n > 0 || chunk.is_empty() {
                let step = n.min(chunk.len());
                chunk.advance(step);
                n -= step;
                if !chunk.is_empty() {
                    break;
                }
                me.out.release(*credit);
                match more.get_mut(next) {
                    Some(m) => {
                        (*chunk, *credit) = (std::mem::take(&mut m.0), m.1);
                        next += 1;
                    }
                    None => {
                        self.writing = None;
                        break;
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has and offers it to the core. `Ready(true)`: progress,
    /// `Ready(false)`: the connection is over, `Pending`: nothing to read or stalled.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        srv: &Arc<Server>,
        id: ConnId,
        me: &Arc<Conn>,
    ) -> Poll<bool> {
        if self.stalled {
            match offer(cx, srv, id, me, &mut self.pending, &mut self.link) {
                Step::Stop => return Poll::Ready(false),
                Step::Stalled => return Poll::Pending,
                Step::Done => self.stalled = false,
            }
        }
        #[cfg(target_os = "linux")]
        if self.pending.is_empty()
            && me.splice
            && let Some(p) = self.poll_splice_in(cx, srv, id, me)
        {
            return p;
        }
        let read = self.poll_read_some(cx, me.splice);
        // The socket is quiet: a drained pipe is given back (an idle connection holds none).
        #[cfg(target_os = "linux")]
        if read.is_pending() && self.pipe.as_ref().is_some_and(|(p, _)| p.is_empty()) {
            self.pipe = None;
        }
        match ready!(read) {
            Ok(0) | Err(_) => return Poll::Ready(false),
            Ok(_) => {}
        }
        match offer(cx, srv, id, me, &mut self.pending, &mut self.link) {
            Step::Stop => return Poll::Ready(false),
            Step::Stalled => {
                self.stalled = true;
                return Poll::Pending;
            }
            Step::Done => {}
        }
        if self.pending.is_empty() {
            // Idle again: give the read buffer back (chunks split off it live on).
            self.pending = BytesMut::new();
        } else if self.pending.capacity() > 4 * self.pending.len() + 1024 {
            self.pending = BytesMut::from(&self.pending[..]);
        }
        Poll::Ready(true)
    }

    /// Reads whatever the socket has into `pending` (allocating a buffer only now), or
    /// `Ok(0)` at end of stream. While nothing arrives, no buffer is held. `header_first`:
    /// with nothing pending, read one frame header only, so that a DATA frame's payload
    /// stays in the socket for `splice(2)`.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        header_first: bool,
    ) -> Poll<io::Result<usize>> {
        // Small reads (control frames, keep-alives) get a small buffer: a big transient one
        // per idle connection's keep-alive fragments the heap. Bulk gets READ_BUF.
        let size = if self.big { READ_BUF } else { SMALL_READ_BUF };
        let mut buf = if self.pending.is_empty() {
            if header_first {
                BytesMut::with_capacity(relay_proto::frame::HEADER_LEN)
            } else {
                BytesMut::with_capacity(size)
            }
        } else {
            let mut b = BytesMut::with_capacity(size.max(self.pending.len() * 2));
            b.extend_from_slice(&self.pending);
            b
        };
        let start = buf.len();
        let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity
        // (`ReadBuf::filled`), which start right at `buf.len()`.
        unsafe { buf.set_len(start + n) };
        self.big = n >= SMALL_READ_BUF / 2;
        self.pending = buf;
        Poll::Ready(Ok(n))
    }
}

#[cfg(target_os = "linux")]
impl ConnIo {
    /// The payload under way on this connection, moved socket to pipe when its receiver
    /// takes pipe chunks. `None`: not applicable now (no payload under way, a TLS side, a
    /// receiver gone, no pipe to be had): read and copy instead.
    fn poll_splice_in(
        &mut self,
        cx: &mut Context<'_>,
        srv: &Arc<Server>,
        id: ConnId,
        me: &Arc<Conn>,
    ) -> Option<Poll<bool>> {
        let Either::Left(Either::Right(plain)) = &self.stream else {
            return None;
        };
        let tcp = plain.tcp();
        let (to, remaining, dest) = {
            let core = srv.lock();
            let (to, remaining) = core.relay.forward_target(id)?;
            (to, remaining, core.conn(to)?.clone())
        };
        if !dest.splice {
            return None;
        }
        if !matches!(&self.pipe, Some((_, d)) if Arc::ptr_eq(d, &dest)) {
            // A new receiver gets a new pipe: the old one may still hold the previous
            // receiver's bytes.
            self.pipe = Some((Arc::new(Pipe::new().ok()?), dest.clone()));
        }
        let pipe = self.pipe.as_ref().map(|(p, _)| p.clone())?;
        // Only as much as the pipe takes now: bytes in it always have their chunk queued.
        // Registered before the second look, so a drain in between is not missed.
        if pipe.room() == 0 && (!dest.out.register_sender(cx) || pipe.room() == 0) {
            // A receiver that is gone: the copy path drops the payload.
            return (!dest.out.is_dead()).then_some(Poll::Pending);
        }
        let want = remaining.min(pipe.room());
        let credit = match dest.out.poll_reserve(cx, want) {
            Poll::Pending => return Some(Poll::Pending),
            Poll::Ready(None) => return None,
            Poll::Ready(Some(c)) => c,
        };
        let want = want.min(credit as usize);
        let fd = tcp.as_raw_fd();
        let moved = loop {
            match tcp.poll_read_ready(cx) {
                Poll::Pending => {
                    dest.out.release(credit);
                    return Some(Poll::Pending);
                }
                Poll::Ready(Err(_)) => {
                    dest.out.release(credit);
                    return Some(Poll::Ready(false));
                }
                Poll::Ready(Ok(())) => {}
            }
            // EAGAIN means "socket empty" or "pipe full" (a pipe counts buffers, not
            // bytes). Only an empty pipe makes it the socket's, which may then be marked
            // not ready; otherwise wait for the receiver to drain and try again.
            let r = tcp.try_io(Interest::READABLE, || match pipe.fill(fd, want) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !pipe.is_empty() => Ok(None),
                r => r.map(Some),
            });
            match r {
                Ok(Some(n)) => break n,
                Ok(None) => {
                    dest.out.release(credit);
                    if dest.out.register_sender(cx) && !pipe.is_empty() {
                        return Some(Poll::Pending);
                    }
                    return Some(Poll::Ready(true));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    dest.out.release(credit);
                    return Some(Poll::Ready(false));
                }
            }
        };
        if moved == 0 {
            dest.out.release(credit);
            return Some(Poll::Ready(false));
        }
        let mut core = srv.lock();
        if !core.is(id, me) {
            dest.out.release(credit);
            return Some(Poll::Ready(false));
        }
        let now = core.now();
        let same = core.relay.forward_target(id).map(|t| t.0) == Some(to) && core.is(to, &dest);
        if same {
            // The receiver's pending output (this frame's DATA header) goes first.
            core.flush_control(to);
        }
        core.relay.forwarded(now, id, moved);
        if same {
            dest.out.release(credit - moved as u32);
            dest.out.push(Chunk::Pipe(pipe, moved));
        } else {
            // The payload is dropped (the core says so); so are its bytes, with the pipe.
            dest.out.release(credit);
            self.pipe = None;
        }
        core.arm(id);
        core.drain(srv);
        Some(Poll::Ready(true))
    }

    /// Writes the pipe chunk under way to this socket, giving back credit as it goes.
    fn poll_splice_out(&mut self, cx: &mut Context<'_>, me: &Arc<Conn>) -> Poll<Result<(), End>> {
        let (Some((pipe, left)), Either::Left(Either::Right(plain))) =
            (&mut self.splicing, &self.stream)
        else {
            return Poll::Ready(Err(End::Gone));
        };
        let tcp = plain.tcp();
        let fd = tcp.as_raw_fd();
        while *left > 0 {
            if ready!(tcp.poll_write_ready(cx)).is_err() {
                return Poll::Ready(Err(End::Gone));
            }
            match tcp.try_io(Interest::WRITABLE, || pipe.drain(fd, *left)) {
                Ok(0) => return Poll::Ready(Err(End::Gone)),
                Ok(n) => {
                    *left -= n;
                    me.out.release(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Err(End::Gone)),
            }
        }
        self.splicing = None;
        self.wrote = true;
        Poll::Ready(Ok(()))
    }
}

/// Asks the core for `id`'s control output and queues it. `true` if it queued anything
/// (or a close).
fn pull_control(
    srv: &Arc<Server>,
    id: ConnId,
    me: &Arc<Conn>,
    cache: &mut Option<Arc<Link>>,
) -> bool {
    if let Some(link) = current_link(cache, me) {
        let mut guard = lock(&link.pair);
        if let Some(pair) = guard.pair.as_mut() {
            let mut buf = [0u8; MIN_TRANSMIT_BUF];
            let n = pair.poll_transmit(id, &mut buf).unwrap_or(0);
            if n > 0 {
                me.out
                    .push(Chunk::Bytes(Bytes::copy_from_slice(&buf[..n]), 0));
            }
            deliver_wakes(pair, link);
            return n > 0;
        }
        drop(guard);
        *cache = None;
    }
    let mut core = srv.lock();
    if !core.is(id, me) {
        return false;
    }
    let pushed = core.flush_control(id);
    core.drain(srv);
    pushed
}

/// One client connection, from accept to close, in one task. The setup runs now; the
/// future keeps only what the connection needs while it lives (its size is part of every
/// connection's memory).
fn connection(
    srv: Arc<Server>,
    accepted: Accepted,
    handshake: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    let Accepted {
        stream,
        peer,
        login_deadline,
        slot,
    } = accepted;
    let splice = srv.splice && cfg!(target_os = "linux") && matches!(stream, Either::Right(_));
    // One deadline for TLS and login: the core counts from the TCP accept.
    let since = login_deadline.into_std() - handshake;
    run_connection(srv, Either::Left(stream), peer, slot, splice, move |core| {
        let at = to_relay_instant(core.epoch, since);
        core.relay.accept(at)
    })
}

/// A client of published port `port`: a session the relay requests itself
/// ([`Relay::demand_local`]), its bytes carried by a [`PublishedStream`].
fn published_connection(
    srv: Arc<Server>,
    port: &Published,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    limits: &Limits,
) -> impl Future<Output = ()> + Send + 'static + use<> {
    let _ = tcp.set_nodelay(true);
    let stream = PublishedStream::new(tcp, limits.keepalive_interval, limits.max_frame_payload);
    let demand = Demand {
        target: port.target.clone(),
        service: port.service.clone(),
    };
    run_connection(srv, Either::Right(stream), peer, slot, false, move |core| {
        let now = core.now();
        core.relay.demand_local(now, published_requester(), demand)
    })
}

/// The user ID published ports' sessions are requested as ([`crate::published::REQUESTER`]).
fn published_requester() -> UserId {
    UserId::new(crate::published::REQUESTER).expect("a constant that passes the user ID rules")
}

/// Registers a connection made by `open` (under the router lock) and runs its task.
fn run_connection(
    srv: Arc<Server>,
    stream: IoStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    splice: bool,
    open: impl FnOnce(&mut Core) -> Result<ConnId, relay::RelayError>,
) -> impl Future<Output = ()> + Send + 'static {
    let me = Arc::new(Conn {
        out: Fifo::new(),
        peer,
        splice,
        link: Mutex::new(None),
    });
    let id = {
        let mut core = srv.lock();
        match open(&mut core) {
            Ok(id) => {
                let i = id.index();
                if core.conns.len() <= i {
                    core.conns.resize_with(i + 1, || None);
                }
                core.conns[i] = Some(Slot {
                    conn: me.clone(),
                    armed: NOT_ARMED,
                });
                core.arm(id);
                // A local demand has already made events (its result, a notice).
                core.drain(&srv);
                Some(id)
            }
            Err(e) => {
                tracing::warn!(%peer, "connection refused: {e:?}");
                None
            }
        }
    };
    match &stream {
        Either::Left(Either::Right(plain)) => me.out.attach(Direct::Frames(plain.writer())),
        Either::Right(published) => me.out.attach(Direct::Payload(published.writer())),
        Either::Left(Either::Left(_)) => {}
    }
    let mut io = id.map(|_| ConnIo::new(stream));
    async move {
        if let (Some(id), Some(io)) = (id, &mut io) {
            poll_fn(|cx| io.poll(cx, &srv, id, &me)).await;
            srv.lock().finish(&srv, id, &me);
        }
        drop(slot);
    }
}

/// The published ports' listeners, by address: each task follows its table through a
/// watch, so that SIGHUP changes a port in place, closes a removed one (`None`; its
/// running sessions go on) and opens a new one.
struct PublishedPorts {
    running: Mutex<HashMap<SocketAddr, watch::Sender<Option<Published>>>>,
    slots: Arc<Semaphore>,
    /// The limits at start: the core's keep-alive interval and payload bound.
    limits: Limits,
    stop: watch::Receiver<bool>,
    workers: Arc<Workers>,
}

impl PublishedPorts {
    /// Makes the open ports those of `ports` and the relay's reach their targets. A port
    /// that cannot be opened is an error (at start, fatal; on SIGHUP, logged).
    fn set(&self, srv: &Arc<Server>, ports: &[Published]) -> anyhow::Result<()> {
        let mut running = lock(&self.running);
        running.retain(|addr, tx| {
            let keep = ports.iter().any(|p| p.listen == *addr);
            if !keep {
                let _ = tx.send(None);
                tracing::warn!(listen = %addr, "published port closed");
            }
            keep
        });
        let mut result = Ok(());
        for port in ports {
            if let Some(tx) = running.get(&port.listen) {
                let changed = tx.send_if_modified(|old| {
                    let changed = old.as_ref() != Some(port);
                    *old = Some(port.clone());
                    changed
                });
                if changed {
                    announce(port);
                }
                continue;
            }
            match self.open(srv, port) {
                Ok(tx) => {
                    running.insert(port.listen, tx);
                }
                Err(e) => result = Err(e),
            }
        }
        srv.lock().relay.policy_mut().1 = published_targets(ports);
        result
    }

    fn open(
        &self,
        srv: &Arc<Server>,
        port: &Published,
    ) -> anyhow::Result<watch::Sender<Option<Published>>> {
        let listen = port.listen;
        let bound = std::net::TcpListener::bind(listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .with_context(|| format!("published port {listen}"))?;
        announce(port);
        let (tx, rx) = watch::channel(Some(port.clone()));
        tokio::spawn(run_published(
            srv.clone(),
            bound,
            rx,
            self.slots.clone(),
            self.limits.clone(),
            self.stop.clone(),
            self.workers.clone(),
        ));
        Ok(tx)
    }
}

/// The loud line each published port gets when it opens or changes.
fn announce(port: &Published) {
    let allow: Vec<String> = port.allow.iter().map(ToString::to_string).collect();
    tracing::warn!(
        listen = %port.listen,
        target = %port.target,
        service = port.service.as_str(),
        allow = %allow.join(","),
        "PUBLISHED PORT: plain TCP clients from these networks reach this service without an account"
    );
}

/// Accepts a published port's clients until `stop` or until its table is gone: those
/// from outside its allow-list are closed at once and counted, the others become
/// sessions.
async fn run_published(
    srv: Arc<Server>,
    listener: TcpListener,
    mut table: watch::Receiver<Option<Published>>,
    slots: Arc<Semaphore>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    workers: Arc<Workers>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = crate::listen::stop_requested(&mut stop) => return,
            changed = table.changed() => match changed {
                Ok(()) if table.borrow().is_some() => continue,
                _ => return,
            },
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("published port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(port) = table.borrow().clone() else {
            return;
        };
        if !port.admits(peer.ip()) {
            srv.metrics.published_refused.inc();
            tracing::info!(%peer, listen = %port.listen, "published port: source not allowed, closed");
            continue;
        }
        let Some(slot) = ConnectionSlot::take(&slots, &srv.metrics) else {
            tracing::debug!(%peer, "connection refused: max_total_connections reached");
            continue;
        };
        let (srv, limits) = (srv.clone(), limits.clone());
        workers.spawn_with(tcp, move |tcp| {
            published_connection(srv, &port, tcp, peer, slot, &limits)
        });
    }
}

/// Tells the pair's connections with new output ([`Pair::poll_wake`]).
fn deliver_wakes(pair: &mut Pair, link: &Link) {
    while let Some(c) = pair.poll_wake() {
        if let Some(end) = link.end(c) {
            end.out.wake();
        }
    }
}

/// Offers `buf` until it is used up, only a partial frame is left, payload must wait for
/// credit at its receiver (then `cx` is woken when credit comes back), or frames behind a
/// LOGIN wait for its verdict (woken by the verdict's `Wake`). A paired session's bytes go
/// to its handed-out [`Pair`] under that pair's lock alone; the rest, and whatever the
/// pair gives back, to the router under the core lock. Either way payload is pushed into
/// the receiver's FIFO under the lock that ordered it.
fn offer(
    cx: &mut Context<'_>,
    srv: &Arc<Server>,
    id: ConnId,
    me: &Arc<Conn>,
    buf: &mut BytesMut,
    cache: &mut Option<Arc<Link>>,
) -> Step {
    loop {
        let mut finished = false;
        if let Some(link) = current_link(cache, me) {
            match offer_paired(cx, srv, link, id, buf) {
                ViaPair::Done(step) => return step,
                ViaPair::Router => {}
                ViaPair::Finished => {
                    finished = true;
                    *cache = None;
                }
                ViaPair::Gone => *cache = None,
            }
        }
        match offer_router(cx, srv, id, me, buf, finished) {
            // Handed out meanwhile: the rest goes to the pair.
            None => continue,
            Some(step) => return step,
        }
    }
}

/// The link this connection's bytes go through: the task's own copy (`cache`), read from
/// the connection's slot only while it has none. The router fills the slot when it hands
/// the session out; the task forgets its copy once it finds the pair taken back.
fn current_link<'a>(cache: &'a mut Option<Arc<Link>>, me: &Conn) -> Option<&'a Arc<Link>> {
    if cache.is_none() {
        *cache = me.linked();
    }
    cache.as_ref()
}

/// [`offer`] through the pair. Unless `Done`, the bytes from the frame the pair does not
/// take on are left in `buf`.
fn offer_paired(
    cx: &mut Context<'_>,
    srv: &Arc<Server>,
    link: &Link,
    id: ConnId,
    buf: &mut BytesMut,
) -> ViaPair {
    let mut guard = lock(&link.pair);
    let Paired { pair, unpublished } = &mut *guard;
    let Some(pair) = pair.as_mut() else {
        return ViaPair::Gone;
    };
    let now = srv.now();
    let mut relayed = 0;
    let step = loop {
        if buf.is_empty() {
            break ViaPair::Done(Step::Done);
        }
        let target = pair
            .forward_target(id)
            .and_then(|(to, remaining)| Some((to, remaining, link.end(to)?)));
        let Some((to, remaining, dest)) = target else {
            match pair.handle_input(now, id, buf) {
                PairOffer::Consumed(n) => buf.advance(n),
                PairOffer::NeedMore => break ViaPair::Done(Step::Done),
                PairOffer::Finished(n) => {
                    buf.advance(n);
                    break ViaPair::Finished;
                }
                // (`Forward` only with a target, handled below.)
                PairOffer::Router | PairOffer::Forward { .. } => break ViaPair::Router,
            }
            continue;
        };
        let m = buf.len().min(remaining);
        let Poll::Ready(credit) = dest.out.poll_reserve(cx, m) else {
            break ViaPair::Done(Step::Stalled);
        };
        let credit = credit.unwrap_or(0);
        // The receiver's DATA header first (see `offer_router`): taken before the input,
        // queued with the payload when it goes to the same receiver (usually written to
        // its socket with it, [`Fifo::push_frame`]), or alone before anything else.
        let mut out = [0u8; MIN_TRANSMIT_BUF];
        let head = match pair.poll_transmit(to, &mut out) {
            Ok(n @ 1..) => Bytes::copy_from_slice(&out[..n]),
            _ => Bytes::new(),
        };
        let offered = pair.handle_input(now, id, &buf[..m]);
        if let PairOffer::Forward { to: t, n } = offered
            && t == to
        {
            let used = credit.min(n as u32);
            dest.out.release(credit - used);
            relayed += n as u64;
            dest.out.push_frame(head, chunk_of(buf, n), used);
            continue;
        }
        if !head.is_empty() {
            dest.out.push(Chunk::Bytes(head, 0));
        }
        match offered {
            PairOffer::Forward { to: t, n } => {
                let chunk = chunk_of(buf, n);
                dest.out.release(credit);
                relayed += n as u64;
                if let Some(c) = link.end(t) {
                    c.out.push(Chunk::Bytes(chunk, 0));
                }
            }
            PairOffer::Consumed(n) => {
                buf.advance(n);
                dest.out.release(credit);
            }
            PairOffer::NeedMore => {
                dest.out.release(credit);
                break ViaPair::Done(Step::Done);
            }
            // (`Finished` only for a TERMINATE, never with a payload under way.)
            PairOffer::Router | PairOffer::Finished(_) => {
                dest.out.release(credit);
                break ViaPair::Router;
            }
        }
    };
    deliver_wakes(pair, link);
    *unpublished += relayed;
    let publish = if *unpublished >= PUBLISH_BYTES {
        std::mem::take(unpublished)
    } else {
        0
    };
    drop(guard);
    if publish > 0 {
        srv.count_bytes(publish);
    }
    step
}

/// [`offer`] through the router, under the core lock. `None`: the connection's session
/// was just handed out; offer the rest to its pair. `finished`: the connection's pair
/// finished its session ([`ViaPair::Finished`]): the router takes it back first, which
/// ends the session.
fn offer_router(
    cx: &mut Context<'_>,
    srv: &Arc<Server>,
    id: ConnId,
    me: &Arc<Conn>,
    buf: &mut BytesMut,
    finished: bool,
) -> Option<Step> {
    let mut core = srv.lock();
    if !core.is(id, me) {
        return Some(Step::Stop);
    }
    if finished {
        core.relay.take_back(id);
    }
    let now = core.now();
    let step = loop {
        if buf.is_empty() {
            break Some(Step::Done);
        }
        if !srv.splice && core.hand_out(id) {
            break None;
        }
        let target = core
            .relay
            .forward_target(id)
            .and_then(|(to, remaining)| Some((to, remaining, core.conn(to)?.clone())));
        let Some((to, remaining, dest)) = target else {
            match core.relay.handle_input(now, id, buf) {
                Offer::Consumed(n) => buf.advance(n),
                Offer::NeedMore => break Some(Step::Done),
                // Frames behind a LOGIN under check: the verdict's wake polls us again.
                Offer::Hold => break Some(Step::Stalled),
                Offer::Forward { to, n } => {
                    // Only when the receiver has no handle any more: nothing to write.
                    let chunk = chunk_of(buf, n);
                    if let Some(c) = core.conn(to) {
                        c.out.push(Chunk::Bytes(chunk, 0));
                    }
                }
            }
            continue;
        };
        // Room at the receiver first: this is the backpressure. Our own deadline keeps
        // running meanwhile (a receiver that takes nothing for the whole keep-alive
        // deadline ends the session, as the core documents).
        let m = buf.len().min(remaining);
        let Poll::Ready(credit) = dest.out.poll_reserve(cx, m) else {
            break Some(Step::Stalled);
        };
        let credit = credit.unwrap_or(0);
        // The receiver's pending output (this frame's DATA header) goes first. Not after
        // `handle_input`: the last chunk of a frame unlocks the receiver, and control frames
        // queued meanwhile (a keep-alive ack, TERMINATE) must follow the payload.
        core.flush_control(to);
        match core.relay.handle_input(now, id, &buf[..m]) {
            Offer::Forward { to: t, n } => {
                let chunk = chunk_of(buf, n);
                let used = if t == to { credit.min(n as u32) } else { 0 };
                dest.out.release(credit - used);
                if let Some(c) = core.conn(t) {
                    c.out.push(Chunk::Bytes(chunk, used));
                }
            }
            Offer::Consumed(n) => {
                buf.advance(n);
                dest.out.release(credit);
            }
            // (`Hold` only before login, never with a payload under way.)
            Offer::NeedMore | Offer::Hold => {
                dest.out.release(credit);
                break Some(Step::Done);
            }
        }
    };
    core.arm(id);
    core.drain(srv);
    step
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

/// Carries out the operator's dashboard requests through the core.
async fn carry_out(srv: Weak<Server>, mut requests: mpsc::UnboundedReceiver<AdminRequest>) {
    while let Some(request) = requests.recv().await {
        let Some(srv) = srv.upgrade() else { return };
        match request {
            AdminRequest::Kick(name) => match UserId::new(&name) {
                Ok(user) => {
                    tracing::info!(user = %name, "kicked from the dashboard");
                    let mut core = srv.lock();
                    core.relay.kick_user(&user);
                    core.drain(&srv);
                }
                Err(e) => tracing::warn!("dashboard: no such user ID '{name}': {e:?}"),
            },
            AdminRequest::EndSession(session) => {
                let mut core = srv.lock();
                let ended = core.relay.close_session(session);
                core.drain(&srv);
                match ended {
                    true => tracing::info!(session, "session ended from the dashboard"),
                    false => tracing::info!(session, "dashboard: no such session (ended already?)"),
                }
            }
            AdminRequest::CountBytes => {
                // Handed-out pairs come back first: their figures are theirs until then.
                let mut core = srv.lock();
                core.relay.take_back_all();
                srv.board.counted(core.relay.session_bytes());
                core.drain(&srv);
            }
        }
    }
}

/// Newest wins across relays (docs/CLUSTER.md, part 4): a reachable instance another
/// relay recorded after this one's ends the instance of that user ID here: another
/// instance as a local password login would end it (ERROR `Replaced`), the same one (it
/// moved there) without a frame.
fn replace_from_elsewhere(
    srv: Weak<Server>,
    store: &dyn AccountStore,
) -> impl Future<Output = ()> + use<> {
    let (tx, mut moved) = mpsc::unbounded_channel();
    store.watch_presence(tx);
    async move {
        while let Some(p) = moved.recv().await {
            let Some(srv) = srv.upgrade() else { return };
            let Ok(user) = UserId::new(&p.account) else {
                continue;
            };
            if !srv.auth.outranked(&p.account, p.epoch) {
                continue;
            }
            let mut core = srv.lock();
            if core.relay.replace_user(&user, p.instance) {
                srv.metrics.replaced_from_elsewhere.inc();
                tracing::info!(%user, instance = p.instance, epoch = p.epoch, "reachable on another relay now: its instance here ended");
            }
            core.drain(&srv);
        }
    }
}

/// Fencing (docs/CLUSTER.md, part 6): while this node cannot write its heartbeat, the
/// others may count it dead and let its user IDs log in elsewhere, so it closes every
/// connection (ERROR `ShuttingDown`: terminals move to their next relay) and refuses
/// logins ([`authenticate`]) until a heartbeat is written again.
async fn fence(srv: Weak<Server>, mut fencing: watch::Receiver<bool>) {
    loop {
        let fenced = *fencing.borrow_and_update();
        let Some(srv) = srv.upgrade() else { return };
        {
            let mut core = srv.lock();
            srv.fenced.store(fenced, Ordering::Relaxed);
            srv.metrics.fenced.set(i64::from(fenced));
            if fenced {
                core.relay.shutdown();
                core.drain(&srv);
            }
        }
        drop(srv);
        if fencing.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the relay until SIGTERM/SIGINT. Blocks the calling thread. `on_stop` runs (on a
/// blocking thread) when the signal arrives, before the drain: a cluster node marks
/// itself draining there.
pub fn run(
    config: ServeConfig,
    store: Arc<dyn AccountStore>,
    reloader: Reloader,
    presence: Option<Arc<Presence>>,
    on_stop: Box<dyn FnOnce() + Send>,
) -> anyhow::Result<()> {
    // Blocking work is argon2 (CPU and 19 MiB each, at most one per core at a time) and
    // short store queries: more threads than cores buys nothing, and tokio's default
    // (512 per runtime) lets a login burst start hundreds of threads, each with its stack
    // and malloc arena, that outlive the burst.
    // Each runtime has its own pool: the bound is split between them.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = config.worker_threads.unwrap_or(cores);
    let blocking = (2 * cores).max(4).div_ceil(threads).max(2);
    let rt = workers::runtime(blocking)?;
    let workers = Arc::new(Workers::start(rt.handle().clone(), threads, blocking)?);
    let served = rt.block_on(serve(
        config,
        store,
        reloader,
        presence,
        workers.clone(),
        async {
            if let Err(e) = crate::listen::shutdown_signal().await {
                tracing::warn!("cannot watch for signals: {e}");
                std::future::pending::<()>().await;
            }
            if let Err(e) = tokio::task::spawn_blocking(on_stop).await {
                tracing::warn!("marking the drain failed: {e}");
            }
        },
    ));
    drop(rt);
    if let Some(workers) = Arc::into_inner(workers) {
        workers.stop();
    }
    served
}

/// The relay server until `stop` resolves; then a clean shutdown. SIGHUP reloads the
/// configuration through `reloader`.
pub async fn serve(
    config: ServeConfig,
    store: Arc<dyn AccountStore>,
    reloader: Reloader,
    presence: Option<Arc<Presence>>,
    workers: Arc<Workers>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = config.limits.clone();
    let mut metrics = Metrics::new();
    if let Some(p) = &presence {
        metrics.cluster_node(p.me(), &config.advertised(), p.alive_gauge());
    }
    let metrics = Arc::new(metrics);
    let refresh_accounts = Arc::new(tokio::sync::Notify::new());
    let accounts = watch_accounts_with(
        store.clone(),
        Duration::from_secs(1),
        refresh_accounts.clone(),
    )?;
    let policy = SnapshotPolicy(
        accounts.borrow().clone(),
        published_targets(&config.published),
        presence,
    );
    let epoch = std::time::Instant::now();
    let timer_wake = Arc::new(Notify::new());
    let (board, admin_requests) = Board::new()?;
    let board = Arc::new(board);
    let srv = Arc::new(Server {
        core: Mutex::new(Core {
            relay: Relay::new(core_config(&limits), policy),
            conns: Vec::new(),
            timers: BTreeSet::new(),
            timer_wake: timer_wake.clone(),
            epoch,
        }),
        epoch,
        bytes_seen: AtomicU64::new(0),
        auth: Auth::new(
            store.clone(),
            &limits,
            metrics.clone(),
            accounts.clone(),
            refresh_accounts,
        )?,
        metrics: metrics.clone(),
        splice: config.splice,
        board: board.clone(),
        fenced: Default::default(),
    });
    tokio::spawn(carry_out(Arc::downgrade(&srv), admin_requests));
    tokio::spawn(run_timers(Arc::downgrade(&srv), timer_wake, epoch));

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
                core.relay.policy_mut().0 = newer.clone();
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

    tokio::spawn(replace_from_elsewhere(Arc::downgrade(&srv), store.as_ref()));
    if let Some(fencing) = store.fencing() {
        tokio::spawn(fence(Arc::downgrade(&srv), fencing));
    }

    if let Some(addr) = config.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        let metrics = metrics.clone();
        let dashboard = Arc::new(crate::metrics::Dashboard {
            board,
            access: crate::admin::Access {
                listen: addr,
                token: config.admin_token.clone(),
            },
        });
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, metrics, dashboard).await {
                tracing::warn!("metrics server: {e}");
            }
        });
    }

    let slots = Arc::new(Semaphore::new(limits.max_total_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let published = Arc::new(PublishedPorts {
        running: Mutex::new(HashMap::new()),
        slots: slots.clone(),
        limits: limits.clone(),
        stop: stop_rx.clone(),
        workers: workers.clone(),
    });
    published.set(&srv, &config.published)?;
    let mut acceptors = Vec::new();
    let tls = reloader.tls_config()?;
    tokio::spawn({
        let srv = srv.clone();
        let published = published.clone();
        reloader.run(move |old, new| {
            srv.auth.reconfigure(&old.limits, &new.limits);
            if let Err(e) = published.set(&srv, &new.published) {
                tracing::error!("SIGHUP: {e:#}");
            }
        })
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let channel = crate::channel::ChannelKeys::load_or_generate(&config.db)?;
    acceptors.push(
        Acceptor::new(
            listener,
            Some(tls),
            slots.clone(),
            limits.handshake_timeout,
            metrics.clone(),
        )
        .with_channel(Arc::new(channel))
        .spread_over(workers.clone()),
    );
    if let Some(plain) = config.allow_plain {
        let listener = TcpListener::bind(plain)
            .await
            .with_context(|| format!("listening on {plain}"))?;
        tracing::warn!(%plain, "PLAIN TCP listener: passwords and data on it are NOT encrypted");
        acceptors.push(
            Acceptor::new(
                listener,
                None,
                slots.clone(),
                limits.handshake_timeout,
                metrics.clone(),
            )
            .spread_over(workers.clone()),
        );
    }
    let mut tasks = Vec::new();
    for a in acceptors {
        let addr = a.local_addr()?;
        tracing::info!(%addr, tls = a.is_tls(), "listening");
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
    srv.auth.flush().await;
    tracing::info!("relay stopped");
    Ok(())
}
