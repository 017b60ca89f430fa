//! The smoltcp binding: `N` TCP sockets of a `SocketSet` as the agent's [`Transport`].
//!
//! The application owns the `Interface`, the `SocketSet` and the socket buffers (so it
//! decides the RAM); [`SmolTcp`] only remembers which sockets are the relay's, where the
//! relay is, and which local port to use next. Borrow it together with the interface and
//! the socket set for one poll with [`SmolTcp::bind`].

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpEndpoint;

use crate::transport::{LinkState, Transport};

/// First port of the IANA dynamic range, where ephemeral ports come from.
const EPHEMERAL_MIN: u16 = 49152;

/// Errors of the smoltcp transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SmolError {
    /// The socket cannot connect (no route or source address, or bad endpoint).
    Connect,
    /// The socket is not in a state that allows this (closed under us).
    State,
}

impl core::fmt::Display for SmolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SmolError::Connect => "cannot connect",
            SmolError::State => "socket not connected",
        })
    }
}

impl core::error::Error for SmolError {}

impl embedded_io::Error for SmolError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            SmolError::Connect => embedded_io::ErrorKind::AddrNotAvailable,
            SmolError::State => embedded_io::ErrorKind::NotConnected,
        }
    }
}

/// Which sockets carry the relay connections and where the relay is.
#[derive(Debug)]
pub struct SmolTcp<const N: usize> {
    sockets: [SocketHandle; N],
    relay: IpEndpoint,
    port: u16,
}

impl<const N: usize> SmolTcp<N> {
    /// `sockets`: `N` TCP sockets already added to the set, each with a transmit buffer
    /// of at least [`crate::MIN_SOCKET_TX`] bytes. `port_seed` picks the first ephemeral
    /// port: take it from the RNG so a rebooted device does not reuse the ports of its
    /// previous run (the relay would still hold those connections).
    pub fn new(sockets: [SocketHandle; N], relay: IpEndpoint, port_seed: u16) -> Self {
        SmolTcp {
            sockets,
            relay,
            port: EPHEMERAL_MIN + port_seed % (u16::MAX - EPHEMERAL_MIN),
        }
    }

    /// The relay's address (e.g. after a DNS lookup changed it): used by the next opens.
    pub fn set_relay(&mut self, relay: IpEndpoint) {
        self.relay = relay;
    }

    /// The socket of `slot`, for the application's own inspection.
    pub fn socket(&self, slot: usize) -> Option<SocketHandle> {
        self.sockets.get(slot).copied()
    }

    /// The transport for one poll.
    pub fn bind<'x, 'y>(
        &'x mut self,
        iface: &'x mut Interface,
        sockets: &'x mut SocketSet<'y>,
    ) -> Bound<'x, 'y, N> {
        Bound {
            stack: self,
            iface,
            sockets,
        }
    }

    fn next_port(&mut self) -> u16 {
        let p = self.port;
        self.port = if p == u16::MAX { EPHEMERAL_MIN } else { p + 1 };
        p
    }
}

/// [`SmolTcp`] borrowed with its interface and socket set: a [`Transport`].
pub struct Bound<'x, 'y, const N: usize> {
    stack: &'x mut SmolTcp<N>,
    iface: &'x mut Interface,
    sockets: &'x mut SocketSet<'y>,
}

impl<const N: usize> core::fmt::Debug for Bound<'_, '_, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Bound").field("stack", &self.stack).finish()
    }
}

impl<'y, const N: usize> Bound<'_, 'y, N> {
    fn socket(&mut self, slot: usize) -> Option<&mut tcp::Socket<'y>> {
        let h = *self.stack.sockets.get(slot)?;
        Some(self.sockets.get_mut::<tcp::Socket<'y>>(h))
    }
}

/// One socket's send side as an embedded-io writer.
#[derive(Debug)]
pub struct TcpIo<'s, 'y>(Option<&'s mut tcp::Socket<'y>>);

impl embedded_io::ErrorType for TcpIo<'_, '_> {
    type Error = SmolError;
}

impl embedded_io::Write for TcpIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, SmolError> {
        let s = self.0.as_mut().ok_or(SmolError::State)?;
        match s.send_slice(buf) {
            Ok(0) if !buf.is_empty() => Err(SmolError::State),
            Ok(n) => Ok(n),
            Err(_) => Err(SmolError::State),
        }
    }

    /// smoltcp sends on the next `Interface::poll`; nothing to do here.
    fn flush(&mut self) -> Result<(), SmolError> {
        Ok(())
    }
}

impl<'y, const N: usize> Transport for Bound<'_, 'y, N> {
    type Error = SmolError;
    type Io<'a>
        = TcpIo<'a, 'y>
    where
        Self: 'a;

    fn open(&mut self, slot: usize) -> Result<(), SmolError> {
        let h = *self.stack.sockets.get(slot).ok_or(SmolError::State)?;
        let port = self.stack.next_port();
        let relay = self.stack.relay;
        let s = self.sockets.get_mut::<tcp::Socket<'y>>(h);
        if s.is_open() || s.state() == State::TimeWait {
            s.abort();
        }
        // The terminal's own deadlines (handshake, keep-alive) decide when a connection
        // is dead; smoltcp's would only race them.
        s.set_timeout(None);
        s.set_keep_alive(None);
        // Frames are written whole; Nagle would only delay small control frames.
        s.set_nagle_enabled(false);
        s.connect(self.iface.context(), relay, port)
            .map_err(|_| SmolError::Connect)
    }

    fn state(&mut self, slot: usize) -> LinkState {
        let Some(s) = self.socket(slot) else {
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

    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, SmolError> {
        let s = self.socket(slot).ok_or(SmolError::State)?;
        match s.peek_slice(buf) {
            // The relay's FIN after the last byte (or a reset): the stream is over.
            Ok(0) if !buf.is_empty() && !s.may_recv() => Err(SmolError::State),
            Ok(n) => Ok(n),
            Err(_) => Err(SmolError::State),
        }
    }

    fn consume(&mut self, slot: usize, mut n: usize) {
        let Some(s) = self.socket(slot) else {
            return;
        };
        // Two rounds at most: the bytes may wrap around the end of the ring buffer.
        while n > 0 {
            let taken = s.recv(|b| {
                let k = n.min(b.len());
                (k, k)
            });
            match taken {
                Ok(k) if k > 0 => n -= k,
                _ => return,
            }
        }
    }

    fn io(&mut self, slot: usize) -> TcpIo<'_, 'y> {
        TcpIo(self.socket(slot))
    }

    fn send_space(&mut self, slot: usize) -> usize {
        match self.socket(slot) {
            Some(s) if s.may_send() => s.send_capacity() - s.send_queue(),
            _ => 0,
        }
    }

    fn close(&mut self, slot: usize, graceful: bool) {
        if let Some(s) = self.socket(slot) {
            if graceful { s.close() } else { s.abort() }
        }
    }
}

/// smoltcp's clock from relay-proto's (both milliseconds since the caller's epoch).
pub fn smol_instant(now: relay_proto::Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_millis(i64::try_from(now.as_millis()).unwrap_or(i64::MAX))
}

/// relay-proto's clock from smoltcp's (negative instants count as zero).
pub fn proto_instant(now: smoltcp::time::Instant) -> relay_proto::Instant {
    relay_proto::Instant::from_millis(u64::try_from(now.total_millis()).unwrap_or(0))
}
