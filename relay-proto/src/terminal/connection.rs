//! One TCP connection of a terminal, from the terminal's side.
//!
//! ```text
//!  Connecting --connected--> LoggingIn --LOGIN_OK--> Idle <-----------------------+
//!                               |                    |  \                           |
//!                          ERROR/close         DEMAND |   NOTICE                    |
//!                                                    v     v                         |
//!                                            Demanding   Noticed --REJECT--> Idle   |
//!                                       RESULT ok |         | ACCEPT                 |
//!                                                 v         v                        |
//!                                                 +-> Session --RELEASE--------------+
//! ```
//! Any state can end in `Closed` (peer closed, fatal ERROR, keep-alive missed, logout).
//! The [`Terminal`](super::Terminal) owns these and gives them handles.

use crate::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
use crate::frame::{self, DemandResult, Redirect};
use crate::ident::{ResumeToken, ServiceName, Text, UserId};
use crate::rng::Jitter;
use crate::time::{Duration, Instant};

use heapless::Deque;

use super::wire::{self, Cred, Inbound, LoginAs, NoRoom, Outbound};
use super::{Config, Offer, SendError};

/// A control frame an application call owes the relay until `poll_transmit` writes it.
/// They wait in call order, so no call overwrites another's frame. LOGIN and DEMAND are
/// not here: they are owed by the state itself ([`State::LoggingIn`],
/// [`State::Demanding`]), and nothing else can be owed before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Accept(u32),
    /// The text is the reason's ([`RejectReason::describe`]): nothing to store.
    Reject {
        session: u32,
        reason: RejectReason,
    },
    Terminate,
    List(u32),
    Logout,
}

/// The most frames calls can owe between two flushes: a LIST (on an idle connection), an
/// answer to the NOTICE that arrives next, the session's TERMINATE and the LOGOUT. A call
/// that finds no room is refused with [`SendError::ControlPending`] before it changes
/// anything.
const OWED: usize = 4;

#[derive(Debug, Clone)]
pub(crate) enum State {
    /// The host is opening the TCP connection; `announced`: [`super::Event::Open`] was
    /// reported. `held`: not yet, a demand made while the terminal was down keeps this
    /// slot until the back-off ends. `queued`: a demand made once it logs in.
    ///
    /// The waiting demand lives in the states that can have one (coming up, and closed
    /// until [`Connection::requeue`] decides), not beside the state: those variants are
    /// no larger than `Demanding`, so it costs no RAM (80 bytes per connection beside it).
    Connecting {
        since: Instant,
        announced: bool,
        held: bool,
        queued: Option<Queued>,
    },
    /// LOGIN owed (`sent` false) or sent, no answer yet. `fallback`: a refused token may
    /// be followed by the password (only when no other connection is up: else we were
    /// replaced). `queued`: a demand made once it logs in.
    LoggingIn {
        since: Instant,
        with_token: bool,
        fallback: bool,
        sent: bool,
        queued: Option<Queued>,
    },
    Idle,
    /// Our demand: DEMAND owed, sent, or to be sent again. The relay's answer
    /// `NoIdleConnection` (the target's connections are all busy) is retried until
    /// `give_up`; only then is it the application's.
    Demanding {
        target: UserId,
        service: ServiceName,
        give_up: Instant,
        step: Step,
    },
    /// NOTICE received; the application must accept or reject.
    Noticed {
        session: u32,
        from: UserId,
    },
    /// Paired. `sent_end`: we sent TERMINATE; `got_end`: the peer's TERMINATE arrived.
    Session {
        session: u32,
        peer: UserId,
        sent_end: bool,
        got_end: bool,
    },
    /// Finished; the slot is freed once [`super::Event::Closed`] is reported. The demand
    /// that waited for its login, if any, until [`Connection::requeue`] holds it again.
    Closed(Cause, Option<Queued>),
}

/// Where a demand stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// DEMAND to write.
    Owed,
    /// Written; waiting for DEMAND_RESULT.
    Sent,
    /// The relay had no idle connection of the target: DEMAND again at this instant.
    RetryAt(Instant),
}

