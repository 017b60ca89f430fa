//! The relay's core: every protocol decision of the server, sans-IO.
//!
//! The host accepts TCP connections and gives each a [`ConnId`] from [`Relay::accept`].
//! It feeds received bytes to [`Relay::handle_input`], writes what
//! [`Relay::poll_transmit`] produces, runs [`Relay::handle_timeout`] at
//! [`Relay::poll_timeout`], reports closed sockets with [`Relay::closed`], and drains
//! [`Relay::poll_event`] after every call. Logins are checked by the host (the account
//! store and its costly hash are the host's): [`Event::Authenticate`] asks,
//! [`Relay::login_verdict`] answers, so the hash never runs inside the core.
//!
//! ## The forwarding contract
//!
//! Once two connections are paired, DATA payload never passes through the core's memory.
//! When `handle_input` on A meets a DATA header it queues the same header on B and
//! returns `Consumed(3)`; for the payload bytes that follow it returns
//! [`Offer::Forward`]` { to: B, n }`. The host must then first write everything
//! `poll_transmit(B)` gives (that includes the header), then the `n` bytes, unchanged,
//! on B. While a payload is under way B's other output waits, so frames never interleave.
//! A host that knows the remaining count ([`Relay::forward_remaining`]) may move the bytes
//! any way it likes (one copy, `splice(2)`) and report them with
//! [`Relay::forwarded`].
//!
//! ## The router and its pairs
//!
//! A running session's DATA, KEEPALIVEs and TERMINATEs touch only its two connections'
//! framing, keep-alive and forwarding state (`conn::Wire`). A host that runs connections
//! in parallel takes that state out with [`Relay::hand_out`] as a [`Pair`] and forwards
//! the session's bytes through it without the router; every other frame, and every
//! transition of the router that touches those connections, brings the pair back first
//! (through the host's [`Handback`], see `pair.rs`). The session's end, once both sides
//! sent TERMINATE, is the router's: the pair says so ([`PairOffer::Finished`]) and the
//! router applies it when it gets the pair back. The wire transitions are one code for
//! both.
//!
//! ## Output without buffers
//!
//! A connection's pending output is a handful of flags and small fields (an ack to send,
//! a notice, a result, a release), encoded only when `poll_transmit` is called. So the
//! core holds no per-connection byte buffers and an idle connection costs one table entry.
//!
//! ## No event is lost
//!
//! Wakes are a list threaded through the connection table (`wakes.rs`), so any number of
//! connections can be woken by one call (a user with hundreds of connections removed)
//! without a queue to overflow. The other events of one call are bounded by
//! [`max_events_per_call`] and the event queue holds that many (fixed storage refuses to
//! build with less): a host that drains after every call never loses one. Which
//! instances a user ID has (one reachable, several requesters) is in `instances.rs`.

mod conn;
mod instances;
mod local;
mod pair;
mod storage;
mod wakes;

pub use storage::{Fixed, FixedIndex, FixedSlab, Queue, Slab, Storage, UserIndex};
#[cfg(feature = "std")]
pub use storage::{Heap, HeapSlab};

use conn::{Acks, Answer, Forward, Out, Outbound, Passed, Phase, State};
pub use conn::{ConnEntry, ConnId};
use heapless::Vec;
pub use instances::Kind;
use instances::{Admitted, RELAY_CAPS};
pub use local::LOCAL_INSTANCE;
pub use pair::{Handback, NoPairs, Pair, PairOffer};
use wakes::Lists;

use crate::codes::{DemandError, ErrorCode, ReleaseReason};
use crate::frame::{
    self, Credential, Demand, DemandResult, Frame, ListAnswer, LoginOk, Notice, Parsed, caps,
};
use crate::ident::{ResumeToken, ServiceName, Text, UserId};
use crate::time::{Duration, Instant, earliest};

/// Terminals and other nodes' user IDs one LIST_ANSWER page looks at, at most (the access
/// rule filters them).
pub const LIST_SCAN: usize = 256;
/// "No entry" in the intrusive lists below (a terminal's connections, its waiting demands).
const NIL: u32 = u32::MAX;
/// A `poll_transmit` buffer must hold this much: the largest burst of control frames.
pub const MIN_TRANSMIT_BUF: usize = 4 * frame::MAX_CONTROL_FRAME;

/// The most events (other than [`Event::Wake`]) one call into a core with `conns`
/// connections can queue: one per connection it touches (each session, demand or login
/// ends or starts on one connection's account), plus `Replaced` and `Offline` of one
/// terminal and `Offline` of another. A [`Storage`]'s event queue holds at least this.
pub const fn max_events_per_call(conns: usize) -> usize {
    conns + 3
}

/// Relay settings. Every bound has a safe default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Keep-alive interval announced to terminals.
    pub keepalive_interval: Duration,
    /// A logged-in connection that sends nothing for this long is closed.
    pub keepalive_timeout: Duration,
    /// A connection that has not logged in this long after accept is closed.
    pub handshake_timeout: Duration,
    /// A target that does not answer a notice within this is given up on.
    pub demand_timeout: Duration,
    /// Largest DATA payload accepted (announced in LOGIN_OK).
    pub max_frame_payload: u16,
    /// Connections one terminal may hold: its sessions plus its spares. A terminal's
    /// connections are a list threaded through the connection table, so this costs
    /// nothing until used.
    pub max_connections_per_account: u16,
    /// Sessions (pending, waiting for an idle connection, and running) one terminal may
    /// take part in.
    pub max_sessions_per_account: u16,
    /// Failed logins on one connection before it is closed.
    pub max_login_attempts: u8,
    /// Requester instances (LOGIN with [`crate::frame::caps::REQUESTER`]) one user ID may run at once,
    /// beside its one reachable instance. Past it a new one gets ERROR
    /// `TooManyConnections`.
    pub max_requesters_per_account: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(90),
            handshake_timeout: Duration::from_secs(10),
            demand_timeout: Duration::from_secs(10),
            max_frame_payload: u16::MAX,
            max_connections_per_account: 256,
            max_sessions_per_account: 128,
            max_login_attempts: 3,
            max_requesters_per_account: 16,
        }
    }
}

/// The relay's access rule: may `from` reach `to`? The host implements it over its
/// account store; the target may still reject on top of it.
pub trait Policy {
    fn may_reach(&self, from: &UserId, to: &UserId) -> bool;

    /// Where `user`, who has no reachable instance on this relay, is reachable instead:
    /// another node of the same service (relay-host: from the cluster's presence rows).
    /// Asked only for a requester that may reach `user` and announced
    /// [`caps::REDIRECT`]; it must answer at once, from memory (the core is synchronous).
    /// A single relay has no other node.
    fn locate(&self, user: &UserId) -> Option<Node> {
        let _ = user;
        None
    }

    /// The address and certificate of `node`, asked when its redirect is written, so a
    /// connection's entry holds a 4-byte name rather than the whole redirect. `None` (the
    /// node died meanwhile): the requester gets `TargetOffline`.
    fn node(&self, node: Node) -> Option<frame::Redirect> {
        let _ = node;
        None
    }

    /// The first user ID reachable on another live node of the service at or after
    /// position `from` of the host's list of them, with its position, so that the online
    /// list (LIST_ANSWER) covers the whole service, not only this relay. A position must
    /// stay the user ID's while it is listed (a cursor points at it) and be below
    /// [`REMOTE_POSITIONS`]. The core applies the access rule and lists a user ID that is
    /// also reachable here once; it asks at most [`LIST_SCAN`] times per page, from
    /// memory (the core is synchronous). A single relay has no other node.
    fn remote(&self, from: u32) -> Option<(u32, UserId)> {
        let _ = from;
        None
    }
}

/// Positions of [`Policy::remote`] are below this. A LIST cursor at or above
/// [`REMOTE_CURSOR`] points into them, one below it at a terminal of this relay: one
/// `u32` on the wire, the local terminals first.
pub const REMOTE_POSITIONS: u32 = 1 << 31;
/// The first cursor of the other nodes' user IDs (docs/PROTOCOL.md §3.4).
pub const REMOTE_CURSOR: u32 = REMOTE_POSITIONS;

/// Another node of the relay service, as the host names it ([`Policy::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node(pub u32);

/// Everyone may reach everyone.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn may_reach(&self, _: &UserId, _: &UserId) -> bool {
        true
    }
}

/// The host's answer to [`Event::Authenticate`].
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The credential is good. `instance` names this run of the terminal: a fresh random
    /// value for a password login, the one inside the token for a resumption. `token` is
    /// the credential for the terminal's further connections.
    Accept { instance: u64, token: ResumeToken },
    /// Refused; the core chooses the ERROR code and text from the reason.
    Refuse(Refusal),
}

/// Why the host refused a login. The core turns it into the ERROR the terminal gets
/// (docs/PROTOCOL.md §5.1), so every host words a refusal the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A wrong user ID or password, or a token that is not genuine, expired or for no
    /// account: `AuthFailed` to a password, `ResumeRejected` to a token.
    BadCredential,
    /// A genuine token the host revoked (its instance logged out, the account's password
    /// changed, the account was deleted): `ResumeRejected`.
    TokenRevoked,
    /// A genuine token of an instance that a newer password login replaced: `Replaced`,
    /// so that instance stops instead of replacing the newer one with its password.
    Replaced,
    /// Too many failed logins from this source: `Throttled`, saying when to retry.
    Throttled { retry_after: Duration },
}

/// How an instance of a terminal ended ([`Event::InstanceEnded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceEnd {
    /// The terminal sent LOGOUT.
    LoggedOut,
    /// A newer password login of the same user ID replaced it.
    Replaced,
}

