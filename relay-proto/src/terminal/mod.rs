//! The terminal (device) side: a [`Terminal`] owns up to `N` connections to the relay.
//!
//! It logs in once with the password, then opens the other connections with the
//! resumption credential the relay handed back, keeps `spare` of them idle so the terminal
//! stays reachable (sequence steps 10–14), sends keep-alives with jitter, reconnects with
//! back-off, routes demands to idle connections and surfaces everything else as
//! [`Event`]s. The host owns the sockets: it opens one when asked ([`Event::Open`]),
//! feeds received bytes to [`Terminal::handle_input`], writes what
//! [`Terminal::poll_transmit`] produces, and calls [`Terminal::handle_timeout`] when
//! [`Terminal::poll_timeout`] says.
//!
//! Drain [`Terminal::poll_event`] after every call. No event is ever lost (see
//! [`Terminal`]): most are derived from state, and input waits while one is not polled.

mod admission;
mod connection;
mod wire;

pub use admission::admit;

use crate::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
#[cfg(feature = "redirect")]
use crate::frame::Redirect;
use crate::frame::{ListAnswer, MAX_CONTROL_FRAME, MAX_PAYLOAD, caps};
use crate::ident::{Password, ResumeToken, ServiceName, Text, UserId};
use crate::rng::Jitter;
use crate::time::{Duration, Instant, earliest};

pub use connection::Cause;
#[cfg(feature = "redirect")]
use connection::Queued;
use connection::{Change, Connection, State};

/// A `poll_transmit` buffer must hold this much: a control frame and a keep-alive.
pub const MIN_TRANSMIT_BUF: usize = MAX_CONTROL_FRAME + 16;

/// A connection slot of a [`Terminal`]; the host maps it to its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Handle(pub u8);

/// What kind of instance of its user ID a terminal is (docs/PROTOCOL.md §10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Kind {
    /// Takes demands (a device, `relay expose`): a newer reachable login of the same user
    /// ID replaces it.
    #[default]
    Reachable,
    /// Only makes demands or asks for the online list (`relay connect`, `relay online`):
    /// its LOGIN carries [`caps::REQUESTER`](crate::frame::caps::REQUESTER), it replaces
    /// nothing and is never a demand's target; any number run at once.
    Requester,
}

impl Kind {
    /// The capability bits its LOGIN announces.
    pub(crate) const fn caps(self) -> u32 {
        match self {
            Kind::Reachable => caps::ALL,
            Kind::Requester => caps::ALL | caps::REQUESTER,
        }
    }
}

/// After ERROR `ShuttingDown` the next connection opens within this many milliseconds
/// (uniform), not after the failure back-off.
const MOVE_SPREAD_MS: u64 = 250;