/// What a frame or timer did to a connection, for the [`Terminal`](super::Terminal) to
/// turn into events and pool decisions.
// No allocator, so no boxing; a change is built and consumed within one call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The connection may have changed state (closed, say): the terminal settles it.
    None,
    /// Bytes of a running session (payload, a DATA header) or a keep-alive's answer: the
    /// connection's state is as it was, so the terminal has nothing to settle, replenish
    /// or announce. (The common case by far: skipping that work is most of a stream's
    /// cost on a terminal with many slots.)
    Quiet,
    LoggedIn {
        caps: u32,
        token: ResumeToken,
        keepalive: Duration,
        max_payload: u16,
    },
    LoginRefused {
        code: ErrorCode,
        text: Text,
        with_token: bool,
        /// Seconds the relay asks us to wait (ERROR `Throttled`).
        retry_after: Option<u32>,
    },
    Notice {
        session: u32,
        from: UserId,
        service: ServiceName,
    },
    Accepted {
        session: u32,
        peer: UserId,
    },
    DemandFailed {
        error: DemandError,
        text: Text,
    },
    /// The relay redirected our demand to another node; the connection is idle here, and
    /// `demand` goes there if the terminal moves the connection ([`Connection::detour`]).
    #[cfg(feature = "redirect")]
    Redirected {
        to: Redirect,
        demand: Queued,
    },
    PeerTerminated,
    Released {
        reason: ReleaseReason,
    },
    ListPage(frame::ListAnswer),
    RelayError {
        code: ErrorCode,
        text: Text,
    },
}

/// Why a connection ended, as the terminal saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Cause {
    /// The relay sent a fatal ERROR frame.
    Relay(ErrorCode),
    /// The relay sent bytes that are not a valid frame, or a frame not allowed now.
    Protocol,
    /// Nothing arrived within the keep-alive deadline.
    KeepAliveTimeout,
    /// No LOGIN_OK within the handshake deadline.
    HandshakeTimeout,
    /// The transport failed or the peer closed it.
    Transport,
    /// The application logged out or closed it.
    Local,
}

#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) state: State,
    owed: Deque<Owed, OWED>,
    /// Sequence number of the next KEEPALIVE; an unanswered one is `ka_unacked`.
    ka_seq: u32,
    ka_due: bool,
    next_ka: Instant,
    last_rx: Instant,
    /// Payload bytes of the current incoming DATA frame not yet handed to the caller.
    rx_payload: u16,
    /// Close once the pending output is flushed (after LOGOUT).
    close_after_flush: bool,
    login_attempts: u8,
    /// Opened to another node for one redirected demand (docs/PROTOCOL.md §10.6): it
    /// logs in there as a requester with the token, never falls back to the password,
    /// carries that demand and its session only, and closes when they end. It is not one
    /// of the terminal's connections to its relay.
    #[cfg(feature = "redirect")]
    detour: bool,
    /// The relay address it was opened to ([`super::Terminal::relay`] when announced).
    pub(crate) relay: u32,
}

/// A demand waiting for its connection's login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    target: UserId,
    service: ServiceName,
    give_up: Instant,
    /// Its DEMAND is written already, right behind the LOGIN (a detour's: the relay
    /// holds it until the login's verdict, docs/PROTOCOL.md §6.2, so it costs no round
    /// trip of its own).
    sent: bool,
}

impl Connection {
    pub(crate) fn new(now: Instant) -> Self {
        Self::opening(now, false)
    }

    /// A connection held until the back-off ends ([`Connection::release`]).
    pub(crate) fn held(now: Instant) -> Self {
        Self::opening(now, true)
    }

    fn opening(now: Instant, held: bool) -> Self {
        Connection {
            state: State::Connecting {
                since: now,
                announced: false,
                held,
                queued: None,
            },
            owed: Deque::new(),
            ka_seq: 0,
            ka_due: false,
            next_ka: now,
            last_rx: now,
            rx_payload: 0,
            close_after_flush: false,
            login_attempts: 0,
            #[cfg(feature = "redirect")]
            detour: false,
            relay: 0,
        }
    }

    /// Moves this connection, whose demand was just redirected ([`Change::Redirected`]),
    /// to the other node: the host drops its transport and opens one there
    /// ([`super::Event::Redirected`] announces it), and the demand is made once it logs in.
    #[cfg(feature = "redirect")]
    pub(crate) fn detour(&mut self, now: Instant, demand: Queued) {
        *self = Connection {
            detour: true,
            state: State::Connecting {
                since: now,
                announced: true,
                held: false,
                queued: Some(demand),
            },
            ..Connection::new(now)
        };
    }