/// What the host must do, or may log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `conn` has output (or must close): call [`Relay::poll_transmit`].
    Wake(ConnId),
    /// Check this credential and answer with [`Relay::login_verdict`].
    Authenticate {
        conn: ConnId,
        user: UserId,
        credential: Credential,
        /// The kind of instance the LOGIN asks for ([`caps::REQUESTER`]): a host that
        /// tracks the reachable instance (for [`Refusal::Replaced`]) checks only those.
        kind: Kind,
    },
    LoggedIn {
        conn: ConnId,
        user: UserId,
        resumed: bool,
    },
    LoginFailed {
        conn: ConnId,
        user: UserId,
        code: ErrorCode,
    },
    /// A password login replaced the reachable instance of `user`.
    Replaced { user: UserId },
    /// A password login started a new reachable instance of `user` (a host that revokes
    /// tokens makes `instance` the only one that `user`'s reachable tokens may start).
    /// Requester instances are not reported: they replace nothing and are never replaced.
    InstanceStarted { user: UserId, instance: u64 },
    /// A resumption brought reachable instance `instance` of `user` to this relay, which
    /// did not run it (it ran on another relay of a cluster, or before a restart). A host
    /// that records where instances run (relay-host's presence, docs/CLUSTER.md) records
    /// it here; its tokens stay as they were.
    InstanceArrived { user: UserId, instance: u64 },
    /// An instance ended for good (LOGOUT, or a reachable one replaced): its tokens must
    /// not start it again.
    InstanceEnded {
        user: UserId,
        instance: u64,
        how: InstanceEnd,
        kind: Kind,
    },
    /// A demand was answered with a redirect to the node `to` is on
    /// ([`Policy::locate`]); the requester demands again there.
    DemandRedirected {
        from: UserId,
        to: UserId,
        service: ServiceName,
    },
    /// A demand was refused (accepted ones give [`Event::SessionStarted`]).
    DemandFailed {
        from: UserId,
        to: UserId,
        service: ServiceName,
        error: DemandError,
    },
    SessionStarted {
        session: u32,
        from: UserId,
        to: UserId,
        service: ServiceName,
    },
    /// `up`: payload bytes from the requester to the target; `down`: the other way.
    SessionEnded {
        session: u32,
        from: UserId,
        to: UserId,
        up: u64,
        down: u64,
        reason: ReleaseReason,
    },
    /// The reachable instance's last connection is gone (logout, timeout, close): `user`
    /// takes no demands now. (A requester instance ends without an event.)
    Offline { user: UserId },
}

/// Why a DEMAND is answered at once, without a NOTICE.
enum Refused {
    Failed(DemandError),
    /// The target is on another node ([`Policy::locate`]).
    Redirect(Node),
}

impl From<DemandError> for Refused {
    fn from(e: DemandError) -> Self {
        Refused::Failed(e)
    }
}

/// How the host must treat the bytes it offered to [`Relay::handle_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Offer {
    /// The first `n` bytes were handled; offer the rest again.
    Consumed(usize),
    /// The first `n` bytes are payload for `to`: write `poll_transmit(to)`'s bytes, then
    /// these, on `to`. Then offer the rest again.
    Forward { to: ConnId, n: usize },
    /// Only part of a frame: keep the bytes and offer them again with more. Never
    /// returned for more than [`frame::MAX_CONTROL_FRAME`] bytes.
    NeedMore,
    /// The connection's LOGIN is being checked: keep the bytes and offer them again after
    /// [`Relay::login_verdict`] (the verdict wakes the connection). A terminal may send
    /// frames right behind its LOGIN (§6.2 of docs/PROTOCOL.md); they are handled in the
    /// state the verdict leads to.
    Hold,
}

/// What [`Relay::poll_transmit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Transmit {
    /// Bytes written to the buffer.
    pub len: usize,
    /// After sending them, close the connection and call [`Relay::closed`].
    pub close: bool,
}

/// Errors of the core's API (the host's mistakes, not the network's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RelayError {
    /// The connection table is full: close the new socket.
    TableFull,
    /// No such connection (already closed).
    UnknownConn,
    /// `poll_transmit` needs [`MIN_TRANSMIT_BUF`] bytes.
    BufferTooSmall,
}

/// One logged-in terminal (an "instance": one run of a device).
#[derive(Debug, Clone)]
pub struct TermEntry {
    user: UserId,
    instance: u64,
    kind: Kind,
    /// The next instance of the same user ID ([`NIL`]: the last).
    sibling: u32,
    /// First of its connections, linked through [`ConnEntry::next`].
    first: u32,
    conns: u16,
    sessions: u16,
    /// Demands waiting for one of its connections to be idle, oldest first.
    wait_head: u32,
    wait_tail: u32,
    token: ResumeToken,
}

/// Counters the host exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions started since the core was created.
    pub sessions: u64,
    /// Sessions running now.
    pub active_sessions: u64,
    pub bytes_relayed: u64,
}

/// The relay core over storage `S` with access rule `P`; `H` gives back the pairs the
/// host took ([`Relay::hand_out`]).
pub struct Relay<S: Storage, P: Policy = AllowAll, H: Handback = NoPairs> {
    config: Config,
    policy: P,
    handback: H,
    conns: S::Conns,
    terms: S::Terms,
    users: S::Users,
    events: S::Events,
    next_session: u32,
    stats: Stats,
    /// The wake and kick lists, threaded through `conns`.
    lists: Lists,
    /// The generation the next accepted connection gets (see [`ConnId`]).
    generations: u32,
}