/// Terminal settings. The relay's LOGIN_OK overrides the keep-alive interval.
#[derive(Debug, Clone)]
pub struct Config {
    /// Reachable or requester.
    pub kind: Kind,
    /// Idle connections to keep logged in (at least 1: one is what makes us reachable).
    pub spare: u8,
    /// Keep-alive interval until the relay announces its own.
    pub keepalive: Duration,
    /// How long an idle connection may wait for any frame after a keep-alive is due.
    pub ack_timeout: Duration,
    /// From opening a connection to LOGIN_OK.
    pub handshake_timeout: Duration,
    /// How long a demand the relay answers with `NoIdleConnection` (every connection of
    /// the target busy) is tried again before [`Event::DemandFailed`] reports it.
    pub demand_patience: Duration,
    /// The pause before each such retry.
    pub demand_retry: Duration,
    /// Follow DEMAND_RESULT `Redirect` (announce [`caps::REDIRECT`]): the host can open a
    /// connection to another node ([`Event::Redirected`]; the driver's
    /// [`Link::open_to`](crate::driver::Link::open_to)). Off, such a target is
    /// `TargetOffline`. Only with the `redirect` feature: a device, which cannot open a
    /// TLS connection to another node, leaves the code out (about 2 KB of flash).
    #[cfg(feature = "redirect")]
    pub follow_redirects: bool,
    /// First reconnect delay; doubles per failure up to `backoff_max`, ±25% jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kind: Kind::Reachable,
            spare: 1,
            keepalive: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            demand_patience: Duration::from_secs(15),
            demand_retry: Duration::from_millis(150),
            #[cfg(feature = "redirect")]
            follow_redirects: false,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// What the host must do or know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// Open a TCP (or TLS) connection to the relay for this handle, then call
    /// [`Terminal::connected`] or [`Terminal::connect_failed`]. It may come again for a
    /// handle with no `Closed` between: a connection that failed before its login while
    /// a demand waited on it is opened again (drop the old socket), until the demand's
    /// patience runs out.
    Open(Handle),
    /// This handle's connection is finished, and any session on it is over: close its
    /// socket if it is still open. The handle may be reused by a later `Open`.
    Closed { handle: Handle, cause: Cause },
    /// The first connection logged in: the terminal is reachable.
    LoggedIn,
    /// The last logged-in connection is gone: unreachable until a reconnect succeeds.
    Down,
    /// The relay refused our password (or a resumption and then the password): the
    /// terminal stops; retrying cannot help until the credentials change.
    LoginRefused { code: ErrorCode, text: Text },
    /// The relay refused a login as `Throttled`; the terminal tries again after `wait`
    /// (when the relay said how long) or its own back-off. A one-shot application may
    /// give up instead.
    Throttled { text: Text, wait: Option<Duration> },
    /// Another terminal asks for a session: answer with [`Terminal::accept`] or
    /// [`Terminal::reject`].
    Notice {
        handle: Handle,
        session: u32,
        from: UserId,
        service: ServiceName,
    },
    /// Our demand was accepted; the handle carries the session now.
    Accepted {
        handle: Handle,
        session: u32,
        peer: UserId,
    },
    /// Our demand's target is on another node: drop this handle's transport and open it
    /// to `to` (TLS, pinning `to.fingerprint`), then [`Terminal::connected`] or
    /// [`Terminal::connect_failed`], as after [`Event::Open`]. The demand goes on there,
    /// on the same handle: it logs in with the token as a requester and demands again;
    /// its answer ([`Event::Accepted`], [`Event::DemandFailed`]) comes on this handle,
    /// and the handle closes when the demand fails or its session ends. At most one per
    /// demand. Only with the `redirect` feature ([`Config::follow_redirects`]).
    #[cfg(feature = "redirect")]
    Redirected { handle: Handle, to: Redirect },
    /// Our demand failed; the handle is idle again.
    DemandFailed {
        handle: Handle,
        error: DemandError,
        text: Text,
    },
    /// The peer sent TERMINATE: all its data has arrived. We may still send ours, then
    /// [`Terminal::terminate`].
    PeerTerminated { handle: Handle },
    /// The session on this handle is over; the handle is idle again.
    SessionEnded {
        handle: Handle,
        reason: ReleaseReason,
    },
    /// A page of the online list is ready: [`Terminal::online_page`].
    OnlinePage,
    /// The relay reported a non-fatal error.
    RelayError {
        handle: Handle,
        code: ErrorCode,
        text: Text,
    },
}

/// How the host must treat the bytes it offered to `handle_input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Offer {
    /// The first `n` bytes were protocol; offer the rest (if any) again.
    Consumed(usize),
    /// The first `n` bytes are session payload: give them to the application, then offer
    /// the rest again.
    Payload(usize),
    /// The bytes hold only part of a frame: keep them and offer them again with more.
    NeedMore,
    /// Nothing was taken: the event the previous frame produced waits in
    /// [`Terminal::poll_event`]. Drain the events, then offer the same bytes again.
    Blocked,
}

/// Why an application call was refused. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SendError {
    /// No such handle, or its connection is closed.
    BadHandle,
    /// Not logged in yet, or logged out.
    NotLoggedIn,
    /// No idle connection to carry a demand or a list request.
    NoIdleConnection,
    /// The handle has no session (or we already terminated it).
    NotInSession,
    /// The handle has no notice to answer.
    NoNotice,
    /// Write what `poll_transmit` gives first: control frames go before data.
    ControlPending,
    /// More payload than the relay's announced maximum.
    TooLong,
    /// The caller's buffer is smaller than [`MIN_TRANSMIT_BUF`].
    BufferTooSmall,
    /// The relay did not announce the capability the call needs (docs/PROTOCOL.md §9).
    Unsupported(Unsupported),
}

