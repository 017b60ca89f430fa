//! Numbered reasons carried on the wire: error codes, demand outcomes, rejection and
//! release reasons. Numbers are part of the protocol (docs/PROTOCOL.md lists them); a new
//! value needs a new protocol version or a capability bit.

use core::fmt;
use serde::{Deserialize, Serialize};

/// The code of an ERROR frame. [`ErrorCode::is_fatal`] says whether the relay closes the
/// connection after sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum ErrorCode {
    /// A frame that does not decode: bad length, bad payload, empty data frame.
    BadFrame = 0,
    /// A frame type this version does not know.
    UnknownFrameType = 1,
    /// A length prefix beyond the bound for that frame type.
    FrameTooLarge = 2,
    /// The LOGIN frame's magic is not `RELY`: not our protocol.
    BadMagic = 3,
    /// The LOGIN frame's version is not one the relay speaks.
    VersionMismatch = 4,
    /// A frame that is valid but not allowed in the connection's current state.
    UnexpectedFrame = 5,
    /// Wrong user ID or password. Not fatal while attempts remain.
    AuthFailed = 6,
    /// The resumption credential is expired, forged or for an older instance.
    ResumeRejected = 7,
    /// Too many failed logins: on this connection, for this account or from this address.
    Throttled = 8,
    /// A newer password login for the same user ID replaced this instance.
    Replaced = 9,
    /// The account already holds as many connections as the relay allows.
    TooManyConnections = 10,
    /// ACCEPT or REJECT naming a session that is not waiting on this connection.
    UnknownSession = 11,
    /// No LOGIN within the handshake deadline.
    HandshakeTimeout = 12,
    /// Nothing received within the keep-alive deadline.
    KeepAliveTimeout = 13,
    /// The relay is shutting down.
    ShuttingDown = 14,
    /// The operator deleted or disabled the account.
    AccountRemoved = 15,
    /// The relay could not serve the request for a reason of its own (a full table).
    Busy = 16,
    /// Anything but LOGIN before the login succeeded.
    NotLoggedIn = 17,
    /// The operator closed this terminal's connections; the account stays, so the
    /// terminal may log in again.
    Kicked = 18,
}

impl ErrorCode {
    /// Whether the relay closes the connection after this error. Terminals use the same
    /// rule, so the two sides never disagree about a connection's fate.
    pub const fn is_fatal(self) -> bool {
        !matches!(
            self,
            ErrorCode::AuthFailed
                | ErrorCode::ResumeRejected
                | ErrorCode::UnknownSession
                | ErrorCode::UnexpectedFrame
                | ErrorCode::Busy
        )
    }

    /// A short English description, used when the sender has nothing more specific.
    pub const fn describe(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "malformed frame",
            ErrorCode::UnknownFrameType => "unknown frame type",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::BadMagic => "not a relay protocol connection",
            ErrorCode::VersionMismatch => "unsupported protocol version (relay speaks 1)",
            ErrorCode::UnexpectedFrame => "frame not allowed in this state",
            ErrorCode::AuthFailed => "wrong user ID or password",
            ErrorCode::ResumeRejected => "resumption credential rejected",
            ErrorCode::Throttled => "too many failed logins, try later",
            ErrorCode::Replaced => "replaced by a newer login of the same user ID",
            ErrorCode::TooManyConnections => "too many connections for this account",
            ErrorCode::UnknownSession => "no such session on this connection",
            ErrorCode::HandshakeTimeout => "no login within the handshake deadline",
            ErrorCode::KeepAliveTimeout => "keep-alive deadline missed",
            ErrorCode::ShuttingDown => "relay shutting down",
            ErrorCode::AccountRemoved => "account removed by the operator",
            ErrorCode::Busy => "relay busy",
            ErrorCode::NotLoggedIn => "log in first",
            ErrorCode::Kicked => "connections closed by the operator",
        }
    }
}

/// Why a target refused a demand (carried in REJECT and then DEMAND_RESULT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RejectReason {
    /// The target does not offer the named service.
    UnknownService = 0,
    /// The target does not accept demands from this requester.
    NotAllowed = 1,
    /// The target cannot take another session now.
    Busy = 2,
    /// The local service behind the target could not be reached.
    ServiceUnavailable = 3,
    /// Anything else; the text says what.
    Other = 4,
}

impl RejectReason {
    /// The text a REJECT with this reason carries: one table for every terminal, so a
    /// requester reads the same words whichever device turned it away.
    pub const fn describe(self) -> &'static str {
        match self {
            RejectReason::UnknownService => "no such service",
            RejectReason::NotAllowed => "requester not allowed",
            RejectReason::Busy => "busy",
            RejectReason::ServiceUnavailable => "service unavailable",
            RejectReason::Other => "rejected",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why a demand did not give a session (DEMAND_RESULT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DemandError {
    /// No terminal with that user ID is logged in.
    TargetOffline,
    /// The target is logged in but has no idle connection to carry the notice.
    NoIdleConnection,
    /// The relay's access rule does not let the requester reach the target.
    Forbidden,
    /// The target rejected the demand.
    Rejected(RejectReason),
    /// The target did not answer within the demand deadline.
    Timeout,
    /// The requester or the target has as many sessions as the relay allows.
    TooManySessions,
    /// The target went away (logged out, lost its connection) before answering.
    TargetGone,
}

impl DemandError {
    /// Its words, without `Rejected`'s reason ([`fmt::Display`] adds it): a static string,
    /// so a terminal that reports a demand error itself (a redirect it does not follow)
    /// links no formatting code.
    pub const fn describe(self) -> &'static str {
        match self {
            DemandError::TargetOffline => "target is not logged in",
            DemandError::NoIdleConnection => "target has no idle connection",
            DemandError::Forbidden => "the relay's access rule forbids this target",
            DemandError::Rejected(_) => "target rejected the demand",
            DemandError::Timeout => "target did not answer in time",
            DemandError::TooManySessions => "too many sessions",
            DemandError::TargetGone => "target went away",
        }
    }
}

impl fmt::Display for DemandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemandError::Rejected(r) => write!(f, "{}: {r}", self.describe()),
            _ => f.write_str(self.describe()),
        }
    }
}

/// Why a session ended (RELEASE). After a RELEASE the connection is idle again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReleaseReason {
    /// Both sides sent TERMINATE: every byte was delivered.
    Normal,
    /// The peer's connection died (closed, keep-alive missed).
    PeerLost,
    /// The peer logged out or was replaced.
    PeerLoggedOut,
    /// The relay gave up on a demand this notice belonged to (deadline, requester gone).
    Cancelled,
    /// The relay is shutting down.
    ShuttingDown,
    /// The relay's operator ended the session; both connections stay logged in.
    EndedByOperator,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}