impl<S: Storage, P: Policy, H: Handback> core::fmt::Debug for Relay<S, P, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Relay")
            .field("connections", &self.conns.len())
            .field("terminals", &self.terms.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    pub fn new(mut config: Config, policy: P) -> Self
    where
        H: Default,
    {
        config.max_connections_per_account = config.max_connections_per_account.max(1);
        let (conns, terms, users, events) = S::build();
        Relay {
            config,
            policy,
            handback: H::default(),
            conns,
            terms,
            users,
            events,
            next_session: 1,
            stats: Stats::default(),
            lists: Lists::default(),
            generations: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The access rule, for the host to update (it applies to the next demand).
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// Where the host keeps the pairs it took, for it to add them.
    pub fn handback_mut(&mut self) -> &mut H {
        &mut self.handback
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Logged-in terminals.
    pub fn terminal_count(&self) -> usize {
        self.terms.len()
    }

    /// The core's entry for `conn`, for diagnostics (its `Debug` form).
    pub fn conn_entry(&self, conn: ConnId) -> Option<&ConnEntry> {
        self.conns.get(self.key(conn)?)
    }

    /// Whether `user` has a reachable instance (requester instances do not count).
    pub fn is_online(&self, user: &UserId) -> bool {
        self.reachable(user).is_some()
    }

    /// The next event: the queued ones, then a [`Event::Wake`] for each connection with
    /// output. Drain after every call: the queue holds what one call may emit
    /// ([`max_events_per_call`]), wakes take no room in it.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop().or_else(|| self.pop_wake())
    }

    /// Queues `e`. Cannot fail: one call emits at most [`max_events_per_call`] events
    /// (at most one per connection it touches, plus a terminal's `Replaced` and
    /// `Offline`), the queue holds that many ([`Storage`]), and the host drains it
    /// after every call. A host that does not drain breaks the contract: that panics
    /// rather than lose an event.
    fn emit(&mut self, e: Event) {
        assert!(
            self.events.push(e),
            "relay core: events not drained after a call"
        );
    }

    /// A new TCP connection: steps (1)(10). It must log in within the handshake deadline.
    pub fn accept(&mut self, now: Instant) -> Result<ConnId, RelayError> {
        let generation = self.generations;
        self.generations = self.generations.wrapping_add(1);
        let key = self
            .conns
            .insert(ConnEntry::new(now, generation))
            .map_err(|_| RelayError::TableFull)?;
        Ok(ConnId::new(key, generation))
    }

    /// The table key of `conn`, if it names a live connection (not a stale handle).
    fn key(&self, conn: ConnId) -> Option<u32> {
        let c = self.conns.get(conn.key())?;
        (c.generation == conn.generation()).then_some(conn.key())
    }

    /// The handle of the connection at `key`.
    fn id(&self, key: u32) -> ConnId {
        ConnId::new(key, self.conns.get(key).map_or(0, |c| c.generation))
    }

    fn user_of(&self, conn: u32) -> Option<&UserId> {
        let term = self.conns.get(conn)?.term()?;
        self.terms.get(term).map(|t| &t.user)
    }

    /// Queues an error on `key`. A fatal one closes the connection (see [`Self::close_conn`]).
    fn fail(&mut self, key: u32, code: ErrorCode) {
        if code.is_fatal() {
            self.close_conn(key, Some(code), ReleaseReason::PeerLost);
        } else if let Some(c) = self.conns.get_mut(key) {
            c.out.error = Some(code);
            self.wake(key);
        }
    }

    /// Ends `key`'s part in any session (the peer learns `reason`), then closes it after
    /// writing `code`, if any. Mid-payload the stream cannot take a frame: no frame then.
    fn close_conn(&mut self, key: u32, code: Option<ErrorCode>, reason: ReleaseReason) {
        // Closing twice (shutdown after a peer's close) must not add a frame to a stream
        // that was closed mid-payload.
        if self.conns.get(key).is_none_or(ConnEntry::is_closing) {
            return;
        }
        self.home(key);
        self.detach(key, reason);
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let code = code.filter(|_| !c.mid_payload());
        c.out = Out {
            error: code,
            ..Out::default()
        };
        c.state = State::Closing { term: c.term() };
        // Nothing more is forwarded here (the session ended above), nor acknowledged.
        c.wire.outbound = Outbound::Free;
        c.wire.acks = None;
        c.wire.terminate = false;
        self.wake(key);
    }

    /// Takes bytes received on `conn`. Handles at most one frame (or one run of payload)
    /// per call; call again with the rest. See [`Offer`] and the forwarding contract.
    pub fn handle_input(&mut self, now: Instant, conn: ConnId, input: &[u8]) -> Offer {
        let Some(key) = self.key(conn) else {
            return Offer::Consumed(input.len());
        };
        self.home(key);
        let Some(c) = self.conns.get_mut(key) else {
            return Offer::Consumed(input.len());
        };
        if input.is_empty() {
            return Offer::NeedMore;
        }
        c.wire.last_rx = now;
        match c.state {
            State::Closing { .. } => return Offer::Consumed(input.len()),
            State::Authenticating { .. } => return Offer::Hold,
            _ => {}
        }
        if c.wire.inbound.is_some() {
            return self.pass_payload(key, input.len());
        }
        let offer = match frame::parse(input) {
            Ok(None) => Offer::NeedMore,
            Err(e) => {
                self.fail(key, e.code());
                Offer::Consumed(input.len())
            }
            Ok(Some((Parsed::DataHeader { len }, n))) => {
                self.on_data_header(key, len);
                Offer::Consumed(n)
            }
            Ok(Some((Parsed::Control(f), n))) => {
                self.on_frame(now, key, f);
                Offer::Consumed(n)
            }
        };
        self.serve_kicks();
        offer
    }

    /// Where the payload under way on `conn` goes and how much of it is still to come:
    /// a host reserves room at the receiver before reading more from `conn`
    /// (backpressure). `None` when no payload is under way or it will be dropped.
    pub fn forward_target(&self, conn: ConnId) -> Option<(ConnId, usize)> {
        let c = self.conns.get(self.key(conn)?)?;
        let peer = c.fwd_target()?;
        Some((self.id(peer), usize::from(c.wire.inbound?.remaining)))
    }

    /// Payload bytes still to come on `conn` for the DATA frame under way.
    pub fn forward_remaining(&self, conn: ConnId) -> usize {
        self.key(conn)
            .and_then(|k| self.conns.get(k)?.wire.inbound)
            .map_or(0, |f| usize::from(f.remaining))
    }

    /// The host moved `n` payload bytes of `conn` by itself (see [`Relay::forward_remaining`]).
    pub fn forwarded(&mut self, now: Instant, conn: ConnId, n: usize) {
        let Some(key) = self.key(conn) else { return };
        self.home(key);
        if let Some(c) = self.conns.get_mut(key) {
            c.wire.last_rx = now;
            self.pass_payload(key, n);
        }
    }

    fn pass_payload(&mut self, key: u32, available: usize) -> Offer {
        let Some(c) = self.conns.get_mut(key) else {
            return Offer::Consumed(available);
        };
        if c.wire.inbound.is_none() {
            return Offer::Consumed(0);
        }
        let target = c.fwd_target();
        let Passed { n, complete, .. } = c.wire.pass(available);
        let Some(peer) = target else {
            // Payload nobody may receive (the session ended under it, or DATA that was
            // not allowed): dropped.
            return Offer::Consumed(n);
        };
        self.stats.bytes_relayed += n as u64;
        if complete && let Some(pc) = self.conns.get_mut(peer) {
            // Not unlocked yet: the host may flush `peer` before writing these last
            // bytes. The next `poll_transmit(peer)` unlocks it (and gives nothing), so
            // frames queued meanwhile go out after the payload whatever the host's order.
            // If this frame's header is not even written yet, it is marked when it is.
            pc.wire.outbound.complete();
            self.wake(peer);
        }
        Offer::Forward {
            to: self.id(peer),
            n,
        }
    }

    fn on_data_header(&mut self, key: u32, len: u16) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if len > self.config.max_frame_payload {
            return self.fail(key, ErrorCode::FrameTooLarge);
        }
        let drop = Forward {
            remaining: len,
            pass: false,
        };
        match &c.state {
            State::Handshake | State::Authenticating { .. } | State::Closing { .. } => {
                self.fail(key, ErrorCode::NotLoggedIn)
            }
            State::In { phase, .. } => match *phase {
                Phase::Session { peer, .. } if !c.wire.ended => {
                    let mut me = c.wire;
                    if let Some(pc) = self.conns.get_mut(peer) {
                        me.begin_data(&mut pc.wire, len);
                        self.wake(peer);
                    }
                    if let Some(c) = self.conns.get_mut(key) {
                        c.wire = me;
                    }
                }
                // Sent before this side learnt that its session ended (RELEASE may
                // already be written, so Idle too): drop it quietly, the stream stays in
                // sync (§3.10).
                Phase::Releasing | Phase::Idle => c.wire.inbound = Some(drop),
                _ => {
                    // DATA outside a session has no receiver; the stream must be resynced
                    // by skipping its payload, so the connection stays usable.
                    c.wire.inbound = Some(drop);
                    self.fail(key, ErrorCode::UnexpectedFrame);
                }
            },
        }
    }
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    fn on_frame(&mut self, now: Instant, key: u32, f: Frame) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        // (Authenticating holds its input, Closing ignores it: neither gets here.)
        let (phase, f) = match (&c.state, f) {
            (State::Handshake, Frame::Login(login)) => return self.on_login(key, login),
            (State::In { phase, .. }, f) => (phase.clone(), f),
            _ => return self.fail(key, ErrorCode::NotLoggedIn),
        };
        match (phase, f) {
            (_, Frame::KeepAlive { seq }) => c.wire.keepalive(seq),
            // Any logged-in state: an answer between frames never disturbs a session.
            (_, Frame::List { cursor }) => c.out.list = Some(cursor),
            (Phase::Idle, Frame::Demand(d)) => self.route(now, key, d),
            // The terminal demanded on the connection we had just chosen for a notice:
            // the two crossed. The notice is withdrawn (its requester may retry, the
            // terminal ignores it) and the demand goes ahead.
            (Phase::Noticed { peer, .. }, Frame::Demand(d)) => {
                c.out.notice = false;
                let error = DemandError::NoIdleConnection;
                self.fail_demand(peer, key, error, Text::display(&error));
                self.route(now, key, d);
            }
            // Crossed a RELEASE that withdraws a notice we gave up on, not written yet:
            // the terminal, demanding, would ignore it anyway. Drop it, route.
            (Phase::Releasing, Frame::Demand(d))
                if c.out.release == Some(ReleaseReason::Cancelled) =>
            {
                c.out.release = None;
                c.set_phase(Phase::Idle);
                self.route(now, key, d);
            }
            (Phase::Noticed { peer, session: s }, Frame::Accept { session }) if s == session => {
                self.start_session(key, peer, session)
            }
            (Phase::Noticed { peer, session: s }, Frame::Reject(r)) if s == r.session => {
                let error = DemandError::Rejected(r.reason);
                self.fail_demand(peer, key, error, r.text);
            }
            (_, Frame::Accept { .. } | Frame::Reject(_)) => {
                self.fail(key, ErrorCode::UnknownSession)
            }
            (Phase::Session { peer, .. }, Frame::Terminate) if !c.wire.ended => {
                self.on_terminate(key, peer)
            }
            // Crossed with the end of the session: nothing to do (§3.11).
            (Phase::Releasing | Phase::Idle, Frame::Terminate) => {}
            (_, Frame::Logout) => {
                if let Some(term) = c.term() {
                    let ended = self
                        .terms
                        .get(term)
                        .map(|t| (t.user.clone(), t.instance, t.kind));
                    self.drop_terminal(term, None, ReleaseReason::PeerLoggedOut);
                    if let Some((user, instance, kind)) = ended {
                        self.emit(Event::InstanceEnded {
                            user,
                            instance,
                            how: InstanceEnd::LoggedOut,
                            kind,
                        });
                    }
                }
            }
            _ => self.fail(key, ErrorCode::UnexpectedFrame),
        }
        if self.conns.get(key).is_some_and(|c| c.has_output()) {
            self.wake(key);
        }
    }

    /// LOGIN on a fresh connection: the host checks the credential.
    fn on_login(&mut self, key: u32, login: frame::Login) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.attempts = c.attempts.saturating_add(1);
        let password = matches!(login.credential, Credential::Password(_));
        let caps = login.hello.caps & RELAY_CAPS;
        c.state = State::Authenticating {
            user: login.user.clone(),
            password,
            caps,
        };
        self.emit(Event::Authenticate {
            conn: self.id(key),
            user: login.user,
            credential: login.credential,
            kind: Kind::announced(caps),
        });
    }

    /// The host's answer to [`Event::Authenticate`] for `conn`. Answers for connections
    /// that closed meanwhile are ignored.
    pub fn login_verdict(&mut self, now: Instant, conn: ConnId, verdict: Verdict) {
        self.verdict(now, conn, verdict);
        self.serve_kicks();
    }

    fn verdict(&mut self, now: Instant, conn: ConnId, verdict: Verdict) {
        let Some(key) = self.key(conn) else { return };
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let State::Authenticating {
            user,
            password,
            caps,
        } = c.state.clone()
        else {
            return;
        };
        let (instance, token) = match verdict {
            Verdict::Accept { instance, token } => (instance, token),
            Verdict::Refuse(why) => return self.refuse(key, user, password, caps, why),
        };
        let admitted = Admitted {
            user,
            password,
            caps,
            instance,
            token,
            local: false,
        };
        self.admit(now, key, admitted);
    }

    /// Adds connection `key` to terminal `tk`'s list.
    fn link(&mut self, tk: u32, key: u32) {
        let Some(t) = self.terms.get_mut(tk) else {
            return;
        };
        let first = core::mem::replace(&mut t.first, key);
        t.conns += 1;
        if let Some(f) = self.conns.get_mut(first) {
            f.prev = key;
        }
        if let Some(c) = self.conns.get_mut(key) {
            c.prev = NIL;
            c.next = first;
        }
    }

    /// Takes connection `key` out of terminal `tk`'s list.
    fn unlink(&mut self, tk: u32, key: u32) {
        let Some((prev, next)) = self.conns.get_mut(key).map(|c| {
            let links = (c.prev, c.next);
            (c.prev, c.next) = (NIL, NIL);
            links
        }) else {
            return;
        };
        if let Some(p) = self.conns.get_mut(prev) {
            p.next = next;
        } else if let Some(t) = self.terms.get_mut(tk) {
            t.first = next;
        }
        if let Some(n) = self.conns.get_mut(next) {
            n.prev = prev;
        }
        if let Some(t) = self.terms.get_mut(tk) {
            t.conns = t.conns.saturating_sub(1);
        }
    }

    /// The keys of terminal `tk`'s connections.
    fn term_conns(&self, tk: u32) -> TermConns<'_, S> {
        TermConns {
            conns: &self.conns,
            next: self.terms.get(tk).map_or(NIL, |t| t.first),
        }
    }

    /// Pairs waiting demands with the connections that became idle during this call.
    fn serve_kicks(&mut self) {
        while let Some(key) = self.pop_kick() {
            let Some(c) = self.conns.get(key) else {
                continue;
            };
            let Some(tk) = c.term().filter(|_| c.is_idle()) else {
                continue;
            };
            if let Some(requester) = self.pop_waiter(tk) {
                let Some(Phase::Waiting {
                    service, deadline, ..
                }) = self.conns.get(requester).and_then(|c| c.phase().cloned())
                else {
                    continue;
                };
                self.notify(requester, key, service, deadline);
            }
        }
    }

    /// Takes the oldest demand waiting for terminal `tk` out of its list.
    fn pop_waiter(&mut self, tk: u32) -> Option<u32> {
        let head = self.terms.get(tk)?.wait_head;
        let next = self.conns.get(head)?.wait_next;
        let t = self.terms.get_mut(tk)?;
        t.wait_head = next;
        if next == NIL {
            t.wait_tail = NIL;
        }
        if let Some(c) = self.conns.get_mut(head) {
            c.wait_next = NIL;
        }
        Some(head)
    }

    /// Appends `requester` to terminal `tk`'s wait list.
    fn push_waiter(&mut self, tk: u32, requester: u32) {
        let Some(t) = self.terms.get_mut(tk) else {
            return;
        };
        let tail = core::mem::replace(&mut t.wait_tail, requester);
        if tail == NIL {
            t.wait_head = requester;
        } else if let Some(c) = self.conns.get_mut(tail) {
            c.wait_next = requester;
        }
        if let Some(c) = self.conns.get_mut(requester) {
            c.wait_next = NIL;
        }
    }

    /// Takes `requester` out of terminal `tk`'s wait list, wherever it is.
    fn remove_waiter(&mut self, tk: u32, requester: u32) {
        let Some(t) = self.terms.get(tk) else { return };
        let after = self.conns.get(requester).map_or(NIL, |c| c.wait_next);
        let mut prev = NIL;
        let mut k = t.wait_head;
        while k != NIL && k != requester {
            prev = k;
            k = self.conns.get(k).map_or(NIL, |c| c.wait_next);
        }
        if k == NIL {
            return;
        }
        if let Some(p) = self.conns.get_mut(prev) {
            p.wait_next = after;
        }
        if let Some(t) = self.terms.get_mut(tk) {
            if prev == NIL {
                t.wait_head = after;
            }
            if t.wait_tail == requester {
                t.wait_tail = prev;
            }
        }
        if let Some(c) = self.conns.get_mut(requester) {
            c.wait_next = NIL;
        }
    }

    /// Answers a refused login with the ERROR its reason calls for.
    fn refuse(&mut self, key: u32, user: UserId, password: bool, caps: u32, why: Refusal) {
        let code = match why {
            Refusal::BadCredential if password => ErrorCode::AuthFailed,
            Refusal::BadCredential | Refusal::TokenRevoked => ErrorCode::ResumeRejected,
            Refusal::Replaced => ErrorCode::Replaced,
            Refusal::Throttled { .. } => ErrorCode::Throttled,
        };
        self.refuse_login(key, user, code);
        if let (Refusal::Throttled { retry_after }, Some(c)) = (why, self.conns.get_mut(key)) {
            let secs = retry_after
                .as_millis()
                .div_ceil(1000)
                .clamp(1, u32::MAX.into()) as u32;
            c.out.retry_after = Some((secs, caps & caps::RETRY_AFTER != 0));
        }
    }

    fn refuse_login(&mut self, key: u32, user: UserId, code: ErrorCode) {
        self.emit(Event::LoginFailed {
            conn: self.id(key),
            user,
            code,
        });
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.state = State::Handshake;
        if c.attempts >= self.config.max_login_attempts && !code.is_fatal() {
            self.fail(key, ErrorCode::Throttled);
        } else {
            self.fail(key, code);
        }
    }

    /// Step (6): routes a demand from `key` to an idle connection of the target, parks
    /// it until the target opens one, or answers it with an error at once.
    fn route(&mut self, now: Instant, key: u32, d: Demand) {
        let Some(from) = self.user_of(key).cloned() else {
            return;
        };
        let outcome = (|| {
            // The access rule first: a forbidden target's presence is not revealed.
            if !self.policy.may_reach(&from, &d.target) {
                return Err(DemandError::Forbidden.into());
            }
            let Some(tk) = self.reachable(&d.target) else {
                return Err(self.elsewhere(key, &d.target));
            };
            let ak = self
                .conns
                .get(key)
                .and_then(|c| c.term())
                .ok_or(DemandError::TargetGone)?;
            let max = self.config.max_sessions_per_account;
            let busy = |k| self.terms.get(k).is_none_or(|t| t.sessions >= max);
            if busy(ak) || busy(tk) {
                return Err(DemandError::TooManySessions.into());
            }
            Ok((ak, tk))
        })();
        let (ak, tk) = match outcome {
            Ok(keys) => keys,
            Err(Refused::Redirect(node)) => {
                if let Some(c) = self.conns.get_mut(key) {
                    c.out.result = Some(Answer::Redirect(node));
                }
                return self.emit(Event::DemandRedirected {
                    from,
                    to: d.target,
                    service: d.service,
                });
            }
            Err(Refused::Failed(error)) => {
                if let Some(c) = self.conns.get_mut(key) {
                    c.out.result = Some(Answer::Failed {
                        error,
                        text: Text::display(&error),
                    });
                }
                return self.emit(Event::DemandFailed {
                    from,
                    to: d.target,
                    service: d.service,
                    error,
                });
            }
        };
        for k in [ak, tk] {
            if let Some(t) = self.terms.get_mut(k) {
                t.sessions += 1;
            }
        }
        let deadline = now + self.config.demand_timeout;
        // The most recently heard-from idle connection: after an outage the oldest ones
        // may be dead without the relay knowing yet.
        let idle = self
            .term_conns(tk)
            .filter(|&ck| ck != key)
            .filter_map(|ck| Some((ck, self.conns.get(ck)?)))
            .filter(|(_, c)| c.is_idle())
            .max_by_key(|(_, c)| c.wire.last_rx)
            .map(|(ck, _)| ck);
        match idle {
            Some(ck) => self.notify(key, ck, d.service, deadline),
            // Every connection of the target is busy: its terminal opens another one
            // to stay at its spare count, which takes this demand (oldest first).
            None => {
                if let Some(c) = self.conns.get_mut(key) {
                    c.set_phase(Phase::Waiting {
                        target: tk,
                        service: d.service,
                        deadline,
                    });
                }
                self.push_waiter(tk, key);
            }
        }
    }

    /// The answer to a demand from connection `key` for `target`, who has no reachable
    /// instance here: a redirect to the node the host says it is on, if the connection
    /// follows redirects (its LOGIN announced [`caps::REDIRECT`]); else `TargetOffline`,
    /// what every terminal got before redirects existed.
    fn elsewhere(&self, key: u32, target: &UserId) -> Refused {
        let follows = self.conns.get(key).is_some_and(|c| c.redirect);
        match follows.then(|| self.policy.locate(target)).flatten() {
            Some(to) => Refused::Redirect(to),
            None => Refused::Failed(DemandError::TargetOffline),
        }
    }

    /// Queues the NOTICE of `requester`'s demand on the target's idle connection `target`.
    fn notify(&mut self, requester: u32, target: u32, service: ServiceName, deadline: Instant) {
        let session = self.next_session;
        self.next_session = self.next_session.wrapping_add(1).max(1);
        if let Some(c) = self.conns.get_mut(requester) {
            c.set_phase(Phase::Demanding {
                peer: target,
                service,
                deadline,
            });
        }
        if let Some(c) = self.conns.get_mut(target) {
            c.set_phase(Phase::Noticed {
                peer: requester,
                session,
            });
            c.out.notice = true;
        }
        self.wake(target);
    }

    /// A session slot of terminals `a` and `b` (keys of the terminal table) is free again.
    fn slots_done(&mut self, a: Option<u32>, b: Option<u32>) {
        for k in [a, b].into_iter().flatten() {
            if let Some(t) = self.terms.get_mut(k) {
                t.sessions = t.sessions.saturating_sub(1);
            }
        }
    }

    fn sessions_done(&mut self, a: u32, b: u32) {
        let term = |k| self.conns.get(k).and_then(ConnEntry::term);
        self.slots_done(term(a), term(b));
    }

    /// A waiting demand of `requester` for terminal `tk` ends unserved.
    fn fail_waiting(&mut self, requester: u32, tk: u32, error: DemandError) {
        self.remove_waiter(tk, requester);
        let service = self.service_of(requester);
        let own = self.conns.get(requester).and_then(ConnEntry::term);
        self.slots_done(own, Some(tk));
        if let Some(c) = self.conns.get_mut(requester) {
            c.set_phase(Phase::Idle);
            c.out.result = Some(Answer::Failed {
                error,
                text: Text::display(&error),
            });
            self.wake(requester);
            self.kick(requester);
        }
        let to = self.terms.get(tk).map(|t| t.user.clone());
        if let (Some(from), Some(to)) = (self.user_of(requester).cloned(), to) {
            self.emit(Event::DemandFailed {
                from,
                to,
                service,
                error,
            });
        }
    }

    /// The requester's service, read from its `Demanding` or `Waiting` state.
    fn service_of(&self, requester: u32) -> ServiceName {
        match self.conns.get(requester).and_then(ConnEntry::phase) {
            Some(Phase::Demanding { service, .. } | Phase::Waiting { service, .. }) => {
                service.clone()
            }
            _ => ServiceName::default(),
        }
    }

    /// Step (8)(9), accepted: `target` accepted `requester`'s demand.
    fn start_session(&mut self, target: u32, requester: u32, session: u32) {
        let service = self.service_of(requester);
        if let Some(c) = self.conns.get_mut(target) {
            c.set_phase(Phase::Session {
                peer: requester,
                session,
                requester: false,
            });
            c.wire.begin_session();
        }
        if let Some(c) = self.conns.get_mut(requester) {
            c.set_phase(Phase::Session {
                peer: target,
                session,
                requester: true,
            });
            c.wire.begin_session();
            c.out.result = Some(Answer::Accepted { session });
        }
        self.stats.sessions += 1;
        self.stats.active_sessions += 1;
        self.wake(requester);
        if let (Some(from), Some(to)) = (
            self.user_of(requester).cloned(),
            self.user_of(target).cloned(),
        ) {
            self.emit(Event::SessionStarted {
                session,
                from,
                to,
                service,
            });
        }
    }

    /// A demand of `requester` ends without a session; `target` held its notice.
    fn fail_demand(&mut self, requester: u32, target: u32, error: DemandError, text: Text) {
        let service = self.service_of(requester);
        self.sessions_done(requester, target);
        if let Some(c) = self.conns.get_mut(requester) {
            c.set_phase(Phase::Idle);
            c.out.result = Some(Answer::Failed { error, text });
            self.wake(requester);
        }
        if let Some(c) = self.conns.get_mut(target) {
            c.set_phase(Phase::Idle);
        }
        self.kick(requester);
        self.kick(target);
        if let (Some(from), Some(to)) = (
            self.user_of(requester).cloned(),
            self.user_of(target).cloned(),
        ) {
            self.emit(Event::DemandFailed {
                from,
                to,
                service,
                error,
            });
        }
    }

    /// Withdraws `target`'s notice: quietly if it was never written, else with RELEASE.
    fn cancel_notice(&mut self, target: u32) {
        if let Some(c) = self.conns.get_mut(target) {
            if c.out.notice {
                c.out.notice = false;
                c.set_phase(Phase::Idle);
                self.kick(target);
            } else {
                c.out.release = Some(ReleaseReason::Cancelled);
                c.set_phase(Phase::Releasing);
                self.wake(target);
            }
        }
    }

    /// Step (19)(20): `key` sent TERMINATE, forwarded to `peer` ([`conn::Wire::terminate`],
    /// which a handed-out [`Pair`] runs too). When both sides have, step (21).
    fn on_terminate(&mut self, key: u32, peer: u32) {
        let (Some(mut mine), Some(pc)) = (
            self.conns.get(key).map(|c| c.wire),
            self.conns.get_mut(peer),
        ) else {
            return;
        };
        let both = mine.terminate(&mut pc.wire);
        if let Some(c) = self.conns.get_mut(key) {
            c.wire = mine;
        }
        self.wake(peer);
        if both {
            self.both_terminated(key, peer);
        }
    }

    /// Step (21): both sides of the session between `a` and `b` sent TERMINATE (through
    /// the router, or through their [`Pair`], which the router got back since): RELEASE
    /// `Normal` to both, after the forwarded TERMINATE.
    fn both_terminated(&mut self, a: u32, b: u32) {
        self.end_session(a, b, ReleaseReason::Normal, ReleaseReason::Normal);
    }

    /// Ends the session between `a` and `b`, telling each its reason with RELEASE.
    fn end_session(&mut self, a: u32, b: u32, reason_a: ReleaseReason, reason_b: ReleaseReason) {
        self.home(a);
        let Some(&Phase::Session {
            session, requester, ..
        }) = self.conns.get(a).and_then(ConnEntry::phase)
        else {
            return;
        };
        let (req, tgt) = if requester { (a, b) } else { (b, a) };
        let users = (self.user_of(req).cloned(), self.user_of(tgt).cloned());
        let bytes = |k| self.conns.get(k).map_or(0, |c| c.wire.bytes);
        let (up, down) = (bytes(req), bytes(tgt));
        self.sessions_done(a, b);
        self.stats.active_sessions -= 1;
        for (k, reason) in [(a, reason_a), (b, reason_b)] {
            if let Some(c) = self.conns.get_mut(k) {
                if c.is_closing() {
                    continue;
                }
                c.out.release = Some(reason);
                c.set_phase(Phase::Releasing);
                self.wake(k);
            }
        }
        if let (Some(from), Some(to)) = users {
            let reason = if reason_a == ReleaseReason::Normal {
                reason_b
            } else {
                reason_a
            };
            self.emit(Event::SessionEnded {
                session,
                from,
                to,
                up,
                down,
                reason,
            });
        }
    }

    /// `key` is going away: its demand, notice or session ends; the peer learns `reason`.
    fn detach(&mut self, key: u32, reason: ReleaseReason) {
        self.home(key);
        let Some(c) = self.conns.get(key) else { return };
        let own = c.term();
        match c.phase() {
            Some(&Phase::Waiting { target, .. }) => {
                self.remove_waiter(target, key);
                self.slots_done(own, Some(target));
            }
            Some(&Phase::Demanding { peer, .. }) => {
                self.sessions_done(key, peer);
                self.cancel_notice(peer);
            }
            Some(&Phase::Noticed { peer, .. }) => {
                let text = Text::display(&DemandError::TargetGone);
                self.fail_demand(peer, key, DemandError::TargetGone, text);
            }
            Some(&Phase::Session { peer, .. }) => {
                // A peer in the middle of receiving our payload cannot be told in-band.
                let peer_locked = self.conns.get(peer).is_some_and(ConnEntry::mid_payload);
                self.end_session(key, peer, reason, reason);
                if peer_locked {
                    self.close_conn(peer, None, ReleaseReason::PeerLost);
                } else if let Some(p) = self.conns.get_mut(peer) {
                    p.wire.outbound.withdraw();
                }
            }
            _ => {}
        }
        if let Some(c) = self.conns.get_mut(key) {
            c.set_phase(Phase::Idle);
        }
    }

    /// Closes every connection of terminal `term` (after `code`, if any) and forgets it.
    fn drop_terminal(&mut self, term: u32, code: Option<ErrorCode>, reason: ReleaseReason) {
        let Some(first) = self.terms.get(term).map(|t| t.first) else {
            return;
        };
        // Sessions end first, while their events can still name this terminal. Closing
        // changes states only, never the list.
        let mut ck = first;
        while let Some(c) = self.conns.get(ck) {
            let next = c.next;
            self.close_conn(ck, code, reason);
            ck = next;
        }
        let mut ck = first;
        while let Some(c) = self.conns.get_mut(ck) {
            let next = c.next;
            (c.state, c.prev, c.next) = (State::Closing { term: None }, NIL, NIL);
            ck = next;
        }
        self.remove_term(term);
    }

    /// Forgets terminal `tk` (its connections are gone or no longer its own); demands
    /// waiting for it fail.
    fn remove_term(&mut self, tk: u32) {
        while let Some(requester) = self
            .terms
            .get(tk)
            .map(|t| t.wait_head)
            .filter(|&k| k != NIL)
        {
            self.fail_waiting(requester, tk, DemandError::TargetGone);
        }
        self.unchain(tk);
        if let Some(t) = self.terms.remove(tk)
            && t.kind == Kind::Reachable
        {
            self.emit(Event::Offline { user: t.user });
        }
    }
}

