//! Published ports (issue 13): the operator maps a port of the relay to a device's
//! service, so that any TCP client reaches it without running `relay connect`.
//!
//! A connection to a published port becomes a session the relay requests itself
//! ([`relay_proto::relay::Relay::demand_local`]), as the user ID [`REQUESTER`]: the core
//! decides it like any other (access rule, limits, accounting, metrics). The client
//! speaks no protocol, so [`PublishedStream`] plays the requester terminal's part between
//! the core's frames and the client's raw bytes: the connection task of `server.rs`
//! reads and writes it like any socket.
//!
//! The gate is the port's source allow-list ([`Cidr`]), not a credential: a published
//! port bypasses terminal accounts. So there is none by default, every port needs a
//! list, a client outside it is closed at once and counted
//! (`relay_published_refused_total`), and each port is logged at warn level at start.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use relay_proto::frame::{self, DemandResult, Frame, HEADER_LEN, Parsed};
use relay_proto::{ServiceName, UserId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::plain::PlainTcp;

/// The user ID the relay requests published ports' sessions as. The access rule lets it
/// reach exactly the targets of the configured published ports (see
/// `server::SnapshotPolicy`); an account of that name is not needed (and should not be
/// made: its terminals would share that reach).
pub const REQUESTER: &str = "@published";

/// DATA's and TERMINATE's frame types (docs/PROTOCOL.md §3).
const DATA: u8 = 0x0C;
const TERMINATE: [u8; HEADER_LEN] = [0x0D, 0, 0];

/// One published port, a `[[published]]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// Where the relay listens for the port's clients (plain TCP).
    pub listen: SocketAddr,
    /// The device (user ID) whose service the port reaches.
    #[serde(deserialize_with = "owned")]
    pub target: UserId,
    /// The service asked for; empty (the default): the device's default service.
    #[serde(default, deserialize_with = "owned")]
    pub service: ServiceName,
    /// Source networks allowed to connect; required, never empty.
    pub allow: Vec<Cidr>,
}

impl Published {
    /// Whether a client at `ip` may use the port.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|c| c.contains(ip))
    }
}

/// A user ID or service name from a string the parser owns (relay-proto's own
/// `Deserialize` borrows it, which a TOML file's strings cannot be).
fn owned<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: for<'a> TryFrom<&'a str, Error = relay_proto::ident::IdentError>,
{
    let s = String::deserialize(d)?;
    T::try_from(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e:?}")))
}

/// A network, `10.0.0.0/8` or `2001:db8::/32` (a bare address: that address only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network (an IPv4 address is never in an IPv6 network).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a).into(), u32::from(b).into(), 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s}: not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where the connection is in its session, as its requester terminal would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The demand is out: the client's bytes wait in its socket.
    Demanding,
    /// The session runs: the client's bytes go out as DATA.
    Running,
    /// The client closed its sending side: TERMINATE is sent.
    ClientDone,
    /// The session is over (or never started): end of stream to the connection task.
    Ended,
}

/// A published port's client as a requester terminal's connection: reading it gives the
/// frames that terminal would send (the client's bytes as DATA, KEEPALIVEs, TERMINATE
/// when the client closes); writing it takes the frames the core sends that terminal
/// (DATA payload goes to the client, the end of the session ends the stream).
#[derive(Debug)]
pub struct PublishedStream {
    /// The client's socket; its write side is shared ([`PublishedStream::writer`]).
    tcp: PlainTcp,
    stage: Stage,
    /// Payload bytes of the DATA frame being written to the client.
    payload: usize,
    /// A control frame from the core, gathered until complete.
    control: Vec<u8>,
    /// The device ended its side: the client's write side is shut once flushed.
    shut_owed: bool,
    keepalive: tokio::time::Interval,
    seq: u32,
    max_payload: usize,
}