    /// The demand waiting for this connection's login.
    fn queued(&self) -> Option<&Queued> {
        match &self.state {
            State::Connecting { queued, .. }
            | State::LoggingIn { queued, .. }
            | State::Closed(_, queued) => queued.as_ref(),
            _ => None,
        }
    }

    /// Where a waiting demand is kept: `None` in the states that cannot have one.
    fn queued_mut(&mut self) -> Option<&mut Option<Queued>> {
        match &mut self.state {
            State::Connecting { queued, .. }
            | State::LoggingIn { queued, .. }
            | State::Closed(_, queued) => Some(queued),
            _ => None,
        }
    }

    /// Whether this is a detour ([`Connection::detour`]). Never, without the `redirect`
    /// feature: the constant lets the compiler drop every detour branch from a device
    /// build.
    pub(crate) fn is_detour(&self) -> bool {
        #[cfg(feature = "redirect")]
        return self.detour;
        #[cfg(not(feature = "redirect"))]
        false
    }

    /// The back-off is over: a held connection opens now.
    pub(crate) fn release(&mut self, now: Instant) {
        if let State::Connecting { since, held, .. } = &mut self.state
            && *held
        {
            *held = false;
            *since = now;
        }
    }

    /// Failed before its login while a demand waits on it: held again for the next
    /// attempt (after the back-off), until the demand's patience runs out.
    pub(crate) fn requeue(&mut self, now: Instant) {
        let waiting = self.queued().is_some_and(|q| now < q.give_up);
        if let (true, State::Closed(_, queued)) = (waiting, &mut self.state) {
            let queued = queued.take();
            *self = Connection::held(now);
            if let Some(slot) = self.queued_mut() {
                *slot = queued;
            }
        }
    }

    pub(crate) fn is_held(&self) -> bool {
        matches!(self.state, State::Connecting { held: true, .. })
    }

    /// The TCP connection is up: log in with the token if there is one.
    pub(crate) fn connected(&mut self, now: Instant, with_token: bool, fallback: bool) {
        if let State::Connecting {
            held: false,
            queued,
            ..
        } = &mut self.state
        {
            let queued = queued.take();
            self.state = State::LoggingIn {
                since: now,
                with_token,
                fallback: fallback && !self.is_detour(),
                sent: false,
                queued,
            };
            self.last_rx = now;
            self.login_attempts = 1;
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle) && self.owed.is_empty() && !self.close_after_flush
    }