/// A feature the relay's LOGIN_OK did not announce, so the terminal does not use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Unsupported {
    /// No `LIST` bit: the relay does not answer LIST, so no online list.
    List,
}

/// A terminal's connections to one relay. `N` is the most connections it ever holds
/// (at most 255).
///
/// Its events are derived from its state rather than queued, so none can be lost however
/// late the host drains them: a slot's `Open` and `Closed` are states of the slot (a
/// closed slot is reused only once its `Closed` was reported), `LoggedIn` and `Down` the
/// difference between being up and what the host was told, `LoginRefused` a record kept
/// until reported. The one event a frame produces waits in a single place, and
/// [`Terminal::handle_input`] takes no more input ([`Offer::Blocked`]) until it is polled.
#[derive(Debug)]
pub struct Terminal<const N: usize> {
    config: Config,
    user: UserId,
    password: Password,
    token: Option<ResumeToken>,
    /// The capabilities in force, from the latest LOGIN_OK (0 before any).
    caps: u32,
    /// The relay's keep-alive interval once known.
    keepalive: Duration,
    max_payload: u16,
    slots: [Option<Connection>; N],
    /// The event the last frame produced, until polled.
    event: Option<Event>,
    jitter: Jitter,
    /// No new connection before this instant (back-off after failures).
    retry_at: Instant,
    failures: u32,
    /// Logged out or refused: no more connections until `start`.
    stopped: bool,
    /// Which of the host's relay addresses new connections go to ([`Terminal::relay`]).
    relay: u32,
    /// Whether a connection is logged in, and whether the host was last told so.
    up: bool,
    told_up: bool,
    /// Why the terminal stopped, until reported as [`Event::LoginRefused`].
    refusal: Option<(ErrorCode, Text)>,
    list: Option<ListAnswer>,
}

impl<const N: usize> Terminal<N> {
    const SIZES_OK: () = assert!(N >= 1 && N <= 255, "Terminal<N>: need 1 <= N <= 255");

