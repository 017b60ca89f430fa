//! One connection's entry in the core's tables: its place in the protocol, its pending
//! output, and the DATA frames passing through it in either direction. Each of these is
//! one typed value, so that no combination of flags can say something impossible.

use super::wakes::{KickLink, WakeLink};
use crate::codes::DemandError;
use crate::codes::{ErrorCode, ReleaseReason};
use crate::ident::{ServiceName, Text, UserId};
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
    /// Paired with `peer`. Whether a side sent TERMINATE is its [`Wire::ended`]: the
    /// session's data path, which a [`super::Pair`] may hold.
    Session {
        peer: u32,
        session: u32,
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

/// A DEMAND_RESULT owed: [`crate::frame::DemandResult`] but for the redirect, which is
/// the host's name for the node ([`super::Policy::node`] is asked when it is written):
/// 32 bytes less in every connection's entry than the address and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    Accepted { session: u32 },
    Failed { error: DemandError, text: Text },
    Redirect(super::Node),
}

/// Pending output, encoded by `poll_transmit` in this order (which respects causality:
/// a result precedes the data it allows, data precedes TERMINATE, TERMINATE precedes
/// RELEASE). The DATA headers and the TERMINATE are the wire's ([`Wire`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Out {
    /// LOGIN_OK, with the capabilities both sides have.
    pub login_ok: Option<u32>,
    pub error: Option<ErrorCode>,
    /// With `error` Throttled: seconds to wait, and whether the terminal decodes the
    /// field ([`crate::frame::caps::RETRY_AFTER`]); older terminals read it in the text only.
    pub retry_after: Option<(u32, bool)>,
    pub list: Option<u32>,
    pub notice: bool,
    pub result: Option<Answer>,
    pub release: Option<ReleaseReason>,
}

impl Out {
    /// Nothing for the router to write: the connection's output is its wire's alone.
    pub(super) fn is_empty(&self) -> bool {
        let Out {
            login_ok,
            error,
            retry_after,
            list,
            notice,
            result,
            release,
        } = self;
        login_ok.is_none()
            && error.is_none()
            && retry_after.is_none()
            && list.is_none()
            && !notice
            && result.is_none()
            && release.is_none()
    }
}

/// One connection's entry in the core's tables.
#[derive(Debug, Clone)]
pub struct ConnEntry {
    pub(super) state: State,
    pub(super) generation: u32,
    pub(super) accepted: Instant,
    pub(super) out: Out,
    /// Framing, keep-alive and forwarding: what a [`super::Pair`] takes while handed out.
    pub(super) wire: Wire,
    /// Its session's data path is handed out to the host ([`super::Relay::hand_out`]):
    /// `wire` is stale until the pair comes back.
    pub(super) handed: bool,
    pub(super) attempts: u8,
    /// Its LOGIN announced [`crate::frame::caps::REDIRECT`]: a demand for a target on
    /// another node gets DEMAND_RESULT `Redirect` rather than `TargetOffline`.
    pub(super) redirect: bool,
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
            out: Out::default(),
            wire: Wire::new(now),
            handed: false,
            attempts: 0,
            redirect: false,
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
        self.wire.outbound == Outbound::Payload
    }

    /// Where the payload under way goes: only to the session peer it was announced to.
    pub(super) fn fwd_target(&self) -> Option<u32> {
        match (self.phase(), self.wire.inbound) {
            (Some(Phase::Session { peer, .. }), Some(Forward { pass: true, .. })) => Some(*peer),
            _ => None,
        }
    }

    pub(super) fn has_output(&self) -> bool {
        let o = &self.out;
        o.login_ok.is_some()
            || o.error.is_some()
            || self.wire.has_output()
            || o.list.is_some()
            || o.notice
            || o.result.is_some()
            || o.release.is_some()
            || self.is_closing()
    }
}

