//! One connection's entry in the core's tables: its place in the protocol, its pending
//! output, and the DATA frames passing through it in either direction. Each of these is
//! one typed value, so that no combination of flags can say something impossible.

use super::wakes::{KickLink, WakeLink};
use crate::codes::{ErrorCode, ReleaseReason};
use crate::frame::DemandResult;
use crate::ident::{ServiceName, UserId};
use crate::time::Instant;

/// A connection, as the host and the core call it: a table key and the generation of
/// the entry it was given for, so that a handle kept after [`super::Relay::closed`]
/// names nothing (`RelayError::UnknownConn`), not the next connection in that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnId {
    key: u32,
    generation: u32,
}

impl ConnId {
    pub(super) const fn new(key: u32, generation: u32) -> Self {
        ConnId { key, generation }
    }

    /// The table key: small, reused after close, fit to index a host's own table.
    pub const fn index(self) -> usize {
        self.key as usize
    }

    pub(super) const fn key(self) -> u32 {
        self.key
    }

    pub(super) const fn generation(self) -> u32 {
        self.generation
    }
}

/// A connection's place in the protocol.
#[derive(Debug, Clone)]
pub(super) enum State {
    /// Waiting for LOGIN.
    Handshake,
    /// LOGIN received; the host is checking it. `caps`: what the terminal announced.
    Authenticating {
        user: UserId,
        password: bool,
        caps: u32,
    },
    /// Logged in as a connection of terminal `term` (a key of the terminal table).
    In { term: u32, phase: Phase },
    /// A fatal error is queued; close once it is written. `term`: the terminal whose
    /// list still holds the connection until the host closes it.
    Closing { term: Option<u32> },
}

/// What a logged-in connection is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Phase {
    Idle,
    /// This connection's DEMAND waits for terminal `target` (a key of the terminal
    /// table) to open an idle connection; it is in that terminal's wait list.
    Waiting {
        target: u32,
        service: ServiceName,
        deadline: Instant,
    },
    /// We routed this connection's DEMAND to `peer`; waiting for its answer.
    Demanding {
        peer: u32,
        service: ServiceName,
        deadline: Instant,
    },
    /// `peer` demands a session of us; NOTICE queued or sent.
    Noticed {
        peer: u32,
        session: u32,
    },
    /// Paired with `peer`. `sent_end`: this side sent TERMINATE.
    Session {
        peer: u32,
        session: u32,
        sent_end: bool,
        requester: bool,
    },
    /// The session is over; RELEASE still to send. Stray DATA and TERMINATE are dropped.
    Releasing,
}

/// A DATA frame from the peer, on its way out of this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Outbound {
    /// None under way: frames may be written.
    #[default]
    Free,
    /// Its header waits in the output (written last in a burst). `complete`: all of its
    /// payload has already passed.
    Queued { len: u16, complete: bool },
    /// Header written, payload under way: nothing else may be written here.
    Payload,
    /// The payload is complete: the next `poll_transmit` lifts the lock (a host that
    /// flushes right after the last `Forward` has not written those bytes yet). `next`:
    /// the header of the peer's next DATA frame, already waiting.
    Done { next: Option<(u16, bool)> },
}

impl Outbound {
    /// A header of `len` payload bytes joins the output.
    pub(super) fn queue(&mut self, len: u16) {
        *self = match *self {
            Outbound::Done { .. } => Outbound::Done {
                next: Some((len, false)),
            },
            _ => Outbound::Queued {
                len,
                complete: false,
            },
        };
    }

    /// All of the payload announced last has passed.
    pub(super) fn complete(&mut self) {
        *self = match *self {
            Outbound::Queued { len, .. } => Outbound::Queued {
                len,
                complete: true,
            },
            Outbound::Payload => Outbound::Done { next: None },
            Outbound::Done {
                next: Some((len, _)),
            } => Outbound::Done {
                next: Some((len, true)),
            },
            other => other,
        };
    }

    /// A header not written yet is withdrawn (its session ended before it went out).
    pub(super) fn withdraw(&mut self) {
        *self = match *self {
            Outbound::Queued { .. } => Outbound::Free,
            Outbound::Done { .. } => Outbound::Done { next: None },
            other => other,
        };
    }

    pub(super) fn has_header(self) -> bool {
        matches!(
            self,
            Outbound::Queued { .. } | Outbound::Done { next: Some(_) }
        )
    }
}

