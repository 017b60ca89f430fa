//! What the driver needs from a TCP stack: `N` connection slots to one relay, read in
//! place and written without blocking.
//!
//! The receive side is `peek` and `consume`: the driver looks at received bytes in place
//! and drops them only once used, so the stack's receive buffer is the only receive
//! buffer (no copy held per connection, and a service that cannot keep up leaves bytes in
//! the socket, where TCP's window pushes back). The send side never blocks: the driver
//! writes only as many bytes as [`Link::send_space`] promised, which is why that figure
//! must be exact (a DATA frame's header and its payload must reach the stream together).

use crate::frame::Redirect;

/// Where a slot's connection stands, as far as the stack knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LinkState {
    /// No connection, or the relay closed its side (FIN), reset it, or it failed. The
    /// driver still reads what `peek` shows, so a frame the relay sent just before
    /// closing (an ERROR saying why) is not lost.
    Closed,
    /// Connecting (SYN sent, no answer yet).
    Opening,
    /// Established: bytes flow both ways (or we closed our side and the relay's still
    /// flows).
    Open,
}

/// Where [`Link::open_to`] connects a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The relay at this index of the host's addresses (modulo their number:
    /// [`Terminal::relay`], which moves on when a relay is lost).
    ///
    /// [`Terminal::relay`]: crate::terminal::Terminal::relay
    Relay(u32),
    /// Another node of the relay service, which a redirected demand goes to
    /// (docs/PROTOCOL.md §10.6): TLS to its address, trusting exactly the certificate
    /// whose SHA-256 fingerprint the redirect names.
    Node(&'a Redirect),
}

/// A slot's stream failed or ended; the driver closes the slot either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkError;

/// `N` connection slots to the relay. The slot index is the [`Handle`] number.
///
/// [`Handle`]: crate::terminal::Handle
pub trait Link {
    /// Starts connecting `slot` to the relay, dropping whatever the slot held before.
    fn open(&mut self, slot: usize) -> Result<(), LinkError>;

    /// Starts connecting `slot` to `to`: one of the host's relay addresses, or the node
    /// a demand was redirected to. Drops what the slot held before, as [`Link::open`]
    /// does. The default serves a stack with one relay address and no redirects: it opens
    /// that relay with [`Link::open`] and cannot reach another node (the demand then ends
    /// with its connection; such a terminal should not set
    /// `Config::follow_redirects`, which the `redirect` feature brings).
    fn open_to(&mut self, slot: usize, to: Target<'_>) -> Result<(), LinkError> {
        match to {
            Target::Relay(_) => self.open(slot),
            Target::Node(_) => Err(LinkError),
        }
    }

    /// The slot's connection state.
    fn state(&mut self, slot: usize) -> LinkState;

    /// Copies the first received bytes that are not consumed yet into `buf`, as many as
    /// fit, without consuming them. `Ok(0)`: nothing new right now. An error: the stream
    /// is over (the relay closed and every byte was consumed) or broken. Only used while
    /// [`LinkState::Open`].
    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, LinkError>;

    /// Drops the first `n` received bytes (never more than the last `peek` returned).
    fn consume(&mut self, slot: usize, n: usize);

    /// Writes all of `bytes` (never more than [`Link::send_space`] said), or fails: the
    /// stream is then corrupt and the slot closes.
    fn write(&mut self, slot: usize, bytes: &[u8]) -> Result<(), LinkError>;

    /// Bytes that `write` takes right now without blocking, all in one call or several.
    fn send_space(&mut self, slot: usize) -> usize;

    /// Ends the slot's connection: `graceful` sends what is queued, then FIN (after
    /// LOGOUT); otherwise reset at once (a dead or confused connection).
    fn close(&mut self, slot: usize, graceful: bool);
}