impl PublishedStream {
    /// `keepalive`: the core's keep-alive interval (the client may be silent for longer
    /// than the core's deadline); `max_payload`: the largest DATA payload it accepts.
    pub fn new(tcp: TcpStream, keepalive: Duration, max_payload: u16) -> Self {
        let start = tokio::time::Instant::now() + keepalive;
        let mut keepalive = tokio::time::interval_at(start, keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        PublishedStream {
            tcp: PlainTcp::new(tcp),
            stage: Stage::Demanding,
            payload: 0,
            control: Vec::new(),
            shut_owed: false,
            keepalive,
            seq: 0,
            max_payload: usize::from(max_payload).max(1),
        }
    }

    /// The client socket's write side, for the connection's FIFO to write DATA payload
    /// to directly ([`crate::fifo::Direct::Payload`]).
    pub fn writer(&self) -> Arc<OwnedWriteHalf> {
        self.tcp.writer()
    }

    /// A complete control frame from the core. A change of stage concerns the reading
    /// side, which the same task polls (`server.rs` runs both directions of a connection
    /// in one task): `task` wakes it.
    fn on_frame(&mut self, f: Frame, task: &Waker) {
        match f {
            Frame::DemandResult(DemandResult::Accepted { .. }) => self.stage = Stage::Running,
            // The device is done sending (a half-close, docs/PROTOCOL.md §3.11): so is
            // the client's side of the socket. The client may go on sending until it
            // closes too, which sends this side's TERMINATE and ends the session.
            Frame::Terminate => self.shut_owed = true,
            Frame::DemandResult(DemandResult::Failed { error, .. }) => {
                tracing::debug!(%error, "published port: demand failed");
                self.stage = Stage::Ended;
            }
            Frame::Release { .. } | Frame::Error { .. } => self.stage = Stage::Ended,
            // KEEPALIVE_ACK; nothing else reaches a requester outside its session.
            _ => {}
        }
        task.wake_by_ref();
    }

    /// Takes up to `buf.len()` bytes of the core's output that are not DATA payload.
    fn take_control(&mut self, buf: &[u8], task: &Waker) -> io::Result<usize> {
        let want = if self.control.len() < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN + usize::from(u16::from_be_bytes([self.control[1], self.control[2]]))
        };
        let n = (want - self.control.len()).min(buf.len());
        self.control.extend_from_slice(&buf[..n]);
        if self.control.len() < want {
            return Ok(n);
        }
        if self.control.len() == HEADER_LEN && self.control[0] == DATA {
            self.payload = usize::from(u16::from_be_bytes([self.control[1], self.control[2]]));
            self.control.clear();
            return Ok(n);
        }
        match frame::parse(&self.control) {
            Ok(None) => return Ok(n),
            Ok(Some((Parsed::Control(f), _))) => self.on_frame(f, task),
            Ok(Some((Parsed::DataHeader { .. }, _))) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("published port: bad frame from the core: {e:?}"),
                ));
            }
        }
        self.control.clear();
        Ok(n)
    }

    /// The client's next bytes as one DATA frame in `buf`, or TERMINATE at its end.
    fn poll_client(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() <= HEADER_LEN {
            return Poll::Ready(Err(io::Error::other(
                "published port: read buffer too small",
            )));
        }
        // The payload is read straight behind the header's place, into memory that is not
        // zeroed first: `ReadBuf::uninit` tracks what the socket wrote.
        // SAFETY: nothing below de-initializes bytes of `buf`.
        let space = unsafe { buf.unfilled_mut() };
        let end = space.len().min(HEADER_LEN + self.max_payload);
        let mut rb = ReadBuf::uninit(&mut space[HEADER_LEN..end]);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        let header = if n == 0 {
            self.stage = Stage::ClientDone;
            TERMINATE
        } else {
            let [hi, lo] = (n as u16).to_be_bytes();
            [DATA, hi, lo]
        };
        for (slot, b) in space.iter_mut().zip(header) {
            slot.write(b);
        }
        let len = HEADER_LEN + n;
        // SAFETY: the header was written just above and the read filled the `n` bytes after
        // it (`rb` is a view of `space[HEADER_LEN..]`).
        unsafe { buf.assume_init(len) };
        buf.advance(len);
        Poll::Ready(Ok(()))
    }

    /// A KEEPALIVE in `buf` if one is due.
    fn poll_keepalive(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<()> {
        ready!(self.keepalive.poll_tick(cx));
        self.seq = self.seq.wrapping_add(1);
        let mut b = [0u8; frame::MAX_CONTROL_FRAME];
        if let Ok(n) = (Frame::KeepAlive { seq: self.seq }).encode(&mut b)
            && buf.remaining() >= n
        {
            buf.put_slice(&b[..n]);
        }
        Poll::Ready(())
    }
}

impl AsyncRead for PublishedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.stage == Stage::Ended {
            return Poll::Ready(Ok(()));
        }
        if me.poll_keepalive(cx, buf).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if me.stage == Stage::Running {
            return me.poll_client(cx, buf);
        }
        // Waiting for the session to start or end: `on_frame` wakes the task.
        Poll::Pending
    }
}

impl AsyncWrite for PublishedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.payload == 0 {
            return Poll::Ready(me.take_control(buf, cx.waker()));
        }
        let k = buf.len().min(me.payload);
        let n = ready!(Pin::new(&mut me.tcp).poll_write(cx, &buf[..k]))?;
        me.payload -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(Pin::new(&mut me.tcp).poll_flush(cx))?;
        if me.shut_owed {
            ready!(Pin::new(&mut me.tcp).poll_shutdown(cx))?;
            me.shut_owed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `server.rs` makes the relay's user ID from it without a fallback.
    #[test]
    fn the_requester_is_a_valid_user_id() {
        assert!(UserId::new(REQUESTER).is_ok());
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("192.0.2.1".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert_eq!(one.to_string(), "::1/128");
        assert!(one.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn a_mapped_ipv4_client_matches_ipv4_networks() {
        let p = Published {
            listen: "127.0.0.1:1".parse().unwrap(),
            target: UserId::new("dev").unwrap(),
            service: ServiceName::default(),
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert!(p.admits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.admits("::ffff:10.0.0.1".parse().unwrap()));
    }
}
