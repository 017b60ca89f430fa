//! What the agent needs from a TCP stack: `N` connection slots to one relay.
//!
//! The send side of each slot is plain [`embedded_io::Write`]. The receive side is
//! `peek` and `consume`: the agent looks at received bytes in place and drops them only
//! once used, so the stack's receive buffer is the only receive buffer (no copy held per
//! connection, and a service that cannot keep up leaves bytes in the socket, where TCP's
//! window pushes back). smoltcp (`peek_slice`), embassy-net (`read_with`) and host
//! sockets (`MSG_PEEK`) all offer that; an AT-command modem driver that cannot peek
//! keeps a small buffer of its own. The agent never blocks: it writes only as many bytes
//! as [`Transport::send_space`] promised, which is why that figure must be exact (a DATA
//! frame's header and its payload must reach the stream together).

use embedded_io::Write;

pub use relay_proto::driver::LinkState;

/// `N` connection slots to the relay, driven by [`crate::Agent`].
///
/// The slot index is the relay-proto [`Handle`](relay_proto::terminal::Handle) number.
pub trait Transport {
    type Error: embedded_io::Error;
    /// The send side of one slot.
    type Io<'a>: Write<Error = Self::Error>
    where
        Self: 'a;

    /// Starts connecting `slot` to the relay, dropping whatever the slot held before.
    fn open(&mut self, slot: usize) -> Result<(), Self::Error>;

    /// The slot's connection state.
    fn state(&mut self, slot: usize) -> LinkState;

    /// Copies the first received bytes that are not consumed yet into `buf`, as many as
    /// fit, without consuming them. `Ok(0)`: nothing new right now. An error: the stream
    /// is over (the relay closed and every byte was consumed) or broken. Only used while
    /// [`LinkState::Open`].
    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, Self::Error>;

    /// Drops the first `n` received bytes (never more than the last `peek` returned).
    fn consume(&mut self, slot: usize, n: usize);

    /// The slot's send side (only used while [`LinkState::Open`]).
    fn io(&mut self, slot: usize) -> Self::Io<'_>;

    /// Bytes that `write` takes right now without blocking, all in one call or several.
    fn send_space(&mut self, slot: usize) -> usize;

    /// Ends the slot's connection: `graceful` sends what is queued, then FIN (after
    /// LOGOUT); otherwise reset at once (a dead or confused connection).
    fn close(&mut self, slot: usize, graceful: bool);
}

/// Writes all of `buf`, treating a zero-length write as an error instead of panicking
/// as `embedded_io::Write::write_all` does.
pub(crate) fn write_exact<W: Write>(w: &mut W, mut buf: &[u8]) -> Result<(), ()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) | Err(_) => return Err(()),
            Ok(n) => buf = buf.get(n..).ok_or(())?,
        }
    }
    Ok(())
}