/// Encodes a burst of control frames into a `poll_transmit` buffer.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

/// KEEPALIVE_ACKs written in one burst at most; the rest follow in the next.
const ACKS_PER_BURST: u16 = 16;

impl Writer<'_> {
    /// Cannot fail: a burst is at most one frame of each kind (and [`ACKS_PER_BURST`]
    /// acks), and the largest burst fits [`MIN_TRANSMIT_BUF`] (test `largest_burst_fits`).
    fn put(&mut self, f: &Frame) {
        let n = f
            .encode(&mut self.buf[self.len..])
            .expect("a burst fits MIN_TRANSMIT_BUF");
        self.len += n;
    }

    /// One ACK per KEEPALIVE owed, oldest first (their `seq`s are consecutive, §3.3).
    /// Returns those left for the next burst.
    fn put_acks(&mut self, acks: Acks) -> Option<Acks> {
        let now = acks.count.min(ACKS_PER_BURST);
        let later = acks.count - now;
        let first = acks.last.wrapping_sub(u32::from(acks.count) - 1);
        for i in 0..now {
            let seq = first.wrapping_add(u32::from(i));
            self.put(&Frame::KeepAliveAck { seq });
        }
        (later > 0).then_some(Acks {
            last: acks.last,
            count: later,
        })
    }

    /// The end of a burst from `wire`: a DATA header that waits (its payload comes next,
    /// so nothing may follow it), else the peer's TERMINATE if owed. `true`: a header
    /// ended the burst.
    fn put_wire_tail(&mut self, wire: &mut conn::Wire) -> bool {
        if let Some(len) = wire.take_header() {
            self.put_data_header(len);
            return true;
        }
        if core::mem::take(&mut wire.terminate) {
            self.put(&Frame::Terminate);
        }
        false
    }

    fn put_data_header(&mut self, len: u16) {
        let h = frame::data_header(usize::from(len)).expect("DATA of 1..=max_payload bytes");
        self.buf[self.len..self.len + h.len()].copy_from_slice(&h);
        self.len += h.len();
    }
}

