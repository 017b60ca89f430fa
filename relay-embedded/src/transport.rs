//! What the agent needs from a TCP stack: `N` connection slots to one relay.
//!
//! The byte path of each slot is plain [`embedded_io`] (`Read`, `Write`, `ReadReady`), so
//! a stack that already speaks embedded-io (embassy-net, an AT-command modem driver, a
//! host socket in tests) needs only the four slot operations below on top. The agent
//! never blocks: it reads only after `read_ready` says so and writes only as many bytes
//! as [`Transport::send_space`] promised, which is why that figure must be exact (a DATA
//! frame's header and its payload must reach the stream together).

use embedded_io::{Read, ReadReady, Write};

/// Where a slot's connection stands, as far as the stack knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LinkState {
    /// No connection (never opened, failed, reset, or fully closed and drained).
    Closed,
    /// Connecting (SYN sent, no answer yet).
    Opening,
    /// Established: bytes flow. Stays `Open` after the peer's FIN until the received
    /// bytes are read, so nothing the relay sent before closing is lost.
    Open,
}

/// `N` connection slots to the relay, driven by [`crate::Agent`].
///
/// The slot index is the relay-proto [`Handle`](relay_proto::terminal::Handle) number.
pub trait Transport {
    type Error: embedded_io::Error;
    /// The byte stream of one slot.
    type Io<'a>: Read<Error = Self::Error>
        + Write<Error = Self::Error>
        + ReadReady<Error = Self::Error>
    where
        Self: 'a;

    /// Starts connecting `slot` to the relay, dropping whatever the slot held before.
    fn open(&mut self, slot: usize) -> Result<(), Self::Error>;

    /// The slot's connection state.
    fn state(&mut self, slot: usize) -> LinkState;

    /// The slot's byte stream (only used while [`LinkState::Open`]).
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
