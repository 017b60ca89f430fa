//! The embassy binding: `N` embassy-net [`TcpSocket`]s as the agent's [`Transport`], and
//! [`EmbassyTcp::step`], which runs one agent poll and then awaits what can change its
//! outcome (a socket event or the agent's deadline, on embassy-time's clock).
//!
//! The protocol loop is the one terminal driver (relay-proto's `Driver`, through
//! [`crate::Agent`]); this module only adapts the sockets. The driver is synchronous and
//! never blocks, so every socket operation here completes at once: embassy-net's socket
//! futures do their work on their first poll (they are `poll_fn`s over the smoltcp
//! socket) and are polled exactly once ([`poll_once`]); "not ready" is simply "nothing
//! now", as with smoltcp. The only awaits are in [`EmbassyTcp::wait`], which moves no
//! byte and changes no state (see there why that makes it safe to cancel).
//!
//! embassy-net shows received bytes only as the contiguous run up to the end of its ring
//! buffer (`read_with`), and it can register a task for "more bytes" only while no byte
//! is waiting. So each connection keeps a small carry buffer: the tail of the ring when a
//! frame straddles its end, and a frame that has only partly arrived when the agent waits
//! (its bytes leave the socket, which can then wake the task when the rest comes). The
//! driver's view is unchanged: `peek` shows the carry, then the socket. Its size is the
//! largest unit the layer above waits for whole: a control frame ([`CARRY_PLAIN`], the
//! default) for the agent on plain TCP, a channel record ([`CARRY_CHANNEL`]) under a
//! [`crate::Channel`], whose own buffer then assembles frames.

use core::future::Future;
use core::pin::pin;
use core::task::Poll;

use embassy_futures::poll_once;
use embassy_net::IpEndpoint;
use embassy_net::tcp::{State, TcpSocket};
use embassy_time::Timer;
use relay_proto::frame::MAX_CONTROL_FRAME;
use relay_proto::time::Instant;

use crate::transport::{LinkState, Transport};

/// The carry for the agent straight on the sockets: a whole control frame.
pub const CARRY_PLAIN: usize = MAX_CONTROL_FRAME;

/// The carry under the device channel: one whole record (its length prefix, the largest
/// message the device accepts). The channel assembles frames in its own buffer.
pub const CARRY_CHANNEL: usize = crate::noise::RECORD_MAX;

/// Errors of the embassy transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EmbassyError {
    /// The socket cannot connect (no route or source address, or bad endpoint).
    Connect,
    /// The connection is closed, reset, or not established.
    State,
}

impl core::fmt::Display for EmbassyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            EmbassyError::Connect => "cannot connect",
            EmbassyError::State => "socket not connected",
        })
    }
}

impl core::error::Error for EmbassyError {}

impl embedded_io::Error for EmbassyError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            EmbassyError::Connect => embedded_io::ErrorKind::AddrNotAvailable,
            EmbassyError::State => embedded_io::ErrorKind::NotConnected,
        }
    }
}

/// Bytes taken out of a socket that the agent has not consumed yet (they come first).
#[derive(Debug)]
struct Carry<const C: usize> {
    buf: [u8; C],
    len: usize,
}

impl<const C: usize> Carry<C> {
    fn free(&self) -> usize {
        C - self.len
    }
}

/// The relay's connections on `N` embassy-net TCP sockets (the application creates them
/// with their buffers, so it decides the RAM), and where the relay is. `C`: the carry
/// per connection, [`CARRY_PLAIN`] (the default) or, under the channel, [`CARRY_CHANNEL`].
pub struct EmbassyTcp<'a, const N: usize, const C: usize = CARRY_PLAIN> {
    sockets: [TcpSocket<'a>; N],
    carry: [Carry<C>; N],
    relay: IpEndpoint,
}

impl<const N: usize, const C: usize> core::fmt::Debug for EmbassyTcp<'_, N, C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EmbassyTcp")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

/// relay-proto's clock from embassy-time's (milliseconds since boot).
pub fn proto_now() -> Instant {
    Instant::from_millis(embassy_time::Instant::now().as_millis())
}

/// embassy-time's instant for a relay-proto one (same epoch: boot).
pub fn embassy_instant(t: Instant) -> embassy_time::Instant {
    embassy_time::Instant::from_millis(t.as_millis())
}

impl<'a, const N: usize, const C: usize> EmbassyTcp<'a, N, C> {
    /// `sockets`: `N` sockets of the stack, each with a transmit buffer of at least
    /// [`crate::MIN_SOCKET_TX`] bytes ([`crate::MIN_CHANNEL_SOCKET_TX`] over the channel)
    /// and a receive buffer of at least twice `C`. Local ports come from the stack
    /// (randomised by its seed, so a rebooted device does not reuse its last ones).
    pub fn new(sockets: [TcpSocket<'a>; N], relay: IpEndpoint) -> Self {
        EmbassyTcp {
            sockets,
            carry: [const {
                Carry {
                    buf: [0; C],
                    len: 0,
                }
            }; N],
            relay,
        }
    }

    /// The relay's address (e.g. after a DNS lookup changed it): used by the next opens.
    pub fn set_relay(&mut self, relay: IpEndpoint) {
        self.relay = relay;
    }

    /// The socket of `slot`, for the application's own inspection.
    pub fn socket(&self, slot: usize) -> Option<&TcpSocket<'a>> {
        self.sockets.get(slot)
    }