/// Iterates the keys of one terminal's connections.
struct TermConns<'a, S: Storage> {
    conns: &'a S::Conns,
    next: u32,
}

impl<S: Storage> Iterator for TermConns<'_, S> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let key = self.next;
        self.next = self.conns.get(key)?.next;
        Some(key)
    }
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    /// Encodes `conn`'s pending output into `buf` (at least [`MIN_TRANSMIT_BUF`] bytes).
    /// Returns nothing while a forwarded payload is under way on `conn`.
    pub fn poll_transmit(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<Transmit, RelayError> {
        if buf.len() < MIN_TRANSMIT_BUF {
            return Err(RelayError::BufferTooSmall);
        }
        let key = self.key(conn).ok_or(RelayError::UnknownConn)?;
        self.home(key);
        let nothing = Transmit {
            len: 0,
            close: false,
        };
        let c = self.conns.get_mut(key).ok_or(RelayError::UnknownConn)?;
        if let Some(again) = c.wire.hold() {
            if again {
                self.wake(key);
            }
            return Ok(nothing);
        }
        let closing = c.is_closing();
        let mut out = core::mem::take(&mut c.out);
        let mut w = Writer { buf, len: 0 };
        self.write_control(key, &mut out, closing, &mut w);
        let Some(c) = self.conns.get_mut(key) else {
            return Err(RelayError::UnknownConn);
        };
        // A DATA header ends the burst: its payload comes next, then the rest.
        if !closing
            && !w.put_wire_tail(&mut c.wire)
            && let Some(reason) = out.release.take()
        {
            w.put(&Frame::Release { reason });
            // RELEASE written: the connection is idle and may serve a waiting demand.
            if c.phase() == Some(&Phase::Releasing) {
                c.set_phase(Phase::Idle);
                self.kick(key);
            }
        }
        if let Some(c) = self.conns.get_mut(key).filter(|_| !closing) {
            c.out = out;
            if c.has_output() {
                self.wake(key);
            }
        }
        self.serve_kicks();
        Ok(Transmit {
            len: w.len,
            close: closing,
        })
    }

    /// Writes the control frames of `out` that come before a DATA header, in order.
    fn write_control(&mut self, key: u32, out: &mut Out, closing: bool, w: &mut Writer<'_>) {
        let term = self.conns.get(key).and_then(ConnEntry::term);
        if let Some(caps) = out.login_ok.take()
            && let Some(t) = term.and_then(|t| self.terms.get(t))
        {
            w.put(&Frame::LoginOk(LoginOk {
                caps,
                keepalive_ms: self
                    .config
                    .keepalive_interval
                    .as_millis()
                    .min(u32::MAX.into()) as u32,
                max_payload: self.config.max_frame_payload,
                token: t.token.clone(),
            }));
        }
        if let Some(code) = out.error.take() {
            w.put(&error_frame(code, out.retry_after.take()));
        }
        if closing {
            return;
        }
        if let Some(c) = self.conns.get_mut(key)
            && let Some(acks) = c.wire.acks.take()
        {
            c.wire.acks = w.put_acks(acks);
        }
        if let Some(cursor) = out.list.take() {
            w.put(&Frame::ListAnswer(self.list_page(key, cursor)));
        }
        // A result frees the connection for a notice that may already be queued: the
        // result goes first, or the terminal would take the notice for one that crossed
        // its demand.
        if let Some(r) = out.result.take() {
            w.put(&Frame::DemandResult(self.demand_result(r)));
        }
        if core::mem::take(&mut out.notice)
            && let Some(n) = self.notice_for(key)
        {
            w.put(&Frame::Notice(n));
        }
    }

    /// The DEMAND_RESULT of answer `a`: a redirect's node is looked up now
    /// ([`Policy::node`]).
    fn demand_result(&self, a: Answer) -> DemandResult {
        match a {
            Answer::Accepted { session } => DemandResult::Accepted { session },
            Answer::Failed { error, text } => DemandResult::Failed { error, text },
            Answer::Redirect(node) => match self.policy.node(node) {
                Some(to) => DemandResult::Redirect(to),
                None => DemandResult::Failed {
                    error: DemandError::TargetOffline,
                    text: Text::display(&DemandError::TargetOffline),
                },
            },
        }
    }

    /// Page of the online list for connection `key`, starting at `cursor`: the terminals
    /// of this relay by key, then the user IDs reachable on other nodes
    /// ([`Policy::remote`], at [`REMOTE_CURSOR`] and above). Listed: the asker itself and
    /// the user IDs the access rule lets it reach, so the list tells an account nothing
    /// about the others; a user ID reachable here is listed once, as a local one. At most
    /// [`LIST_SCAN`] candidates are looked at per page (a page may come back short, with a
    /// cursor to go on).
    fn list_page(&self, key: u32, cursor: u32) -> ListAnswer {
        let mut users = Vec::new();
        let Some(me) = self.user_of(key) else {
            return ListAnswer { users, next: None };
        };
        let candidates = self.local_listed(cursor).chain(self.remote_listed(cursor));
        for (scanned, (at, user)) in candidates.enumerate() {
            if users.is_full() || scanned == LIST_SCAN {
                return ListAnswer {
                    users,
                    next: Some(at),
                };
            }
            if let Some(user) = user.filter(|u| u == me || self.policy.may_reach(me, u)) {
                // Cannot fail: the page is not full (checked above).
                let _ = users.push(user);
            }
        }
        ListAnswer { users, next: None }
    }

    /// The terminals from `cursor` on, by key: each key with its user ID if it is listed
    /// (a reachable instance; requester instances are not).
    fn local_listed(&self, cursor: u32) -> impl Iterator<Item = (u32, Option<UserId>)> + '_ {
        let first = self.terms.next_key(cursor);
        core::iter::successors(first, |k| self.terms.next_key(k.checked_add(1)?))
            .take_while(|k| *k < REMOTE_CURSOR)
            .map(|k| {
                let t = self.terms.get(k);
                let user = t
                    .filter(|t| t.kind == Kind::Reachable)
                    .map(|t| t.user.clone());
                (k, user)
            })
    }

    /// The other nodes' user IDs from `cursor` on (from the first if `cursor` is a local
    /// one), by cursor: each with its user ID unless it is reachable here too (then it
    /// was listed among the terminals).
    fn remote_listed(&self, cursor: u32) -> impl Iterator<Item = (u32, Option<UserId>)> + '_ {
        let first = self.policy.remote(cursor.saturating_sub(REMOTE_CURSOR));
        core::iter::successors(first, |(pos, _)| self.policy.remote(pos.checked_add(1)?))
            .take_while(|(pos, _)| *pos < REMOTE_POSITIONS)
            .map(|(pos, user)| {
                (
                    REMOTE_CURSOR + pos,
                    (!self.is_online(&user)).then_some(user),
                )
            })
    }

    fn notice_for(&self, key: u32) -> Option<Notice> {
        let &Phase::Noticed { peer, session } = self.conns.get(key)?.phase()? else {
            return None;
        };
        Some(Notice {
            session,
            from: self.user_of(peer)?.clone(),
            service: self.service_of(peer),
        })
    }

    /// When [`Relay::handle_timeout`] next has work for `conn`.
    pub fn poll_timeout(&self, conn: ConnId) -> Option<Instant> {
        let c = self.conns.get(self.key(conn)?)?;
        match c.state {
            State::Closing { .. } => None,
            State::Handshake | State::Authenticating { .. } => {
                Some(c.accepted + self.config.handshake_timeout)
            }
            _ => {
                // Also mid-payload: a device that hangs half-way through a DATA frame must
                // be detected. A receiver so slow that the host reads nothing from this
                // connection for the whole deadline ends the session too (documented).
                let idle = Some(c.wire.last_rx + self.config.keepalive_timeout);
                let demand = match c.phase() {
                    Some(Phase::Demanding { deadline, .. } | Phase::Waiting { deadline, .. }) => {
                        Some(*deadline)
                    }
                    _ => None,
                };
                earliest(idle, demand)
            }
        }
    }

    /// Runs `conn`'s deadlines. Calling early is harmless.
    pub fn handle_timeout(&mut self, now: Instant, conn: ConnId) {
        if let Some(key) = self.key(conn) {
            self.home(key);
            self.timeout(now, key);
        }
        self.serve_kicks();
    }

    fn timeout(&mut self, now: Instant, key: u32) {
        let Some(c) = self.conns.get(key) else { return };
        match c.state {
            State::Closing { .. } => {}
            State::Handshake | State::Authenticating { .. } => {
                if now >= c.accepted + self.config.handshake_timeout {
                    self.close_conn(
                        key,
                        Some(ErrorCode::HandshakeTimeout),
                        ReleaseReason::PeerLost,
                    );
                }
            }
            _ => {
                if now >= c.wire.last_rx + self.config.keepalive_timeout {
                    return self.close_conn(
                        key,
                        Some(ErrorCode::KeepAliveTimeout),
                        ReleaseReason::PeerLost,
                    );
                }
                match c.phase() {
                    Some(&Phase::Demanding { peer, deadline, .. }) if now >= deadline => {
                        let text = Text::display(&DemandError::Timeout);
                        self.fail_demand(key, peer, DemandError::Timeout, text);
                        self.cancel_notice(peer);
                    }
                    // The target opened no connection in time (it may be at its limit).
                    Some(&Phase::Waiting {
                        target, deadline, ..
                    }) if now >= deadline => {
                        self.fail_waiting(key, target, DemandError::NoIdleConnection)
                    }
                    _ => {}
                }
            }
        }
    }

    /// The host closed `conn`'s socket (or saw it close). Frees its entry.
    pub fn closed(&mut self, conn: ConnId) {
        let Some(key) = self.key(conn) else { return };
        self.home(key);
        if self.conns.get(key).is_some_and(|c| !c.is_closing()) {
            self.detach(key, ReleaseReason::PeerLost);
        }
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        // Not idle any more: no waiting demand is served by it below.
        let term = c.term();
        c.state = State::Closing { term };
        if let Some(tk) = term {
            self.unlink(tk, key);
            if self.terms.get(tk).is_some_and(|t| t.conns == 0) {
                self.remove_term(tk);
            }
        }
        // The kick list may run through this entry: empty it while the entry exists.
        self.serve_kicks();
        self.unwake(key);
        self.conns.remove(key);
    }

    /// Graceful shutdown: every connection gets `ShuttingDown` and closes; sessions end.
    pub fn shutdown(&mut self) {
        let mut k = 0;
        while let Some(key) = self.conns.next_key(k) {
            self.close_conn(
                key,
                Some(ErrorCode::ShuttingDown),
                ReleaseReason::ShuttingDown,
            );
            k = key + 1;
        }
    }

    /// The operator removed `user`'s account: the connections of all its instances
    /// close now.
    pub fn remove_user(&mut self, user: &UserId) {
        self.drop_user(user, ErrorCode::AccountRemoved);
    }

    /// The operator kicked `user`: the connections of all its instances get ERROR
    /// `Kicked` and close now. The account stays, so a terminal may log in again (to keep
    /// it out, the operator removes or disables the account: [`Relay::remove_user`]).
    pub fn kick_user(&mut self, user: &UserId) {
        self.drop_user(user, ErrorCode::Kicked);
    }

    /// The operator ends session `session`: both sides get RELEASE `EndedByOperator` and
    /// stay logged in. A side the host is writing a DATA payload into cannot be told
    /// in-band and closes instead (as when a peer is lost, §10.3). False if no such
    /// session runs.
    pub fn close_session(&mut self, session: u32) -> bool {
        let Some(a) = self.session_conn(session) else {
            return false;
        };
        // A pair given back may end the session (both sides had terminated): then there
        // is none to end, as if the router had seen the TERMINATEs itself.
        self.home(a);
        let Some(&Phase::Session { peer: b, .. }) = self.conns.get(a).and_then(ConnEntry::phase)
        else {
            return false;
        };
        let locked = |r: &Self, k| r.conns.get(k).is_some_and(ConnEntry::mid_payload);
        let (a_locked, b_locked) = (locked(self, a), locked(self, b));
        let reason = ReleaseReason::EndedByOperator;
        self.end_session(a, b, reason, reason);
        for (k, locked) in [(a, a_locked), (b, b_locked)] {
            if locked {
                self.close_conn(k, None, ReleaseReason::PeerLost);
            } else if let Some(c) = self.conns.get_mut(k) {
                c.wire.outbound.withdraw();
            }
        }
        self.serve_kicks();
        true
    }

    /// Every running session with the payload bytes it carried so far: (session,
    /// requester to target, target to requester), the figures its `SessionEnded` event
    /// will give. One pass over the connections. A pair handed out counts what it had
    /// when handed out: [`Relay::take_back_all`] first for the figures of now.
    pub fn session_bytes(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        let mut k = 0;
        core::iter::from_fn(move || {
            while let Some(key) = self.conns.next_key(k) {
                k = key + 1;
                let c = self.conns.get(key)?;
                if let Some(&Phase::Session {
                    session,
                    peer,
                    requester: true,
                    ..
                }) = c.phase()
                {
                    let down = self.conns.get(peer).map_or(0, |p| p.wire.bytes);
                    return Some((session, c.wire.bytes, down));
                }
            }
            None
        })
    }

    /// A connection of running session `session`.
    fn session_conn(&self, session: u32) -> Option<u32> {
        let mut k = 0;
        while let Some(key) = self.conns.next_key(k) {
            if let Some(&Phase::Session { session: s, .. }) =
                self.conns.get(key).and_then(ConnEntry::phase)
                && s == session
            {
                return Some(key);
            }
            k = key + 1;
        }
        None
    }

    /// Closes the connections of all of `user`'s instances after ERROR `code`; the peers
    /// of their sessions get RELEASE `PeerLoggedOut`.
    fn drop_user(&mut self, user: &UserId, code: ErrorCode) {
        while let Some(tk) = self.users.get(user) {
            self.drop_terminal(tk, Some(code), ReleaseReason::PeerLoggedOut);
        }
        self.serve_kicks();
    }
}