/// A DATA frame's payload arriving on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Forward {
    /// Payload bytes still to come (never 0: a finished forward is `None`).
    pub remaining: u16,
    /// They go to the session peer; `false`: they are dropped (DATA nobody may receive).
    /// While a payload arrives no frame is parsed on this connection, so its session
    /// may end under it but no other one can start: the peer needs no naming here.
    pub pass: bool,
}

/// KEEPALIVE_ACKs owed: one per KEEPALIVE received, the latest `seq` last. Terminals
/// number their keep-alives consecutively (§3.3), so a run needs no more than this. The
/// count stops at 65,535 owed (a terminal that sends that many while its connection's
/// output is held behind a payload gets no more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Acks {
    pub last: u32,
    pub count: u16,
}

/// Pending output, encoded by `poll_transmit` in this order (which respects causality:
/// a result precedes the data it allows, data precedes TERMINATE, TERMINATE precedes
/// RELEASE).
#[derive(Debug, Clone, Default)]
pub(super) struct Out {
    /// LOGIN_OK, with the capabilities both sides have.
    pub login_ok: Option<u32>,
    pub error: Option<ErrorCode>,
    /// With `error` Throttled: seconds to wait, and whether the terminal decodes the
    /// field ([`crate::frame::caps::RETRY_AFTER`]); older terminals read it in the text only.
    pub retry_after: Option<(u32, bool)>,
    pub acks: Option<Acks>,
    pub list: Option<u32>,
    pub notice: bool,
    pub result: Option<DemandResult>,
    pub terminate: bool,
    pub release: Option<ReleaseReason>,
}

/// One connection's entry in the core's tables.
#[derive(Debug, Clone)]
pub struct ConnEntry {
    pub(super) state: State,
    pub(super) generation: u32,
    pub(super) accepted: Instant,
    pub(super) last_rx: Instant,
    pub(super) out: Out,
    /// DATA from the peer being written here.
    pub(super) outbound: Outbound,
    /// DATA from this connection's terminal being passed on.
    pub(super) inbound: Option<Forward>,
    /// Payload bytes received from this connection in the current session.
    pub(super) bytes: u64,
    pub(super) attempts: u8,
    /// Its place in the wake list (output the host has not been told about).
    pub(super) wake: WakeLink,
    /// Its place in the kick list (idle since the start of this call).
    pub(super) kick: KickLink,
    /// Neighbours in the terminal's connection list ([`super::TermEntry::first`]).
    pub(super) prev: u32,
    pub(super) next: u32,
    /// Next demand in the target's wait list, while [`Phase::Waiting`].
    pub(super) wait_next: u32,
}

impl ConnEntry {
    pub(super) fn new(now: Instant, generation: u32) -> Self {
        ConnEntry {
            state: State::Handshake,
            generation,
            accepted: now,
            last_rx: now,
            out: Out::default(),
            outbound: Outbound::Free,
            inbound: None,
            bytes: 0,
            attempts: 0,
            wake: WakeLink::Out,
            kick: KickLink::Out,
            prev: super::NIL,
            next: super::NIL,
            wait_next: super::NIL,
        }
    }

    /// The terminal it belongs to, if logged in (or closing while still in its list).
    pub(super) fn term(&self) -> Option<u32> {
        match self.state {
            State::In { term, .. } => Some(term),
            State::Closing { term } => term,
            _ => None,
        }
    }

    pub(super) fn phase(&self) -> Option<&Phase> {
        match &self.state {
            State::In { phase, .. } => Some(phase),
            _ => None,
        }
    }

    /// Moves a logged-in connection to `phase` (others have no phase to change).
    pub(super) fn set_phase(&mut self, to: Phase) {
        if let State::In { phase, .. } = &mut self.state {
            *phase = to;
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.phase() == Some(&Phase::Idle)
    }

    pub(super) fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }

    /// Inside a DATA frame on the way to the terminal: no frame can be written now.
    pub(super) fn mid_payload(&self) -> bool {
        self.outbound == Outbound::Payload
    }

    /// Where the payload under way goes: only to the session peer it was announced to.
    pub(super) fn fwd_target(&self) -> Option<u32> {
        match (self.phase(), self.inbound) {
            (Some(Phase::Session { peer, .. }), Some(Forward { pass: true, .. })) => Some(*peer),
            _ => None,
        }
    }

    pub(super) fn has_output(&self) -> bool {
        let o = &self.out;
        o.login_ok.is_some()
            || o.error.is_some()
            || o.acks.is_some()
            || o.list.is_some()
            || o.notice
            || o.result.is_some()
            || self.outbound.has_header()
            || o.terminate
            || o.release.is_some()
            || self.is_closing()
    }
}
