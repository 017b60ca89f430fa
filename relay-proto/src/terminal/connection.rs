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
use crate::frame::{self, DemandResult};
use crate::ident::{Password, ResumeToken, ServiceName, Text, UserId};
use crate::rng::Jitter;
use crate::time::{Duration, Instant};

use super::wire::{self, Cred, Inbound, Outbound};
use super::{Config, Offer, SendError};

/// The control frame a connection still has to send. One at a time is enough: each is
/// the answer to an application call that is refused while another is pending.
#[derive(Debug, Clone)]
enum Pending {
    None,
    Login,
    /// DEMAND for this service; the target is in [`State::Demanding`].
    Demand(ServiceName),
    Accept(u32),
    Reject {
        session: u32,
        reason: RejectReason,
        text: Text,
    },
    Terminate,
    List(u32),
    Logout,
}

#[derive(Debug, Clone)]
pub(crate) enum State {
    /// The host is opening the TCP connection.
    Connecting {
        since: Instant,
    },
    /// LOGIN queued or sent, no answer yet. `fallback`: a refused token may be followed
    /// by the password (only when no other connection is up: else we were replaced).
    LoggingIn {
        since: Instant,
        with_token: bool,
        fallback: bool,
    },
    Idle,
    /// DEMAND sent; waiting for DEMAND_RESULT.
    Demanding {
        target: UserId,
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
    /// Finished; the host must close the socket (and may reuse the slot after).
    Closed,
}

/// What a frame or timer did to a connection, for the [`Terminal`](super::Terminal) to
/// turn into events and pool decisions.
// No allocator, so no boxing; a change is built and consumed within one call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    LoggedIn {
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
    PeerTerminated,
    Released {
        reason: ReleaseReason,
    },
    ListPage(frame::ListAnswer),
    RelayError {
        code: ErrorCode,
        text: Text,
    },
    Closed(Cause),
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
    pending: Pending,
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
}

impl Connection {
    pub(crate) fn new(now: Instant) -> Self {
        Connection {
            state: State::Connecting { since: now },
            pending: Pending::None,
            ka_seq: 0,
            ka_due: false,
            next_ka: now,
            last_rx: now,
            rx_payload: 0,
            close_after_flush: false,
            login_attempts: 0,
        }
    }

    /// The TCP connection is up: log in with the token if there is one.
    pub(crate) fn connected(&mut self, now: Instant, with_token: bool, fallback: bool) {
        if matches!(self.state, State::Connecting { .. }) {
            self.state = State::LoggingIn {
                since: now,
                with_token,
                fallback,
            };
            self.pending = Pending::Login;
            self.last_rx = now;
            self.login_attempts = 1;
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle) && matches!(self.pending, Pending::None)
    }

    pub(crate) fn is_logged_in(&self) -> bool {
        !matches!(
            self.state,
            State::Connecting { .. } | State::LoggingIn { .. } | State::Closed
        )
    }

    /// Whether this connection will be idle once its handshake completes.
    pub(crate) fn is_coming_up(&self) -> bool {
        matches!(
            self.state,
            State::Connecting { .. } | State::LoggingIn { .. }
        )
    }

    fn close(&mut self, cause: Cause) -> Change {
        self.state = State::Closed;
        self.pending = Pending::None;
        Change::Closed(cause)
    }

    /// Encodes pending control output into `buf`. Returns the number of bytes written.
    pub(crate) fn poll_transmit(
        &mut self,
        buf: &mut [u8],
        user: &UserId,
        password: &Password,
        token: Option<&ResumeToken>,
    ) -> Result<usize, SendError> {
        if buf.len() < super::MIN_TRANSMIT_BUF {
            return Err(SendError::BufferTooSmall);
        }
        let mut written = 0;
        let frame = match (&self.pending, &self.state) {
            (Pending::None, _) => None,
            (Pending::Login, state) => {
                let with_token = matches!(
                    state,
                    State::LoggingIn {
                        with_token: true,
                        ..
                    }
                );
                let credential = match (with_token, token) {
                    (true, Some(t)) => Cred::Resume(t),
                    _ => Cred::Password(password),
                };
                Some(Outbound::Login { user, credential })
            }
            (Pending::Demand(service), State::Demanding { target }) => {
                Some(Outbound::Demand { target, service })
            }
            // A demand is pending only while demanding.
            (Pending::Demand(_), _) => None,
            (Pending::Accept(session), _) => Some(Outbound::Accept(*session)),
            (
                Pending::Reject {
                    session,
                    reason,
                    text,
                },
                _,
            ) => Some(Outbound::Reject {
                session: *session,
                reason: *reason,
                text,
            }),
            (Pending::Terminate, _) => Some(Outbound::Terminate),
            (Pending::List(cursor), _) => Some(Outbound::List(*cursor)),
            (Pending::Logout, _) => Some(Outbound::Logout),
        };
        if let Some(frame) = frame {
            written = frame.encode(buf).map_err(|_| SendError::BufferTooSmall)?;
        }
        self.pending = Pending::None;
        if self.ka_due {
            let n = Outbound::KeepAlive(self.ka_seq)
                .encode(buf.get_mut(written..).unwrap_or_default())
                .map_err(|_| SendError::BufferTooSmall)?;
            self.ka_seq = self.ka_seq.wrapping_add(1);
            self.ka_due = false;
            written += n;
        }
        if self.close_after_flush && written == 0 {
            self.state = State::Closed;
        }
        Ok(written)
    }