/// The ERROR frame for `code`: its description, and for `Throttled` the wait, in the
/// text (every terminal shows it) and in the field (terminals that decode it).
fn error_frame(code: ErrorCode, retry_after: Option<(u32, bool)>) -> Frame {
    let Some((secs, field)) = retry_after else {
        return Frame::Error {
            code,
            text: Text::lossy(code.describe()),
            retry_after: None,
        };
    };
    Frame::Error {
        code,
        text: Text::display(&format_args!("too many failed logins, retry in {secs}s")),
        retry_after: field.then_some(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::DemandError;
    use crate::frame::{Hello, ListAnswer, Login, Redirect};
    use crate::ident::{NodeAddress, Password};

    /// [`Writer::put`] cannot fail: the longest burst `poll_transmit` writes (one frame
    /// of each kind, each at its largest) fits [`MIN_TRANSMIT_BUF`].
    #[test]
    fn largest_burst_fits() {
        let long = |n| "x".repeat(n);
        let user = UserId::new(&long(crate::ident::MAX_USER_ID)).unwrap();
        let text = Text::lossy(&long(crate::ident::MAX_TEXT));
        let burst = [
            Frame::LoginOk(LoginOk {
                caps: u32::MAX,
                keepalive_ms: u32::MAX,
                max_payload: u16::MAX,
                token: ResumeToken::from_slice(&[0xFF; crate::ident::MAX_TOKEN]).unwrap(),
            }),
            Frame::Error {
                code: ErrorCode::Throttled,
                text: text.clone(),
                retry_after: Some(u32::MAX),
            },
            Frame::KeepAliveAck { seq: u32::MAX },
            Frame::ListAnswer(ListAnswer {
                users: core::iter::repeat_n(user.clone(), frame::LIST_PAGE).collect(),
                next: Some(u32::MAX),
            }),
            // The longest DEMAND_RESULT: a redirect with the longest address.
            Frame::DemandResult(DemandResult::Redirect(frame::Redirect {
                address: crate::ident::NodeAddress::new(&long(crate::ident::MAX_ADDRESS)).unwrap(),
                fingerprint: [0xFF; 32],
            })),
            Frame::Notice(Notice {
                session: u32::MAX,
                from: user,
                service: ServiceName::new(&long(crate::ident::MAX_SERVICE)).unwrap(),
            }),
            Frame::Terminate,
            Frame::Release {
                reason: ReleaseReason::ShuttingDown,
            },
        ];
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let mut w = Writer {
            buf: &mut buf,
            len: 0,
        };
        for f in &burst {
            w.put(f);
        }
        let acks = Acks {
            last: u32::MAX,
            count: u16::MAX,
        };
        assert!(w.put_acks(acks).is_some(), "the rest waits");
        assert!(w.len + frame::HEADER_LEN <= MIN_TRANSMIT_BUF, "{}", w.len);
    }

    /// A handle kept after its connection closed names nothing, not the connection
    /// that took the same table slot.
    #[test]
    fn a_stale_handle_is_unknown() {
        let mut r: Relay<Fixed<2, 1, 5>> = Relay::new(Config::default(), AllowAll);
        let old = r.accept(Instant::from_secs(1)).unwrap();
        r.closed(old);
        let new = r.accept(Instant::from_secs(1)).unwrap();
        assert_eq!(old.index(), new.index(), "the slot is reused");
        assert_ne!(old, new);
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        assert_eq!(r.poll_transmit(old, &mut buf), Err(RelayError::UnknownConn));
        let keepalive = [0x03, 0, 1, 7];
        assert_eq!(
            r.handle_input(Instant::from_secs(1), old, &keepalive),
            Offer::Consumed(4)
        );
        r.closed(old);
        assert_eq!(r.connection_count(), 1, "the new one is untouched");
        assert!(r.conn_entry(new).is_some() && r.conn_entry(old).is_none());
        assert_eq!(r.poll_transmit(new, &mut buf).map(|t| t.len), Ok(0));
    }

    /// A cluster as the host sees it: `cam` is homed on node 7, which is alive unless
    /// `dead`; `alice` may reach no one when `closed`, and no one may reach `secret`.
    /// `away` are the user IDs reachable on other nodes ([`Policy::remote`]), each at
    /// twice its index (positions need not be dense).
    #[derive(Default)]
    struct Cluster {
        dead: bool,
        closed: bool,
        away: &'static [&'static str],
    }

    impl Policy for Cluster {
        fn may_reach(&self, _: &UserId, to: &UserId) -> bool {
            !self.closed && to.as_str() != "secret"
        }
        fn remote(&self, from: u32) -> Option<(u32, UserId)> {
            let i = from.div_ceil(2) as usize;
            let user = self.away.get(i)?;
            Some((2 * i as u32, UserId::new(user).unwrap()))
        }
        fn locate(&self, user: &UserId) -> Option<Node> {
            (user.as_str() == "cam").then_some(Node(7))
        }
        fn node(&self, node: Node) -> Option<Redirect> {
            (node == Node(7) && !self.dead).then(node7)
        }
    }

    fn node7() -> Redirect {
        Redirect {
            address: NodeAddress::new("10.0.0.7:7835").unwrap(),
            fingerprint: [7; 32],
        }
    }

    type Clustered = Relay<Fixed<8, 4, { max_events_per_call(8) }>, Cluster>;
    const T: Instant = Instant::from_secs(1);

    /// Everything the connection would send now.
    fn frames(r: &mut Clustered, c: ConnId) -> heapless::Vec<Frame, 4> {
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let n = r.poll_transmit(c, &mut buf).unwrap().len;
        let mut out = heapless::Vec::new();
        let mut pos = 0;
        while let Ok(Some((Parsed::Control(f), used))) = frame::parse(&buf[pos..n]) {
            out.push(f).unwrap();
            pos += used;
        }
        out
    }

    /// A connection of `user` logged in with `caps`; the caps its LOGIN_OK confirmed.
    fn up(r: &mut Clustered, user: &str, caps: u32) -> (ConnId, u32) {
        let c = r.accept(T).unwrap();
        let login = Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).unwrap(),
            credential: Credential::Password(Password::new("pw").unwrap()),
        });
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = login.encode(&mut buf).unwrap();
        r.handle_input(T, c, &buf[..n]);
        while r.poll_event().is_some() {}
        let token = ResumeToken::from_slice(b"t").unwrap();
        r.login_verdict(T, c, Verdict::Accept { instance: 1, token });
        while r.poll_event().is_some() {}
        match &frames(r, c)[..] {
            [Frame::LoginOk(ok)] => (c, ok.caps),
            other => panic!("{other:?}"),
        }
    }

    /// `c` demands `target`: the frames it gets at once, and the events.
    fn demand(
        r: &mut Clustered,
        c: ConnId,
        target: &str,
    ) -> (heapless::Vec<Frame, 4>, heapless::Vec<Event, 8>) {
        let d = Frame::Demand(Demand {
            target: UserId::new(target).unwrap(),
            service: ServiceName::default(),
        });
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = d.encode(&mut buf).unwrap();
        r.handle_input(T, c, &buf[..n]);
        let mut events = heapless::Vec::new();
        while let Some(e) = r.poll_event() {
            if !matches!(e, Event::Wake(_)) {
                events.push(e).unwrap();
            }
        }
        (frames(r, c), events)
    }

    const FOLLOWS: u32 = caps::ALL | caps::REQUESTER | caps::REDIRECT;

    fn offline() -> Frame {
        Frame::DemandResult(DemandResult::Failed {
            error: DemandError::TargetOffline,
            text: Text::display(&DemandError::TargetOffline),
        })
    }

    #[test]
    fn a_target_on_another_node_is_a_redirect_for_a_terminal_that_follows() {
        let mut r = Clustered::new(Config::default(), Cluster::default());
        let (alice, caps) = up(&mut r, "alice", FOLLOWS);
        assert_eq!(caps, FOLLOWS, "LOGIN_OK confirms REDIRECT");
        let (got, events) = demand(&mut r, alice, "cam");
        assert_eq!(
            &got[..],
            [Frame::DemandResult(DemandResult::Redirect(node7()))]
        );
        assert!(
            matches!(&events[..], [Event::DemandRedirected { to, .. }] if to.as_str() == "cam"),
            "{events:?}"
        );
        // The connection stays idle: it may demand again at once.
        let (got, _) = demand(&mut r, alice, "bob");
        assert_eq!(&got[..], [offline()]);
    }

    /// A terminal that does not announce REDIRECT (every one before it existed, and a
    /// detour of a redirected demand) gets what it always got.
    #[test]
    fn a_terminal_that_does_not_follow_gets_target_offline() {
        let mut r = Clustered::new(Config::default(), Cluster::default());
        let (old, caps) = up(&mut r, "alice", caps::ALL | caps::REQUESTER);
        assert_eq!(caps & caps::REDIRECT, 0);
        let (got, events) = demand(&mut r, old, "cam");
        assert_eq!(&got[..], [offline()]);
        assert!(matches!(
            &events[..],
            [Event::DemandFailed {
                error: DemandError::TargetOffline,
                ..
            }]
        ));
    }

    /// The access rule first: a forbidden target's presence (here or elsewhere) is not
    /// revealed by a redirect.
    #[test]
    fn a_forbidden_target_is_not_located() {
        let closed = Cluster {
            closed: true,
            ..Cluster::default()
        };
        let mut r = Clustered::new(Config::default(), closed);
        let (alice, _) = up(&mut r, "alice", FOLLOWS);
        let (got, _) = demand(&mut r, alice, "cam");
        assert!(matches!(
            &got[..],
            [Frame::DemandResult(DemandResult::Failed {
                error: DemandError::Forbidden,
                ..
            })]
        ));
    }

    /// The node is looked up when the result is written: one that died meanwhile is
    /// `TargetOffline`, not a redirect to a dead node.
    #[test]
    fn a_node_that_died_before_the_write_is_target_offline() {
        let mut r = Clustered::new(Config::default(), Cluster::default());
        let (alice, _) = up(&mut r, "alice", FOLLOWS);
        let d = Frame::Demand(Demand {
            target: UserId::new("cam").unwrap(),
            service: ServiceName::default(),
        });
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = d.encode(&mut buf).unwrap();
        r.handle_input(T, alice, &buf[..n]);
        r.policy_mut().dead = true;
        assert_eq!(&frames(&mut r, alice)[..], [offline()]);
    }

    /// `c` asks for the online list page at `cursor`.
    fn page(r: &mut Clustered, c: ConnId, cursor: u32) -> ListAnswer {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = Frame::List { cursor }.encode(&mut buf).unwrap();
        r.handle_input(T, c, &buf[..n]);
        match &frames(r, c)[..] {
            [Frame::ListAnswer(page)] => page.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// Every page from the first: the user IDs, in order, and the cursors given.
    fn whole_list(
        r: &mut Clustered,
        c: ConnId,
    ) -> (std::vec::Vec<std::string::String>, std::vec::Vec<u32>) {
        let (mut users, mut cursors) = (std::vec::Vec::new(), std::vec::Vec::new());
        let mut cursor = 0;
        loop {
            let p = page(r, c, cursor);
            users.extend(
                p.users
                    .iter()
                    .map(|u| std::string::String::from(u.as_str())),
            );
            match p.next {
                Some(next) => cursors.push(next),
                None => return (users, cursors),
            }
            cursor = *cursors.last().unwrap();
        }
    }

    const AWAY: &[&str] = &[
        "r0", "r1", "cam", "r2", "secret", "r3", "r4", "r5", "r6", "r7", "r8",
    ];

    /// The online list covers the other nodes: this relay's terminals, then the user IDs
    /// reachable elsewhere, paged by one cursor across both (before, only the terminals).
    #[test]
    fn the_online_list_pages_across_this_relay_and_the_other_nodes() {
        let away = Cluster {
            away: AWAY,
            ..Cluster::default()
        };
        let mut r = Clustered::new(Config::default(), away);
        let (alice, _) = up(&mut r, "alice", caps::ALL);
        up(&mut r, "cam", caps::ALL);
        up(&mut r, "dev", caps::ALL);
        let (users, cursors) = whole_list(&mut r, alice);
        let remote: std::vec::Vec<&str> = AWAY
            .iter()
            .copied()
            .filter(|u| !["cam", "secret"].contains(u))
            .collect();
        let mut want = std::vec!["alice", "cam", "dev"];
        want.extend(&remote);
        assert_eq!(users, want, "once each, `secret` not at all");
        // One full page, then the rest; the cursor points among the other nodes'.
        assert_eq!(cursors.len(), 1, "{cursors:?}");
        assert!(cursors[0] >= REMOTE_CURSOR, "{cursors:?}");
        assert_eq!(page(&mut r, alice, cursors[0]).users.len(), 12 - 8);
        // A cursor past the end: an empty last page.
        let past = page(&mut r, alice, REMOTE_CURSOR + 1000);
        assert!(past.users.is_empty() && past.next.is_none());
    }

    /// The access rule holds for the other nodes' user IDs as for this relay's: an
    /// account that may reach no one sees only itself, wherever the others are.
    #[test]
    fn the_other_nodes_user_ids_follow_the_access_rule() {
        let closed = Cluster {
            away: AWAY,
            closed: true,
            ..Cluster::default()
        };
        let mut r = Clustered::new(Config::default(), closed);
        let (alice, _) = up(&mut r, "alice", caps::ALL);
        up(&mut r, "cam", caps::ALL);
        assert_eq!(whole_list(&mut r, alice).0, ["alice"]);
    }

    /// A requester of an account whose device is on another node sees its own user ID
    /// there (the asker itself is always listed); a requester is never listed itself.
    #[test]
    fn a_requester_sees_its_own_device_on_another_node() {
        let away = Cluster {
            away: &["alice"],
            closed: true,
            ..Cluster::default()
        };
        let mut r = Clustered::new(Config::default(), away);
        let (alice, _) = up(&mut r, "alice", FOLLOWS);
        assert_eq!(whole_list(&mut r, alice).0, ["alice"]);
    }

    /// A target logged in here is served here, whatever the presence rows say.
    #[test]
    fn a_target_here_is_not_redirected() {
        let mut r = Clustered::new(Config::default(), Cluster::default());
        let (cam, _) = up(&mut r, "cam", caps::ALL);
        let (alice, _) = up(&mut r, "alice", FOLLOWS);
        let (got, _) = demand(&mut r, alice, "cam");
        assert!(got.is_empty(), "{got:?}");
        assert!(matches!(&frames(&mut r, cam)[..], [Frame::Notice(_)]));
    }
}