    pub(crate) fn is_logged_in(&self) -> bool {
        !matches!(
            self.state,
            State::Connecting { .. } | State::LoggingIn { .. } | State::Closed(..)
        )
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(..))
    }

    /// Whether this connection is on its way to being logged in.
    pub(crate) fn is_coming_up(&self) -> bool {
        matches!(
            self.state,
            State::Connecting { .. } | State::LoggingIn { .. }
        )
    }

    /// Whether it will be idle once logged in (no demand waits for it).
    pub(crate) fn is_spare_coming_up(&self) -> bool {
        self.is_coming_up() && self.queued().is_none()
    }

    /// Ends the connection; the terminal sees the state and does the rest (a waiting
    /// demand stays for [`Connection::requeue`]).
    pub(crate) fn close(&mut self, cause: Cause) -> Change {
        let queued = self.queued_mut().and_then(Option::take);
        self.state = State::Closed(cause, queued);
        self.owed.clear();
        Change::None
    }

    /// Encodes owed control frames into `buf`, in the order they were owed, as many as
    /// fit (each fits alone in [`super::MIN_TRANSMIT_BUF`]), then a due KEEPALIVE.
    /// Returns the number of bytes written.
    pub(crate) fn poll_transmit(
        &mut self,
        buf: &mut [u8],
        login: &LoginAs<'_>,
    ) -> Result<usize, SendError> {
        if buf.len() < super::MIN_TRANSMIT_BUF {
            return Err(SendError::BufferTooSmall);
        }
        let mut written = 0;
        loop {
            let rest = buf.get_mut(written..).unwrap_or_default();
            match self.encode_owed(rest, login) {
                Some(Ok(n)) => {
                    written += n;
                    self.mark_sent();
                }
                Some(Err(NoRoom)) | None => break,
            }
        }
        if self.ka_due {
            let rest = buf.get_mut(written..).unwrap_or_default();
            if let Ok(n) = Outbound::KeepAlive(self.ka_seq).encode(rest) {
                self.ka_seq = self.ka_seq.wrapping_add(1);
                self.ka_due = false;
                written += n;
            }
        }
        if self.close_after_flush && written == 0 && !self.has_output() {
            self.close(Cause::Local);
        }
        Ok(written)
    }

    /// Encodes the first owed frame into `buf`; `None` when nothing is owed.
    fn encode_owed(&self, buf: &mut [u8], login: &LoginAs<'_>) -> Option<Result<usize, NoRoom>> {
        let frame = match &self.state {
            State::LoggingIn {
                with_token,
                sent: false,
                ..
            } => {
                let credential = match (with_token, login.token) {
                    (true, Some(t)) => Cred::Resume(t),
                    _ => Cred::Password(login.password),
                };
                Outbound::Login {
                    user: login.user,
                    caps: login.caps,
                    credential,
                }
            }
            State::Demanding {
                target,
                service,
                step: Step::Owed,
                ..
            } => Outbound::Demand { target, service },
            State::LoggingIn {
                sent: true,
                queued: Some(q),
                ..
            } if self.pipelines() => Outbound::Demand {
                target: &q.target,
                service: &q.service,
            },
            _ => match *self.owed.front()? {
                Owed::Accept(session) => Outbound::Accept(session),
                Owed::Reject { session, reason } => Outbound::Reject { session, reason },
                Owed::Terminate => Outbound::Terminate,
                Owed::List(cursor) => Outbound::List(cursor),
                Owed::Logout => Outbound::Logout,
            },
        };
        Some(frame.encode(buf))
    }

    /// A detour's DEMAND is owed right behind its LOGIN: a detour never falls back to
    /// the password, so the relay answers that DEMAND in the state the token's verdict
    /// leads to (logged in), or the refused login ends the demand anyway.
    fn pipelines(&self) -> bool {
        self.is_detour() && self.queued().is_some_and(|q| !q.sent)
    }

    /// The frame [`Connection::encode_owed`] encoded is written.
    fn mark_sent(&mut self) {
        let pipelined = self.pipelines();
        match &mut self.state {
            State::LoggingIn {
                sent: true,
                queued: Some(q),
                ..
            } if pipelined => q.sent = true,
            State::LoggingIn { sent, .. } if !*sent => *sent = true,
            State::Demanding { step, .. } if *step == Step::Owed => *step = Step::Sent,
            _ => {
                self.owed.pop_front();
            }
        }
    }

    pub(crate) fn has_output(&self) -> bool {
        let state_owes = matches!(
            self.state,
            State::LoggingIn { sent: false, .. }
                | State::Demanding {
                    step: Step::Owed,
                    ..
                }
        ) || (matches!(self.state, State::LoggingIn { .. }) && self.pipelines());
        state_owes || !self.owed.is_empty() || self.ka_due
    }

    /// Queues `o` if there is room and the connection is not logging out; `change` runs
    /// only then, so a refused call changes nothing.
    fn owe(&mut self, o: Owed, change: impl FnOnce(&mut State)) -> Result<(), SendError> {
        if self.close_after_flush {
            return Err(SendError::NotLoggedIn);
        }
        if self.owed.is_full() {
            return Err(SendError::ControlPending);
        }
        change(&mut self.state);
        self.owed
            .push_back(o)
            .map_err(|_| SendError::ControlPending)
    }

    /// The header for `len` bytes of session payload the caller writes right after it.
    pub(crate) fn send_data(&mut self, len: usize, max: u16) -> Result<[u8; 3], SendError> {
        match self.state {
            State::Session {
                sent_end: false, ..
            } => {}
            _ => return Err(SendError::NotInSession),
        }
        if self.has_output() {
            return Err(SendError::ControlPending);
        }
        if len > usize::from(max) {
            return Err(SendError::TooLong);
        }
        frame::data_header(len).map_err(|_| SendError::TooLong)
    }

    /// Only on an idle connection (see [`Connection::is_idle`]): nothing else is owed;
    /// or on a spare coming up ([`Connection::is_spare_coming_up`]): made at its login.
    pub(crate) fn demand(&mut self, target: UserId, service: ServiceName, give_up: Instant) {
        if let (true, Some(queued)) = (self.is_coming_up(), self.queued_mut()) {
            *queued = Some(Queued {
                target,
                service,
                give_up,
                sent: false,
            });
            return;
        }
        self.state = State::Demanding {
            target,
            service,
            give_up,
            step: Step::Owed,
        };
    }

    pub(crate) fn accept(&mut self) -> Result<(), SendError> {
        let State::Noticed { session, .. } = self.state else {
            return Err(SendError::NoNotice);
        };
        self.owe(Owed::Accept(session), |state| {
            if let State::Noticed { session, from } = state {
                let peer = core::mem::take(from);
                *state = State::Session {
                    session: *session,
                    peer,
                    sent_end: false,
                    got_end: false,
                };
            }
        })
    }

    pub(crate) fn reject(&mut self, reason: RejectReason) -> Result<(), SendError> {
        let State::Noticed { session, .. } = self.state else {
            return Err(SendError::NoNotice);
        };
        self.owe(Owed::Reject { session, reason }, |state| {
            *state = State::Idle
        })
    }

    pub(crate) fn terminate(&mut self) -> Result<(), SendError> {
        if !matches!(
            self.state,
            State::Session {
                sent_end: false,
                ..
            }
        ) {
            return Err(SendError::NotInSession);
        }
        self.owe(Owed::Terminate, |state| {
            if let State::Session { sent_end, .. } = state {
                *sent_end = true;
            }
        })
    }

    /// Only on an idle connection, like [`Connection::demand`].
    pub(crate) fn list(&mut self, cursor: u32) -> Result<(), SendError> {
        self.owe(Owed::List(cursor), |_| {})
    }

    /// LOGOUT after whatever is owed; the connection closes once it is written.
    pub(crate) fn logout(&mut self) -> Result<(), SendError> {
        self.owe(Owed::Logout, |_| {})?;
        self.close_after_flush = true;
        Ok(())
    }

    /// The next instant at which [`Connection::handle_timeout`] has work.
    pub(crate) fn poll_timeout(&self, cfg: &Config, keepalive: Duration) -> Option<Instant> {
        match self.state {
            // The terminal releases it at its back-off instant.
            State::Connecting { held: true, .. } | State::Closed(..) => None,
            State::Connecting { since, .. } | State::LoggingIn { since, .. } => {
                Some(since + cfg.handshake_timeout)
            }
            _ => {
                let alive = self
                    .next_ka
                    .min(self.last_rx + self.rx_timeout(cfg, keepalive));
                Some(match self.state {
                    State::Demanding {
                        step: Step::RetryAt(t),
                        ..
                    } => alive.min(t),
                    _ => alive,
                })
            }
        }
    }

    /// How long the relay may stay silent. While a session runs, our own KEEPALIVE can sit
    /// behind a backlog of payload, so the allowance is the relay's (3 intervals).
    fn rx_timeout(&self, cfg: &Config, keepalive: Duration) -> Duration {
        match self.state {
            State::Session { .. } => keepalive.saturating_mul(3),
            _ => keepalive + cfg.ack_timeout,
        }
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        cfg: &Config,
        keepalive: Duration,
        jitter: &mut Jitter,
    ) {
        match self.state {
            State::Connecting { held: true, .. } | State::Closed(..) => {}
            State::Connecting { since, .. } | State::LoggingIn { since, .. } => {
                if now >= since + cfg.handshake_timeout {
                    self.close(Cause::HandshakeTimeout);
                }
            }
            _ => {
                if now >= self.last_rx + self.rx_timeout(cfg, keepalive) {
                    self.close(Cause::KeepAliveTimeout);
                    return;
                }
                if now >= self.next_ka {
                    self.ka_due = true;
                    self.next_ka = now + jitter.spread(keepalive, 10);
                }
                if let State::Demanding { step, .. } = &mut self.state
                    && matches!(*step, Step::RetryAt(t) if now >= t)
                {
                    *step = Step::Owed;
                }
            }
        }
    }

    /// Takes bytes received from the relay. See [`Offer`].
    pub(crate) fn handle_input(
        &mut self,
        now: Instant,
        cfg: &Config,
        input: &[u8],
        jitter: &mut Jitter,
    ) -> (Offer, Change) {
        if input.is_empty() {
            return (Offer::NeedMore, Change::Quiet);
        }
        self.last_rx = now;
        if self.rx_payload > 0 {
            let n = input.len().min(usize::from(self.rx_payload));
            self.rx_payload -= n as u16;
            return (Offer::Payload(n), Change::Quiet);
        }
        match wire::parse(input) {
            Ok(None) => (Offer::NeedMore, Change::Quiet),
            Err(_) => (Offer::Consumed(input.len()), self.close(Cause::Protocol)),
            Ok(Some((Inbound::Data(len), n))) => {
                if let State::Session { got_end: false, .. } = self.state {
                    self.rx_payload = len;
                    (Offer::Consumed(n), Change::Quiet)
                } else {
                    (Offer::Consumed(input.len()), self.close(Cause::Protocol))
                }
            }
            Ok(Some((f, n))) => {
                let change = self.on_frame(now, cfg, f, jitter);
                (Offer::Consumed(n), self.after_frame(change))
            }
        }
    }

    /// DEMAND_RESULT `Redirect` while Demanding: the demand waits for the terminal to
    /// move it ([`Change::Redirected`]), if we follow redirects and this is not already a
    /// detour (at most one redirect per demand: a detour's LOGIN does not announce
    /// `REDIRECT`, so a relay does not send it one); else it fails as `TargetOffline`,
    /// what the relay says to a terminal that does not follow. Without the `redirect`
    /// feature (device builds) the terminal never follows: a redirect, which a relay
    /// sends only to a LOGIN that announced `REDIRECT`, always fails the demand so.
    #[cfg_attr(not(feature = "redirect"), allow(unused_variables))]
    fn redirected(&mut self, cfg: &Config, to: Redirect) -> Change {
        let demand = core::mem::replace(&mut self.state, State::Idle);
        match demand {
            #[cfg(feature = "redirect")]
            State::Demanding {
                target,
                service,
                give_up,
                ..
            } if cfg.follow_redirects && !self.is_detour() => Change::Redirected {
                to,
                demand: Queued {
                    target,
                    service,
                    give_up,
                    sent: false,
                },
            },
            _ => Change::DemandFailed {
                error: DemandError::TargetOffline,
                text: Text::lossy(DemandError::TargetOffline.describe()),
            },
        }
    }

    /// One decoded frame against the state: the change it makes.
    ///
    /// Never inlined, like `Terminal::apply`: inlined, the moves of `Inbound` into
    /// `Change` become per-field loads and stores. 2,672 B of flash on the firmware.
    #[inline(never)]
    fn on_frame(&mut self, now: Instant, cfg: &Config, f: Inbound, jitter: &mut Jitter) -> Change {
        if matches!(f, Inbound::KeepAliveAck) && self.is_logged_in() {
            return Change::Quiet;
        }
        match (&mut self.state, f) {
            (
                State::LoggingIn { queued, .. },
                Inbound::LoginOk {
                    caps,
                    keepalive_ms,
                    max_payload,
                    token,
                },
            ) => {
                self.state = match queued.take() {
                    Some(Queued {
                        target,
                        service,
                        give_up,
                        sent,
                    }) => State::Demanding {
                        target,
                        service,
                        give_up,
                        step: if sent { Step::Sent } else { Step::Owed },
                    },
                    None => State::Idle,
                };
                let keepalive = Duration::from_millis(keepalive_ms.into());
                self.next_ka = now + jitter.spread(keepalive, 10);
                Change::LoggedIn {
                    caps,
                    token,
                    keepalive,
                    max_payload,
                }
            }
            (
                State::LoggingIn {
                    since,
                    with_token: by_token,
                    fallback,
                    sent,
                    ..
                },
                Inbound::Error {
                    code,
                    text,
                    retry_after,
                },
            ) if !code.is_fatal() => {
                // A refused resumption falls back to the password on the same connection,
                // once, if allowed (a waiting demand still waits); a refused password is
                // final.
                let with_token = *by_token;
                if with_token && *fallback && self.login_attempts < 2 {
                    self.login_attempts += 1;
                    (*since, *by_token, *fallback, *sent) = (now, false, false, false);
                    Change::None
                } else {
                    self.close(Cause::Relay(code));
                    Change::LoginRefused {
                        code,
                        text,
                        with_token,
                        retry_after,
                    }
                }
            }
            (
                _,
                Inbound::Error {
                    code,
                    text,
                    retry_after,
                },
            ) => {
                if code.is_fatal() {
                    if let State::LoggingIn { with_token, .. } = self.state {
                        self.close(Cause::Relay(code));
                        return Change::LoginRefused {
                            code,
                            text,
                            with_token,
                            retry_after,
                        };
                    }
                    self.close(Cause::Relay(code))
                } else {
                    Change::RelayError { code, text }
                }
            }
            (
                State::Idle,
                Inbound::Notice {
                    session,
                    from,
                    service,
                },
            ) => {
                self.state = State::Noticed {
                    session,
                    from: from.clone(),
                };
                Change::Notice {
                    session,
                    from,
                    service,
                }
            }
            (
                State::Idle
                | State::Demanding { .. }
                | State::Noticed { .. }
                | State::Session { .. },
                Inbound::ListAnswer(page),
            ) => Change::ListPage(page),
            // A NOTICE that crossed our DEMAND on this connection: the relay withdraws it
            // when the DEMAND arrives, so it is void.
            (State::Demanding { .. }, Inbound::Notice { .. }) => Change::None,
            (
                State::Demanding { give_up, step, .. },
                Inbound::DemandResult(DemandResult::Failed {
                    error: DemandError::NoIdleConnection,
                    ..
                }),
            ) if now + cfg.demand_retry < *give_up => {
                *step = Step::RetryAt(now + cfg.demand_retry);
                Change::None
            }
            (State::Demanding { target, .. }, Inbound::DemandResult(r)) => match r {
                DemandResult::Accepted { session } => {
                    let peer = target.clone();
                    self.state = State::Session {
                        session,
                        peer: peer.clone(),
                        sent_end: false,
                        got_end: false,
                    };
                    Change::Accepted { session, peer }
                }
                DemandResult::Failed { error, text } => {
                    self.state = State::Idle;
                    Change::DemandFailed { error, text }
                }
                DemandResult::Redirect(to) => self.redirected(cfg, to),
            },
            (
                State::Session {
                    got_end: got_end @ false,
                    ..
                },
                Inbound::Terminate,
            ) => {
                *got_end = true;
                Change::PeerTerminated
            }
            // A RELEASE withdrawing a notice that crossed our DEMAND (we ignored the
            // notice): void too.
            (State::Demanding { .. }, Inbound::Release(_)) => Change::None,
            // RELEASE ends a session, or withdraws a notice the relay gave up on.
            (State::Session { .. } | State::Noticed { .. }, Inbound::Release(reason)) => {
                self.state = State::Idle;
                // The session is over: an ACCEPT or TERMINATE for it not written yet is
                // void (the relay would answer it with an error on an idle connection).
                self.owed
                    .retain(|o| !matches!(o, Owed::Accept(_) | Owed::Terminate));
                self.rx_payload = 0;
                Change::Released { reason }
            }
            _ => self.close(Cause::Protocol),
        }
    }

    /// What a frame's change means on a detour: a refused login ends its demand (the
    /// terminal's own login is not concerned), and it closes once its demand or session
    /// is over instead of idling at a relay that is not the terminal's.
    fn after_frame(&mut self, change: Change) -> Change {
        if !self.is_detour() {
            return change;
        }
        match change {
            Change::LoginRefused { text, .. } => Change::DemandFailed {
                error: DemandError::TargetOffline,
                text,
            },
            // Its LOGIN_OK is for this connection alone: caps, token and keep-alive of
            // the terminal's relay stay.
            Change::LoggedIn { .. } => Change::None,
            c @ (Change::DemandFailed { .. } | Change::Released { .. }) => {
                self.close(Cause::Local);
                c
            }
            c => c,
        }
    }

    /// The transport ended under us.
    pub(crate) fn transport_closed(&mut self) {
        if !self.is_closed() {
            self.close(Cause::Transport);
        }
    }
}