    /// A terminal that will log in as `user`. `seed` drives keep-alive and back-off
    /// jitter (give each device a different one, e.g. from its RNG).
    pub fn new(config: Config, user: UserId, password: Password, seed: u64) -> Self {
        let () = Self::SIZES_OK;
        Terminal {
            keepalive: config.keepalive,
            config,
            user,
            password,
            token: None,
            caps: 0,
            max_payload: MAX_PAYLOAD as u16,
            slots: core::array::from_fn(|_| None),
            event: None,
            jitter: Jitter::new(seed),
            retry_at: Instant::ZERO,
            failures: 0,
            stopped: true,
            relay: 0,
            up: false,
            told_up: false,
            refusal: None,
            list: None,
        }
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Whether at least one connection is logged in.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The capabilities in force ([`caps`]): the bits our LOGIN announced that the relay
    /// has too, from its latest LOGIN_OK; 0 before the first.
    pub fn caps(&self) -> u32 {
        self.caps
    }

    /// The kind of instance the relay runs us as, once a LOGIN_OK said it: a relay that
    /// does not know [`caps::REQUESTER`] runs a requester as its user ID's reachable
    /// instance (it may replace, or be replaced by, the device of the same user ID).
    pub fn runs_as(&self) -> Option<Kind> {
        match (self.caps == 0, self.caps & caps::REQUESTER != 0) {
            (true, _) => None,
            (false, true) => Some(Kind::Requester),
            (false, false) => Some(Kind::Reachable),
        }
    }

    /// Whether the relay announced `bit`.
    fn has(&self, bit: u32) -> bool {
        self.caps & bit != 0
    }

    /// Which relay address the next [`Event::Open`] is for: an index the host takes modulo
    /// the number of addresses it has (a host with one address ignores it). It moves to
    /// the next address once per relay lost: when the last logged-in connection to the
    /// current one closes, or a connection to it fails before its login while the
    /// terminal is down (connection refused, timed out, an ERROR). Connections are never
    /// spread over several relays: a reachable instance lives on one.
    pub fn relay(&self) -> u32 {
        self.relay
    }

    /// Largest DATA payload the relay accepts (65,535 until it says otherwise).
    pub fn max_payload(&self) -> usize {
        usize::from(self.max_payload)
    }

    /// Idle logged-in connections right now.
    pub fn idle_connections(&self) -> usize {
        self.conns().filter(|(_, c)| c.is_idle()).count()
    }

    /// Open connection slots right now.
    pub fn open_connections(&self) -> usize {
        self.conns().count()
    }

    /// The connections not closed.
    fn conns(&self) -> impl Iterator<Item = (Handle, &Connection)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|c| (Handle(i as u8), c)))
            .filter(|(_, c)| !c.is_closed())
    }

    /// The connections to our own relay: not the detours of redirected demands.
    fn home(&self) -> impl Iterator<Item = (Handle, &Connection)> {
        self.conns().filter(|(_, c)| !c.is_detour())
    }

    fn conn_mut(&mut self, h: Handle) -> Result<&mut Connection, SendError> {
        open_slot(&mut self.slots, h).ok_or(SendError::BadHandle)
    }

    /// The next event, if any. Drain after every call: [`Terminal::handle_input`] takes
    /// nothing more while one waits. Order: `LoggedIn`, the frame's event, each `Closed`
    /// (slot order), `Down`, `LoginRefused`, each `Open`.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.up && !self.told_up {
            self.told_up = true;
            return Some(Event::LoggedIn);
        }
        if let Some(e) = self.event.take() {
            return Some(e);
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(Connection {
                state: State::Closed(cause, _),
                ..
            }) = slot
            {
                let cause = cause.clone();
                *slot = None;
                return Some(Event::Closed {
                    handle: Handle(i as u8),
                    cause,
                });
            }
        }
        if !self.up && self.told_up {
            self.told_up = false;
            return Some(Event::Down);
        }
        if let Some((code, text)) = self.refusal.take() {
            return Some(Event::LoginRefused { code, text });
        }
        let relay = self.relay;
        self.slots.iter_mut().enumerate().find_map(|(i, slot)| {
            let Some(Connection {
                state:
                    State::Connecting {
                        announced,
                        held: false,
                        ..
                    },
                relay: opened_to,
                ..
            }) = slot
            else {
                return None;
            };
            (!*announced).then(|| {
                *announced = true;
                *opened_to = relay;
                Event::Open(Handle(i as u8))
            })
        })
    }

    /// Starts (or restarts after `logout` or a refusal) the terminal.
    pub fn start(&mut self, now: Instant) {
        self.stopped = false;
        self.failures = 0;
        self.retry_at = now;
        self.replenish(now);
    }

    /// Replaces the password (after a refusal, say) and forgets the resumption credential.
    pub fn set_password(&mut self, password: Password) {
        self.password = password;
        self.token = None;
    }

    /// Whether the pool wants another connection.
    fn wants_connection(&self) -> bool {
        if self.stopped {
            return false;
        }
        let coming = self.home().filter(|(_, c)| c.is_coming_up()).count();
        let spares = self.home().filter(|(_, c)| c.is_spare_coming_up()).count();
        let idle = self.home().filter(|(_, c)| c.is_idle()).count();
        let full = self.slots.iter().all(Option::is_some);
        // Without RESUME another connection needs a second password login, which starts
        // a new instance (a reachable one would replace us): one connection only.
        let more = self.has(caps::RESUME) || self.home().next().is_none();
        // Before the first login, one at a time: the password is checked once.
        !full
            && idle + spares < usize::from(self.config.spare.max(1))
            && (if self.up { more } else { coming == 0 })
    }

    fn replenish(&mut self, now: Instant) {
        if now >= self.retry_at {
            self.slots.iter_mut().flatten().for_each(|c| c.release(now));
        }
        while now >= self.retry_at && self.wants_connection() {
            let Some(slot) = self.slots.iter_mut().find(|s| s.is_none()) else {
                return;
            };
            *slot = Some(Connection::new(now));
        }
    }

    /// The transport for `h` is up: the connection logs in.
    pub fn connected(&mut self, h: Handle, now: Instant) {
        let with_token = self.token.is_some();
        let fallback = !self.up;
        if let Ok(c) = self.conn_mut(h) {
            c.connected(now, with_token, fallback);
        }
    }

    /// The transport for `h` could not be opened: back off, then try again.
    pub fn connect_failed(&mut self, h: Handle, now: Instant) {
        self.transport_closed(h, now);
    }

    /// The transport for `h` closed or failed (read EOF, write error, reset).
    pub fn transport_closed(&mut self, h: Handle, now: Instant) {
        if let Ok(c) = self.conn_mut(h) {
            c.transport_closed();
            self.settle(h, now);
        }
        self.replenish(now);
    }

    /// After a call into `h`'s connection, which was open: if it closed, back off after a
    /// failure, stop on a cause that retrying cannot fix, and track whether we are up.
    fn settle(&mut self, h: Handle, now: Instant) {
        let Some(Connection {
            state: State::Closed(cause, _),
            relay,
            ..
        }) = self.slots.get(usize::from(h.0)).and_then(Option::as_ref)
        else {
            return;
        };
        let (cause, opened_to) = (cause.clone(), *relay);
        if self.is_detour(h) {
            // A detour's end is its demand's: no back-off, no stop, no retry here, and
            // our relay is not lost.
            return;
        }
        if cause == Cause::Relay(ErrorCode::ShuttingDown) {
            // The relay leaves on purpose (it stops, drains, or is fenced from its
            // cluster): not a failure. Move on almost at once, spread so that all its
            // terminals do not arrive at the next relay in the same instant.
            let spread = Duration::from_millis(u64::from(self.jitter.next_u32()) % MOVE_SPREAD_MS);
            self.retry_at = self.retry_at.max(now + spread);
        } else if cause != Cause::Local {
            self.failures = self.failures.saturating_add(1);
            let exp = self.failures.clamp(1, 16) - 1;
            let delay = self
                .config
                .backoff_min
                .saturating_mul(1 << exp)
                .min(self.config.backoff_max);
            self.retry_at = self.retry_at.max(now + self.jitter.spread(delay, 25));
        }
        let up = self.home().any(|(_, c)| c.is_logged_in());
        self.up = up;
        // The relay is lost (or was never reached): the next connection tries the next
        // address. Once per relay: the other connections it held close with the old index.
        if cause != Cause::Local && !up && opened_to == self.relay {
            self.relay = self.relay.wrapping_add(1);
        }
        // Another instance of this user ID took over, or the account is gone.
        if let Cause::Relay(code @ (ErrorCode::Replaced | ErrorCode::AccountRemoved)) = cause {
            self.stop(Cause::Relay(code));
            self.refuse(code, Text::lossy(code.describe()));
        }
        // A demand waiting for this connection's login waits for the next attempt.
        if !self.stopped
            && cause != Cause::Local
            && let Some(c) = self
                .slots
                .get_mut(usize::from(h.0))
                .and_then(Option::as_mut)
        {
            c.requeue(now);
        }
    }

    fn is_detour(&self, h: Handle) -> bool {
        matches!(self.slots.get(usize::from(h.0)), Some(Some(c)) if c.is_detour())
    }

    /// Whether `h` is held for a waiting demand until the back-off ends: its transport,
    /// if any, is finished (an [`Event::Open`] for `h` follows, with no `Closed`).
    pub(crate) fn is_held(&self, h: Handle) -> bool {
        matches!(self.slots.get(usize::from(h.0)), Some(Some(c)) if c.is_held())
    }

    /// Stops for good (until `start`) and keeps why for [`Event::LoginRefused`]. The first
    /// reason stands until it is reported.
    fn refuse(&mut self, code: ErrorCode, text: Text) {
        self.refusal.get_or_insert((code, text));
    }

    /// Turns one frame's change into an event and pool decisions.
    ///
    /// Never inlined: inlined into the host's receive loop (relay-proto's driver, with
    /// LTO), the moves of `Change` into `Event` (texts and user IDs, their `u8` lengths
    /// at odd offsets) become per-field loads and stores; a call keeps them one copy.
    /// 2,096 B of flash on the firmware (`firmware/size.sh`).
    #[inline(never)]
    fn apply(&mut self, h: Handle, change: Change, now: Instant) -> Option<Event> {
        // ERROR Throttled's `retry_after`: it replaces our own back-off.
        let mut relay_wait = None;
        let event = match change {
            Change::Quiet => return None,
            Change::None => None,
            Change::LoggedIn {
                caps: in_force,
                token,
                keepalive,
                max_payload,
            } => {
                self.caps = in_force;
                // A relay without RESUME would not take the token back.
                self.token = self.has(caps::RESUME).then_some(token);
                self.keepalive = keepalive;
                self.max_payload = max_payload;
                self.failures = 0;
                self.retry_at = now;
                self.up = true;
                None
            }
            Change::LoginRefused {
                code,
                text,
                with_token,
                retry_after,
            } => {
                // A refused password cannot be fixed by retrying; a replaced instance or
                // a removed account must stop. A refused (expired) token is retried.
                let hopeless = match code {
                    ErrorCode::AuthFailed => !with_token,
                    ErrorCode::Replaced | ErrorCode::AccountRemoved => true,
                    _ => false,
                };
                if hopeless {
                    self.stop(Cause::Relay(code));
                    self.refuse(code, text);
                    None
                } else if code == ErrorCode::Throttled {
                    let wait = retry_after.map(|s| Duration::from_secs(s.into()));
                    relay_wait = wait;
                    Some(Event::Throttled { text, wait })
                } else {
                    None
                }
            }
            Change::Notice {
                session,
                from,
                service,
            } => Some(Event::Notice {
                handle: h,
                session,
                from,
                service,
            }),
            Change::Accepted { session, peer } => Some(Event::Accepted {
                handle: h,
                session,
                peer,
            }),
            Change::DemandFailed { error, text } => Some(Event::DemandFailed {
                handle: h,
                error,
                text,
            }),
            #[cfg(feature = "redirect")]
            Change::Redirected { to, demand } => Some(self.follow(h, to, demand, now)),
            Change::PeerTerminated => Some(Event::PeerTerminated { handle: h }),
            Change::Released { reason } => Some(Event::SessionEnded { handle: h, reason }),
            Change::ListPage(page) => {
                self.list = Some(page);
                Some(Event::OnlinePage)
            }
            Change::RelayError { code, text } => Some(Event::RelayError {
                handle: h,
                code,
                text,
            }),
        };
        self.settle(h, now);
        if let Some(wait) = relay_wait {
            // The relay said when: sooner is refused again, later is wasted.
            self.retry_at = now + wait;
        }
        self.replenish(now);
        event
    }

    /// A demand on `h` was redirected: it moves there with the token, or, with no token
    /// to log in there (a relay without `RESUME`), ends as `TargetOffline` (the
    /// connection is idle here).
    #[cfg(feature = "redirect")]
    fn follow(&mut self, h: Handle, to: Redirect, demand: Queued, now: Instant) -> Event {
        let token = self.token.is_some();
        let Ok(c) = self.conn_mut(h) else {
            return Event::Closed {
                handle: h,
                cause: Cause::Local,
            };
        };
        if token {
            c.detour(now, demand);
            return Event::Redirected { handle: h, to };
        }
        Event::DemandFailed {
            handle: h,
            error: DemandError::TargetOffline,
            text: Text::lossy(DemandError::TargetOffline.describe()),
        }
    }

    /// Closes every open connection and opens no more.
    fn stop(&mut self, cause: Cause) {
        self.stopped = true;
        for i in 0..N {
            if let Ok(c) = self.conn_mut(Handle(i as u8)) {
                c.close(cause.clone());
            }
        }
        self.up = false;
    }

    /// Takes bytes received on `h`. Call again with the rest until it is used up or the
    /// answer is [`Offer::NeedMore`] (or [`Offer::Blocked`]: drain the events first).
    /// Bytes for an unknown or closed handle are swallowed.
    pub fn handle_input(&mut self, h: Handle, now: Instant, input: &[u8]) -> Offer {
        if self.event.is_some() {
            return Offer::Blocked;
        }
        let Some(c) = open_slot(&mut self.slots, h) else {
            return Offer::Consumed(input.len());
        };
        let (offer, change) = c.handle_input(now, &self.config, input, &mut self.jitter);
        self.event = self.apply(h, change, now);
        offer
    }

    /// Writes `h`'s pending control frames into `buf` (at least [`MIN_TRANSMIT_BUF`]).
    /// Returns how many bytes to send; 0 when there is nothing.
    pub fn poll_transmit(
        &mut self,
        h: Handle,
        now: Instant,
        buf: &mut [u8],
    ) -> Result<usize, SendError> {
        let c = open_slot(&mut self.slots, h).ok_or(SendError::BadHandle)?;
        let caps = match c.is_detour() {
            // A detour never replaces the device it reaches, nor is redirected again.
            true => Kind::Requester.caps(),
            #[cfg(feature = "redirect")]
            false if self.config.follow_redirects => self.config.kind.caps() | caps::REDIRECT,
            false => self.config.kind.caps(),
        };
        let login = wire::LoginAs {
            user: &self.user,
            password: &self.password,
            token: self.token.as_ref(),
            caps,
        };
        let n = c.poll_transmit(buf, &login)?;
        // After LOGOUT the connection closes here.
        self.settle(h, now);
        Ok(n)
    }

    /// Whether `h` has control frames waiting for `poll_transmit`.
    pub fn has_output(&self, h: Handle) -> bool {
        matches!(self.slots.get(usize::from(h.0)), Some(Some(c)) if c.has_output())
    }

    /// The earliest instant at which [`Terminal::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let held = self.conns().any(|(_, c)| c.is_held());
        let mut t = if self.wants_connection() || held {
            Some(self.retry_at)
        } else {
            None
        };
        for (_, c) in self.conns() {
            t = earliest(t, c.poll_timeout(&self.config, self.keepalive));
        }
        t
    }

    /// Runs timers: keep-alives, deadlines, reconnects. Calling early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        let keepalive = self.keepalive;
        for i in 0..N {
            let h = Handle(i as u8);
            let Some(c) = self.slots[i].as_mut().filter(|c| !c.is_closed()) else {
                continue;
            };
            c.handle_timeout(now, &self.config, keepalive, &mut self.jitter);
            self.settle(h, now);
        }
        self.replenish(now);
    }

    /// Asks the relay for a session with `target` on an idle connection (step 6).
    /// The answer is [`Event::Accepted`] or [`Event::DemandFailed`] on the returned handle.
    /// While the relay answers `NoIdleConnection` the demand is made again, every
    /// `demand_retry`, until `demand_patience` from `now` has passed.
    ///
    /// With no idle connection the demand waits for a spare connection coming up, or a
    /// new one opened for it (one login away, with the token), and is made once that
    /// connection logs in; if it closes first, its [`Event::Closed`] ends the demand.
    /// While the terminal is down (reconnecting) the demand takes the connection that
    /// opens when the back-off ends. `NoIdleConnection` only when every slot is taken (or
    /// the relay has no `RESUME`), `NotLoggedIn` once stopped (logged out or refused).
    pub fn demand(
        &mut self,
        target: UserId,
        service: ServiceName,
        now: Instant,
    ) -> Result<Handle, SendError> {
        let h = match self.idle_handle() {
            Ok(h) => h,
            Err(e) => self.carrier(now).ok_or(e)?,
        };
        let give_up = now + self.config.demand_patience;
        self.conn_mut(h)?.demand(target, service, give_up);
        self.replenish(now);
        Ok(h)
    }

    /// A connection on its way up that no demand waits for yet, or a new one: opened
    /// now while up, else held until the reconnect back-off ends.
    fn carrier(&mut self, now: Instant) -> Option<Handle> {
        let coming = self.home().find(|(_, c)| c.is_spare_coming_up());
        if let Some((h, _)) = coming {
            return Some(h);
        }
        if self.stopped || (self.up && !self.has(caps::RESUME)) {
            return None;
        }
        let i = self.slots.iter().position(Option::is_none)?;
        let c = match self.up {
            true => Connection::new(now),
            false => Connection::held(now),
        };
        *self.slots.get_mut(i)? = Some(c);
        Some(Handle(i as u8))
    }

    fn idle_handle(&self) -> Result<Handle, SendError> {
        // Logged out: the connection carrying LOGOUT is still up, but not ours to use.
        if !self.up || self.stopped {
            return Err(SendError::NotLoggedIn);
        }
        self.home()
            .find(|(_, c)| c.is_idle())
            .map(|(h, _)| h)
            .ok_or(SendError::NoIdleConnection)
    }

    /// Accepts the notice on `h` (step 8): `h` carries the session from now on.
    pub fn accept(&mut self, h: Handle, now: Instant) -> Result<(), SendError> {
        self.conn_mut(h)?.accept()?;
        self.replenish(now);
        Ok(())
    }

    /// Rejects the notice on `h`; the requester gets `reason` and its text
    /// ([`RejectReason::describe`]).
    pub fn reject(&mut self, h: Handle, reason: RejectReason) -> Result<(), SendError> {
        self.conn_mut(h)?.reject(reason)
    }

    /// The DATA header for `len` payload bytes on `h`'s session. Write it, then exactly
    /// `len` bytes of payload, before anything else on that connection. Refused while
    /// control output is pending (write `poll_transmit`'s bytes first).
    pub fn send_data(&mut self, h: Handle, len: usize) -> Result<[u8; 3], SendError> {
        let max = self.max_payload;
        self.conn_mut(h)?.send_data(len, max)
    }

    /// Ends our direction of the session on `h` (step 19): we send no more data. The
    /// session is over when the peer has terminated too ([`Event::SessionEnded`]).
    pub fn terminate(&mut self, h: Handle) -> Result<(), SendError> {
        self.conn_mut(h)?.terminate()
    }

    /// The session on `h`: its id and the peer's user ID.
    pub fn session(&self, h: Handle) -> Option<(u32, &UserId)> {
        match &self.slots.get(usize::from(h.0))?.as_ref()?.state {
            State::Session { session, peer, .. } => Some((*session, peer)),
            _ => None,
        }
    }

    /// Asks for a page of the online list; `cursor` 0 is the first page.
    /// Refused with [`Unsupported::List`] when the relay did not announce [`caps::LIST`].
    pub fn request_online(&mut self, cursor: u32) -> Result<Handle, SendError> {
        let h = self.idle_handle()?;
        if !self.has(caps::LIST) {
            return Err(SendError::Unsupported(Unsupported::List));
        }
        self.conn_mut(h)?.list(cursor)?;
        Ok(h)
    }

    /// The page that [`Event::OnlinePage`] announced.
    pub fn online_page(&self) -> Option<&ListAnswer> {
        self.list.as_ref()
    }

    /// Logs out (step 22): LOGOUT goes out on one logged-in connection; every other
    /// connection closes now, that one once LOGOUT is written. No reconnects until `start`.
    pub fn logout(&mut self, now: Instant) {
        let carrier = self.home().find(|(_, c)| c.is_logged_in()).map(|(h, _)| h);
        self.stopped = true;
        for i in 0..N {
            let h = Handle(i as u8);
            // A carrier that owes too much for a LOGOUT closes like the others.
            let carried = Some(h) == carrier && self.conn_mut(h).and_then(|c| c.logout()).is_ok();
            if let (false, Ok(c)) = (carried, self.conn_mut(h)) {
                c.close(Cause::Local);
                self.settle(h, now);
            }
        }
    }
}

/// `h`'s connection unless it is closed (a closed one only waits to be reported).
fn open_slot(slots: &mut [Option<Connection>], h: Handle) -> Option<&mut Connection> {
    slots
        .get_mut(usize::from(h.0))
        .and_then(Option::as_mut)
        .filter(|c| !c.is_closed())
}

#[cfg(test)]
mod tests;