/// A connection's framing, keep-alive and forwarding state: all that a paired session's
/// DATA, KEEPALIVE and TERMINATE touch. The router keeps it in the connection's entry, or
/// hands it out with the session's [`super::Pair`]; the transitions below are the same
/// code in both places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wire {
    pub last_rx: Instant,
    /// DATA from this connection's terminal being passed on.
    pub inbound: Option<Forward>,
    /// DATA from the peer being written here.
    pub outbound: Outbound,
    pub acks: Option<Acks>,
    /// Payload bytes received from this connection in the current session.
    pub bytes: u64,
    /// This connection's terminal sent TERMINATE in the current session: it sends no
    /// more DATA (§3.11).
    pub ended: bool,
    /// The peer's TERMINATE, owed to this connection's terminal: written after the DATA
    /// the peer sent before it.
    pub terminate: bool,
}

/// What [`Wire::pass`] did with payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Passed {
    pub n: usize,
    /// They go to the session peer (else they are dropped).
    pub to_peer: bool,
    /// The frame's payload is complete.
    pub complete: bool,
}

impl Wire {
    pub(super) fn new(now: Instant) -> Self {
        Wire {
            last_rx: now,
            inbound: None,
            outbound: Outbound::Free,
            acks: None,
            bytes: 0,
            ended: false,
            terminate: false,
        }
    }

    /// A session starts on this connection: nothing carried, nothing ended yet.
    pub(super) fn begin_session(&mut self) {
        self.bytes = 0;
        self.ended = false;
    }

    /// This connection's terminal sent TERMINATE (steps (19)(20)): it is forwarded to the
    /// peer, whose wire is `peer`, after the DATA before it. `true` when the peer had
    /// sent its own already: both directions are closed, the session is over (step (21),
    /// which is the router's: RELEASE to both, the session table, its event).
    pub(super) fn terminate(&mut self, peer: &mut Wire) -> bool {
        self.ended = true;
        peer.terminate = true;
        peer.ended
    }

    /// A KEEPALIVE arrived: one more KEEPALIVE_ACK owed.
    pub(super) fn keepalive(&mut self, seq: u32) {
        let count = self.acks.map_or(0, |a| a.count);
        self.acks = Some(Acks {
            last: seq,
            count: count.saturating_add(1),
        });
    }

    /// A DATA header of `len` bytes for the session peer, whose wire is `peer`.
    pub(super) fn begin_data(&mut self, peer: &mut Wire, len: u16) {
        self.inbound = Some(Forward {
            remaining: len,
            pass: true,
        });
        peer.outbound.queue(len);
    }

    /// Up to `available` payload bytes of the DATA frame under way passed. The caller
    /// marks the peer's outbound complete when `to_peer && complete`.
    pub(super) fn pass(&mut self, available: usize) -> Passed {
        let Some(fwd) = self.inbound else {
            return Passed {
                n: 0,
                to_peer: false,
                complete: true,
            };
        };
        let n = available.min(usize::from(fwd.remaining));
        let remaining = fwd.remaining - n as u16;
        self.bytes += n as u64;
        self.inbound = (remaining > 0).then_some(Forward { remaining, ..fwd });
        Passed {
            n,
            to_peer: fwd.pass,
            complete: remaining == 0,
        }
    }

    /// The start of a `poll_transmit`: `Some(wake)` when nothing may be written now
    /// (`wake`: call again, the lock was just lifted), `None` to go on.
    pub(super) fn hold(&mut self) -> Option<bool> {
        match self.outbound {
            Outbound::Payload => Some(false),
            // The payload is complete. A host that flushes right after the last
            // `Forward` has not written those bytes yet: give nothing this once (and
            // wake again). A host that flushes before offering the next frame's payload
            // needs that frame's header now: it is already waiting, so go on.
            Outbound::Done { next: None } => {
                self.outbound = Outbound::Free;
                Some(true)
            }
            Outbound::Done {
                next: Some((len, complete)),
            } => {
                self.outbound = Outbound::Queued { len, complete };
                None
            }
            Outbound::Free | Outbound::Queued { .. } => None,
        }
    }

    /// The DATA header to write last in this burst, if one waits; its payload follows.
    pub(super) fn take_header(&mut self) -> Option<u16> {
        let Outbound::Queued { len, complete } = self.outbound else {
            return None;
        };
        self.outbound = if complete {
            Outbound::Done { next: None }
        } else {
            Outbound::Payload
        };
        Some(len)
    }

    pub(super) fn has_output(&self) -> bool {
        self.acks.is_some() || self.outbound.has_header() || self.terminate
    }
}