    /// One round: `poll` runs the agent (over `self`, or a channel bound over it) at
    /// embassy-time's now and returns its next deadline; then this waits until a socket
    /// event or that deadline (see [`EmbassyTcp::wait`]).
    ///
    /// Safe to cancel inside `select`: `poll` runs to its end within the first poll of
    /// this future (it awaits nothing), and the rest is [`EmbassyTcp::wait`]. So a
    /// `select` against the application's own events (a button that demands a session,
    /// a logout) loses nothing: call `step` again afterwards.
    pub async fn step(&mut self, poll: impl FnOnce(Instant, &mut Self) -> Option<Instant>) {
        let next = poll(proto_now(), self);
        self.wait(next.map(embassy_instant)).await;
    }

    /// Waits for the next event on any socket (bytes arrived, bytes acknowledged, a
    /// connection up, closed or reset) or `deadline`, whichever comes first; then poll
    /// the agent again. Wakes at the first event after it is called: it is edge-triggered,
    /// so bytes the agent left in a socket (a service that takes no more yet) do not make
    /// it return at once; what unblocks such a service is an acknowledgement (its output
    /// drained) or the application's own event in a `select` beside it.
    ///
    /// Safe to cancel: it moves no byte to or from the network, changes no socket state
    /// and keeps nothing the next call needs. Its one side effect, moving a frame that
    /// has only partly arrived from a socket into the connection's carry buffer, happens
    /// before it first returns `Pending` and keeps those bytes where `peek` shows them.
    /// Each inner future is polled once to register the task's waker with the socket
    /// and then dropped (smoltcp keeps the registration): `wait_read_ready` registers for
    /// received bytes and state changes while the receive buffer is empty, `flush` for
    /// acknowledgements while sent bytes are unacknowledged; embassy-time's `Timer` only
    /// registers in the timer queue.
    pub async fn wait(&mut self, deadline: Option<embassy_time::Instant>) {
        for slot in 0..N {
            self.stash(slot);
        }
        let mut timer = deadline.map(Timer::at);
        let mut armed = false;
        core::future::poll_fn(|cx| {
            if armed {
                // Woken (or polled by an enclosing select): the agent looks again.
                return Poll::Ready(());
            }
            armed = true;
            for s in &mut self.sockets {
                let _ = pin!(s.wait_read_ready()).poll(cx);
                let _ = pin!(s.flush()).poll(cx);
            }
            match timer.as_mut().map(|t| pin!(t).poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(()),
                _ => Poll::Pending,
            }
        })
        .await;
    }

    /// Moves what the agent left in `slot`'s socket into its carry when all of it fits,
    /// so the socket can wake the task when more arrives.
    fn stash(&mut self, slot: usize) {
        let (Some(s), Some(c)) = (self.sockets.get_mut(slot), self.carry.get_mut(slot)) else {
            return;
        };
        while s.recv_queue() > 0 && s.recv_queue() <= c.free() {
            if take(s, c) == 0 {
                return;
            }
        }
    }
}

/// Moves the socket's next contiguous received bytes into the carry, as many as fit.
fn take<const C: usize>(s: &mut TcpSocket<'_>, c: &mut Carry<C>) -> usize {
    let free = &mut c.buf[c.len..];
    let moved = poll_once(s.read_with(|b| {
        let n = b.len().min(free.len());
        free[..n].copy_from_slice(&b[..n]);
        (n, n)
    }));
    let n = match moved {
        Poll::Ready(Ok(n)) => n,
        _ => 0,
    };
    c.len += n;
    n
}

/// Copies the socket's next received bytes into `buf`, consuming none, as far as they
/// run contiguously (up to the end of its ring). Returns the run's length and how many
/// were copied; `None` once the stream is over (FIN or reset, every byte read).
fn peek_run(s: &mut TcpSocket<'_>, buf: &mut [u8]) -> Option<(usize, usize)> {
    let peeked = poll_once(s.read_with(|b| {
        let n = b.len().min(buf.len());
        buf[..n].copy_from_slice(&b[..n]);
        (0, (b.len(), n))
    }));
    match peeked {
        Poll::Ready(Ok(run)) => Some(run),
        // Nothing received yet: the read would wait.
        Poll::Pending => Some((0, 0)),
        Poll::Ready(Err(_)) => None,
    }
}

/// One socket's send side as an embedded-io writer: takes what fits now, never waits.
pub struct EmbassyIo<'s, 'a>(Option<&'s mut TcpSocket<'a>>);