    pub(crate) fn has_output(&self) -> bool {
        !matches!(self.pending, Pending::None) || self.ka_due
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

    pub(crate) fn demand(&mut self, target: UserId, service: ServiceName) {
        self.pending = Pending::Demand(service);
        self.state = State::Demanding { target };
    }

    pub(crate) fn accept(&mut self) -> Result<(), SendError> {
        let State::Noticed { session, from } = &self.state else {
            return Err(SendError::NoNotice);
        };
        let (session, peer) = (*session, from.clone());
        self.pending = Pending::Accept(session);
        self.state = State::Session {
            session,
            peer,
            sent_end: false,
            got_end: false,
        };
        Ok(())
    }

    pub(crate) fn reject(&mut self, reason: RejectReason, text: Text) -> Result<(), SendError> {
        let State::Noticed { session, .. } = self.state else {
            return Err(SendError::NoNotice);
        };
        self.pending = Pending::Reject {
            session,
            reason,
            text,
        };
        self.state = State::Idle;
        Ok(())
    }

    pub(crate) fn terminate(&mut self) -> Result<(), SendError> {
        match &mut self.state {
            State::Session {
                sent_end: sent_end @ false,
                ..
            } => {
                *sent_end = true;
                self.pending = Pending::Terminate;
                Ok(())
            }
            _ => Err(SendError::NotInSession),
        }
    }

    pub(crate) fn list(&mut self, cursor: u32) {
        self.pending = Pending::List(cursor);
    }

    pub(crate) fn logout(&mut self) {
        self.pending = Pending::Logout;
        self.close_after_flush = true;
    }

    /// The next instant at which [`Connection::handle_timeout`] has work.
    pub(crate) fn poll_timeout(&self, cfg: &Config, keepalive: Duration) -> Option<Instant> {
        match self.state {
            State::Connecting { since } | State::LoggingIn { since, .. } => {
                Some(since + cfg.handshake_timeout)
            }
            State::Closed => None,
            _ => Some(
                self.next_ka
                    .min(self.last_rx + self.rx_timeout(cfg, keepalive)),
            ),
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
    ) -> Change {
        match self.state {
            State::Connecting { since } | State::LoggingIn { since, .. } => {
                if now >= since + cfg.handshake_timeout {
                    return self.close(Cause::HandshakeTimeout);
                }
            }
            State::Closed => {}
            _ => {
                if now >= self.last_rx + self.rx_timeout(cfg, keepalive) {
                    return self.close(Cause::KeepAliveTimeout);
                }
                if now >= self.next_ka {
                    self.ka_due = true;
                    self.next_ka = now + jitter.spread(keepalive, 10);
                }
            }
        }
        Change::None
    }

    /// Takes bytes received from the relay. See [`Offer`].
    pub(crate) fn handle_input(
        &mut self,
        now: Instant,
        input: &[u8],
        jitter: &mut Jitter,
    ) -> (Offer, Change) {
        if input.is_empty() {
            return (Offer::NeedMore, Change::None);
        }
        self.last_rx = now;
        if self.rx_payload > 0 {
            let n = input.len().min(usize::from(self.rx_payload));
            self.rx_payload -= n as u16;
            return (Offer::Payload(n), Change::None);
        }
        if matches!(self.state, State::Closed) {
            // Whatever follows a fatal error is of no interest.
            return (Offer::Consumed(input.len()), Change::None);
        }
        match wire::parse(input) {
            Ok(None) => (Offer::NeedMore, Change::None),
            Err(_) => (Offer::Consumed(input.len()), self.close(Cause::Protocol)),
            Ok(Some((Inbound::Data(len), n))) => {
                if let State::Session { got_end: false, .. } = self.state {
                    self.rx_payload = len;
                    (Offer::Consumed(n), Change::None)
                } else {
                    (Offer::Consumed(input.len()), self.close(Cause::Protocol))
                }
            }
            Ok(Some((f, n))) => (Offer::Consumed(n), self.on_frame(now, f, jitter)),
        }
    }

    fn on_frame(&mut self, now: Instant, f: Inbound, jitter: &mut Jitter) -> Change {
        if matches!(f, Inbound::KeepAliveAck) && self.is_logged_in() {
            return Change::None;
        }
        match (&mut self.state, f) {
            (
                State::LoggingIn { .. },
                Inbound::LoginOk {
                    keepalive_ms,
                    max_payload,
                    token,
                },
            ) => {
                self.state = State::Idle;
                let keepalive = Duration::from_millis(keepalive_ms.into());
                self.next_ka = now + jitter.spread(keepalive, 10);
                Change::LoggedIn {
                    token,
                    keepalive,
                    max_payload,
                }
            }
            (
                State::LoggingIn {
                    with_token,
                    fallback,
                    ..
                },
                Inbound::Error {
                    code,
                    text,
                    retry_after,
                },
            ) if !code.is_fatal() => {
                // A refused resumption falls back to the password on the same connection,
                // once, if allowed; a refused password is final.
                let with_token = *with_token;
                if with_token && *fallback && self.login_attempts < 2 {
                    self.login_attempts += 1;
                    self.state = State::LoggingIn {
                        since: now,
                        with_token: false,
                        fallback: false,
                    };
                    self.pending = Pending::Login;
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
            (State::Demanding { target }, Inbound::DemandResult(r)) => match r {
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
                self.rx_payload = 0;
                Change::Released { reason }
            }
            _ => self.close(Cause::Protocol),
        }
    }

    /// The transport ended under us.
    pub(crate) fn transport_closed(&mut self) -> Change {
        if matches!(self.state, State::Closed) {
            Change::None
        } else {
            self.close(Cause::Transport)
        }
    }
}
