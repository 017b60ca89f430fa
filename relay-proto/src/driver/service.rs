//! The bridge between an accepted session and code on the device itself.
//!
//! A device has no kernel TCP stack to hand a session to, so the application implements
//! [`Service`]: the driver calls it when a demand arrives, when a session opens, when
//! payload arrives and whenever the connection can take more output. Writes go straight
//! into the relay connection's socket buffer through [`Session::write`], which takes only
//! what fits: a service that cannot write keeps its input unconsumed (return less from
//! [`Service::on_data`]) and TCP's window pushes back on the sender. Nothing is buffered
//! on the way, so RAM stays what the application gave the sockets.

use crate::codes::RejectReason;
use crate::ident::{ServiceName, UserId};
use crate::terminal::{Event, Handle};

/// The answer to a demand notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Decision {
    Accept,
    Reject(RejectReason),
    /// No answer: the relay withdraws the notice (RELEASE `Cancelled`) at its demand
    /// deadline, and the requester gets `Timeout`.
    Ignore,
    /// The answer comes later, through [`super::Driver::answer`] (a host that first
    /// connects to the local service). Until then the connection holds the notice.
    Defer,
}

/// What the driver keeps about a session, for the service. The relay's session number
/// and the peer's user ID are the terminal's ([`Session::id`], [`Session::peer`]): kept
/// once, not per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The service name the requester asked for (`""` when none).
    pub service: ServiceName,
    /// Whether this device asked for the session ([`super::Driver::demand`]).
    pub requester: bool,
    /// The peer terminated: no more data will arrive.
    pub peer_ended: bool,
    /// We terminated: no more data may be written.
    pub ended: bool,
    /// Accepted by both sides (false while our own demand waits for its answer).
    pub(crate) open: bool,
}

/// The output side of a session, implemented by the driver over its terminal and
/// transport. A trait object, so [`Service`] needs no generic parameters.
pub(crate) trait Out {
    fn write(&mut self, h: Handle, data: &[u8]) -> usize;
    fn space(&mut self, h: Handle) -> usize;
    fn terminate(&mut self, h: Handle) -> bool;
    /// The relay's session number and the peer, while the session runs.
    fn session(&self, h: Handle) -> Option<(u32, &UserId)>;
}

/// One running session, as a service sees it during a callback.
pub struct Session<'a> {
    pub(crate) handle: Handle,
    pub(crate) info: &'a mut SessionInfo,
    pub(crate) out: &'a mut dyn Out,
}

impl core::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("handle", &self.handle)
            .field("info", &self.info)
            .finish()
    }
}

impl Session<'_> {
    /// The connection slot carrying the session: index per-session state with
    /// `handle().0` (there are at most `N`).
    pub fn handle(&self) -> Handle {
        self.handle
    }

    pub fn info(&self) -> &SessionInfo {
        self.info
    }

    /// The other terminal. `None` only once the relay has ended the session.
    pub fn peer(&self) -> Option<&UserId> {
        self.out.session(self.handle).map(|(_, peer)| peer)
    }

    /// The relay's session number (as in its logs). `None` as for [`Session::peer`].
    pub fn id(&self) -> Option<u32> {
        self.out.session(self.handle).map(|(id, _)| id)
    }

    /// Sends as much of `data` as the connection takes now (one DATA frame) and returns
    /// how much that was. 0 when the socket is full, a control frame must go first, or
    /// the session is terminated: try again in [`Service::on_writable`].
    pub fn write(&mut self, data: &[u8]) -> usize {
        if self.info.ended {
            return 0;
        }
        self.out.write(self.handle, data)
    }

    /// How many payload bytes a `write` would take now.
    pub fn writable(&mut self) -> usize {
        if self.info.ended {
            return 0;
        }
        self.out.space(self.handle)
    }

    /// Ends our direction (TERMINATE): the peer gets everything written before it.
    pub fn terminate(&mut self) {
        if !self.info.ended && self.out.terminate(self.handle) {
            self.info.ended = true;
        }
    }
}

/// An application served through the relay. Every method has a default except
/// `on_data`, so a simple service is a few lines (see [`Echo`]).
pub trait Service {
    /// `from` asks for a session with `service` on `handle`: accept, reject, or defer.
    /// The default accepts.
    fn on_notice(&mut self, handle: Handle, from: &UserId, service: &ServiceName) -> Decision {
        let _ = (handle, from, service);
        Decision::Accept
    }

    /// A session started (ours accepted, or theirs accepted by us). Writes may return 0
    /// until the ACCEPT frame is out; `on_writable` follows.
    fn on_open(&mut self, s: &mut Session<'_>) {
        let _ = s;
    }

    /// Payload arrived. Return how many bytes were used; the rest is offered again later
    /// (and nothing more is read from the connection meanwhile: that is backpressure).
    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize;

    /// Called on every poll for each running session we have not terminated: write
    /// pending output here.
    fn on_writable(&mut self, s: &mut Session<'_>) {
        let _ = s;
    }

    /// The peer terminated; all its data was delivered. The default terminates too.
    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        s.terminate();
    }

    /// The session on `handle` is over (both ends terminated, or the connection died):
    /// drop its state.
    fn on_close(&mut self, handle: Handle) {
        let _ = handle;
    }

    /// Every terminal event, for status LEDs and logs (LoggedIn, Down, LoginRefused, ...).
    fn on_event(&mut self, event: &Event) {
        let _ = event;
    }
}

/// Echoes every byte back; terminates when the peer does. Accepts every demand.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Service for Echo {
    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        s.write(data)
    }
}