impl core::fmt::Debug for EmbassyIo<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EmbassyIo").finish_non_exhaustive()
    }
}

impl embedded_io::ErrorType for EmbassyIo<'_, '_> {
    type Error = EmbassyError;
}

impl embedded_io::Write for EmbassyIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, EmbassyError> {
        let s = self.0.as_mut().ok_or(EmbassyError::State)?;
        if buf.is_empty() {
            return Ok(0);
        }
        match poll_once(embedded_io_async::Write::write(&mut **s, buf)) {
            Poll::Ready(Ok(n)) if n > 0 => Ok(n),
            // Full (the driver writes only what `send_space` promised) or closed.
            _ => Err(EmbassyError::State),
        }
    }

    /// The stack's runner sends queued bytes on its own; nothing to do here.
    fn flush(&mut self) -> Result<(), EmbassyError> {
        Ok(())
    }
}

impl<'a, const N: usize, const C: usize> Transport for EmbassyTcp<'a, N, C> {
    type Error = EmbassyError;
    type Io<'s>
        = EmbassyIo<'s, 'a>
    where
        Self: 's;

    fn open(&mut self, slot: usize) -> Result<(), EmbassyError> {
        let relay = self.relay;
        let (Some(s), Some(c)) = (self.sockets.get_mut(slot), self.carry.get_mut(slot)) else {
            return Err(EmbassyError::State);
        };
        c.len = 0;
        if s.state() != State::Closed {
            s.abort();
        }
        // The terminal's own deadlines (handshake, keep-alive) decide when a connection
        // is dead; the stack's would only race them.
        s.set_timeout(None);
        s.set_keep_alive(None);
        // Frames are written whole; Nagle would only delay small control frames.
        s.set_nagle_enabled(false);
        // The first poll sends the SYN; the rest of `connect` only waits for the answer,
        // which `state` follows instead.
        match poll_once(s.connect(relay)) {
            Poll::Ready(Err(_)) => Err(EmbassyError::Connect),
            _ => Ok(()),
        }
    }

    fn state(&mut self, slot: usize) -> LinkState {
        let Some(s) = self.sockets.get(slot) else {
            return LinkState::Closed;
        };
        match s.state() {
            State::SynSent | State::SynReceived => LinkState::Opening,
            // FIN-WAIT: we closed our side (after LOGOUT); the relay's may still come.
            State::Established | State::FinWait1 | State::FinWait2 => LinkState::Open,
            // The relay closed its side, or the connection is gone; `peek` still shows
            // what arrived before.
            _ => LinkState::Closed,
        }
    }

    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, EmbassyError> {
        let (Some(s), Some(c)) = (self.sockets.get_mut(slot), self.carry.get_mut(slot)) else {
            return Err(EmbassyError::State);
        };
        // The socket shows bytes only up to the end of its ring: when that cuts short
        // what was asked for, the tail moves into the carry and the rest follows from the
        // ring's start. Each round moves at least one byte into the bounded carry.
        while let Some((run, _)) = peek_run(s, &mut []) {
            let want = buf.len().saturating_sub(c.len);
            if run == 0 || run >= want || run >= s.recv_queue() || run > c.free() {
                break;
            }
            if take(s, c) == 0 {
                break;
            }
        }
        let n = c.len.min(buf.len());
        buf[..n].copy_from_slice(&c.buf[..n]);
        match peek_run(s, &mut buf[n..]) {
            Some((_, k)) => Ok(n + k),
            // The stream is over: what the carry holds is still the relay's last bytes.
            None if n > 0 => Ok(n),
            None => Err(EmbassyError::State),
        }
    }

    fn consume(&mut self, slot: usize, mut n: usize) {
        let (Some(s), Some(c)) = (self.sockets.get_mut(slot), self.carry.get_mut(slot)) else {
            return;
        };
        let from_carry = n.min(c.len);
        c.buf.copy_within(from_carry..c.len, 0);
        c.len -= from_carry;
        n -= from_carry;
        // Two rounds at most: the bytes may wrap around the end of the ring buffer.
        while n > 0 {
            let taken = poll_once(s.read_with(|b| {
                let k = n.min(b.len());
                (k, k)
            }));
            match taken {
                Poll::Ready(Ok(k)) if k > 0 => n -= k,
                _ => return,
            }
        }
    }

    fn io(&mut self, slot: usize) -> EmbassyIo<'_, 'a> {
        EmbassyIo(self.sockets.get_mut(slot))
    }

    fn send_space(&mut self, slot: usize) -> usize {
        match self.sockets.get(slot) {
            Some(s) if s.may_send() => s.send_capacity() - s.send_queue(),
            _ => 0,
        }
    }

    fn close(&mut self, slot: usize, graceful: bool) {
        if let Some(c) = self.carry.get_mut(slot) {
            c.len = 0;
        }
        if let Some(s) = self.sockets.get_mut(slot) {
            if graceful { s.close() } else { s.abort() }
        }
    }
}
