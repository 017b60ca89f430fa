//! The device channel (docs/PROTOCOL.md §1.1): a [`Transport`] that wraps another and
//! encrypts, Noise `NK_25519_ChaChaPoly_SHA256` with the relay's static key pinned.
//!
//! Sans-IO and non-blocking like the rest: the handshake progresses whenever the agent
//! asks a slot's [`Transport::state`], with a deadline; the slot reports
//! [`LinkState::Open`] only once it is done, so LOGIN (and the password) never leaves
//! before the relay proved it holds the pinned key. One handshake state (about 700 bytes)
//! is shared by all connections: one connection handshakes at a time, the others wait in
//! [`LinkState::Opening`].
//!
//! RAM per connection is the two cipher states and the plaintext of the records being
//! read: [`PLAIN_BUF`] bytes, enough for a control frame's first part plus one whole
//! record, so a frame split across records always comes together for the agent's `peek`.
//! The relay sends records of at most [`RECEIVE_LIMIT`] bytes (announced in the
//! handshake), so each is decrypted straight from the socket once it has fully arrived
//! and fits; until then it waits in the socket (TCP backpressure, as before). One
//! buffer, shared by all connections, stages a record being read or written.
//!
//! A wrong key, an altered message or one cut short ends that connection: the slot reads
//! [`LinkState::Closed`], [`Channel::failure`] says why, and nothing was sent but the
//! first handshake message.

use clatter::bytearray::ByteArray;
use clatter::crypto::cipher::ChaChaPoly;
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::handshakepattern::noise_nk;
use clatter::rand_core::{CryptoRng, RngCore};
use clatter::traits::{Cipher, Dh, Handshaker};
use clatter::{KeyPair, NqHandshakeCore};
use relay_proto::frame::MAX_CONTROL_FRAME;
use relay_proto::time::{Duration, Instant};

use crate::agent::MIN_SOCKET_TX;
use crate::log::log_warn;
use crate::transport::{LinkState, Transport, write_exact};

/// The Noise prologue: binds the handshake to this channel and its version.
pub const PROLOGUE: &[u8] = b"relay channel 1";
/// The AEAD tag of every encrypted message.
const TAG: usize = 16;
/// The length prefix of every message.
const PREFIX: usize = 2;
/// What one record adds to its plaintext on the wire.
pub const OVERHEAD: usize = PREFIX + TAG;
/// The largest message the device accepts (tag included), announced to the relay: small
/// records keep [`PLAIN_BUF`] small, at 18 bytes of overhead per 128 of payload.
pub const RECEIVE_LIMIT: usize = 128 + TAG;
/// The largest record on the wire from the relay: its length prefix and message.
pub const RECORD_MAX: usize = PREFIX + RECEIVE_LIMIT;
/// Per connection: a control frame's first part (all but one byte) plus one whole record.
pub const PLAIN_BUF: usize = MAX_CONTROL_FRAME - 1 + RECEIVE_LIMIT - TAG;
/// The largest plaintext the device seals into one record: a whole control frame fits.
pub const SEAL_MAX: usize = 512;
/// The smallest socket transmit buffer over the channel: a control frame and its record's
/// overhead.
pub const MIN_CHANNEL_SOCKET_TX: usize = MIN_SOCKET_TX + OVERHEAD;
/// The relay's answer: `e` (32) and the tag of an empty payload.
const ANSWER: usize = 32 + TAG;
/// The first message: `e` (32), the 2-byte receive limit and its tag.
const FIRST: usize = 32 + 2 + TAG;
/// The shared staging buffer: a record being sealed (the largest thing staged).
const WORK: usize = PREFIX + SEAL_MAX + TAG;

type Key = <ChaChaPoly as Cipher>::Key;
type Handshake = NqHandshakeCore<X25519, ChaChaPoly, Sha256, GivenEphemeral>;

/// Why the channel ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Failure {
    /// The relay closed without answering the first message: it does not hold the pinned
    /// key (or it has no channel).
    Refused,
    /// The relay's answer did not decrypt: wrong pinned key, or altered on the way.
    BadAnswer,
    /// No answer before the deadline.
    Timeout,
    /// A message from the relay failed authentication (altered or forged) or broke the
    /// framing (longer than the device's limit).
    Tampered,
    /// The connection ended inside a message.
    Truncated,
    /// A sealed record could not be written whole, or a nonce ran out.
    Broken,
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Failure::Refused => "the relay closed the handshake: it does not hold the pinned key",
            Failure::BadAnswer => {
                "the relay's handshake answer did not decrypt: wrong key or altered"
            }
            Failure::Timeout => "no handshake answer before the deadline",
            Failure::Tampered => "a message from the relay failed authentication",
            Failure::Truncated => "the connection ended inside a message",
            Failure::Broken => "a record could not be sent whole",
        })
    }
}

/// Errors of the channel transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChannelError<E> {
    /// The wrapped transport's.
    Link(E),
    /// The channel ended the connection.
    Failed(Failure),
    /// The connection is not (or no longer) through the handshake, or a write exceeded
    /// the space promised.
    NotReady,
}

impl<E: core::fmt::Debug> core::fmt::Display for ChannelError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChannelError::Link(e) => write!(f, "link: {e:?}"),
            ChannelError::Failed(why) => write!(f, "channel: {why}"),
            ChannelError::NotReady => f.write_str("channel not ready"),
        }
    }
}

impl<E: core::fmt::Debug> core::error::Error for ChannelError<E> {}

impl<E: embedded_io::Error> embedded_io::Error for ChannelError<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            ChannelError::Link(e) => e.kind(),
            ChannelError::Failed(_) => embedded_io::ErrorKind::InvalidData,
            ChannelError::NotReady => embedded_io::ErrorKind::NotConnected,
        }
    }
}

/// The one cipher direction: its key and the next nonce.
struct Direction {
    key: Key,
    nonce: u64,
}

impl Direction {
    /// The nonce for the next message, advanced; `None` once exhausted.
    fn next(&mut self) -> Option<u64> {
        let n = self.nonce;
        self.nonce = n.checked_add(1).filter(|&k| k < u64::MAX)?;
        Some(n)
    }
}

/// Where one slot's channel stands.
enum Phase {
    Idle,
    /// The TCP connection is coming up, or is up and waits for the shared handshake.
    Connecting,
    /// This slot holds the shared handshake.
    Handshaking,
    Ready {
        tx: Direction,
        rx: Direction,
    },
    /// The channel ended the connection (the reason is in the slot's [`Report`]).
    Failed,
}

/// The last failure of a slot, kept until a handshake succeeds on it again.
#[derive(Clone, Copy)]
enum Report {
    Clean,
    /// Not yet taken by [`Channel::take_failure`].
    Fresh(Failure),
    Taken(Failure),
}

/// One slot: its phase, its last failure and the decrypted bytes the agent has not
/// consumed yet.
struct Link {
    phase: Phase,
    report: Report,
    plain: [u8; PLAIN_BUF],
    len: usize,
}

impl Link {
    const fn new() -> Self {
        Link {
            phase: Phase::Idle,
            report: Report::Clean,
            plain: [0; PLAIN_BUF],
            len: 0,
        }
    }
}

/// The shared handshake: which slot runs it and until when.
struct Running {
    slot: usize,
    deadline: Instant,
    state: Handshake,
}

/// The channel state of `N` connections to one relay whose static key is pinned.
pub struct Channel<const N: usize> {
    relay: [u8; 32],
    timeout: Duration,
    handshake: Option<Running>,
    links: [Link; N],
    work: [u8; WORK],
}

impl<const N: usize> core::fmt::Debug for Channel<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Channel")
            .field("handshaking", &self.handshake.as_ref().map(|h| h.slot))
            .finish_non_exhaustive()
    }
}

impl<const N: usize> Channel<N> {
    /// A channel to the relay whose public channel key is `relay` (as `relay serve`
    /// prints it, current or next). `timeout`: how long a handshake may take once the
    /// relay accepted the TCP connection.
    pub fn new(relay: [u8; 32], timeout: Duration) -> Self {
        Channel {
            relay,
            timeout,
            handshake: None,
            links: [const { Link::new() }; N],
            work: [0; WORK],
        }
    }

    /// The channel over `inner` for one poll, at `now`, drawing handshake keys from `rng`.
    pub fn bind<'x, T: Transport, R: RngCore + CryptoRng>(
        &'x mut self,
        now: Instant,
        inner: &'x mut T,
        rng: &'x mut R,
    ) -> Sealed<'x, T, R, N> {
        Sealed {
            ch: self,
            inner,
            rng,
            now,
        }
    }

    /// When the running handshake times out: poll by then even if no packet arrives.
    pub fn poll_at(&self) -> Option<Instant> {
        self.handshake.as_ref().map(|h| h.deadline)
    }

    /// Why the channel last ended a connection of `slot`, until a handshake succeeds
    /// on it again (the agent reopens failed slots: a retry does not erase the reason).
    pub fn failure(&self, slot: usize) -> Option<Failure> {
        match self.links.get(slot)?.report {
            Report::Clean => None,
            Report::Fresh(why) | Report::Taken(why) => Some(why),
        }
    }

    /// The next failure not taken yet, and its slot: poll it after each agent poll to
    /// report each failure once (a wrong pinned key shows at every retry).
    pub fn take_failure(&mut self) -> Option<(usize, Failure)> {
        self.links
            .iter_mut()
            .enumerate()
            .find_map(|(slot, link)| match link.report {
                Report::Fresh(why) => {
                    link.report = Report::Taken(why);
                    Some((slot, why))
                }
                _ => None,
            })
    }
}

/// [`Channel`] bound to the wrapped transport for one poll: a [`Transport`].
pub struct Sealed<'x, T, R, const N: usize> {
    ch: &'x mut Channel<N>,
    inner: &'x mut T,
    rng: &'x mut R,
    now: Instant,
}

impl<T, R, const N: usize> core::fmt::Debug for Sealed<'_, T, R, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealed")
            .field("ch", &self.ch)
            .finish_non_exhaustive()
    }
}

/// What reading records into a slot's plaintext buffer stopped at.
enum Fill {
    /// Nothing more in the socket.
    Empty,
    /// A record has not fully arrived.
    Partial,
    /// The next record does not fit until the agent consumes some.
    Full,
}

impl<T: Transport, R: RngCore + CryptoRng, const N: usize> Sealed<'_, T, R, N> {
    /// Ends `slot`'s connection for `why`: reset, and the handshake freed if it held it.
    fn fail(&mut self, slot: usize, why: Failure) {
        log_warn!("relay channel: slot {} failed: {}", slot, why);
        self.release(slot);
        self.inner.close(slot, false);
        if let Some(link) = self.ch.links.get_mut(slot) {
            link.phase = Phase::Failed;
            link.report = Report::Fresh(why);
        }
    }

    /// The slot's state after a handshake step.
    fn settled(&self, slot: usize) -> LinkState {
        match self.ch.links[slot].phase {
            Phase::Ready { .. } => LinkState::Open,
            Phase::Connecting | Phase::Handshaking => LinkState::Opening,
            Phase::Idle | Phase::Failed => LinkState::Closed,
        }
    }

    /// Frees the shared handshake if `slot` holds it.
    fn release(&mut self, slot: usize) {
        if self.ch.handshake.as_ref().is_some_and(|h| h.slot == slot) {
            self.ch.handshake = None;
        }
    }

    /// Starts the shared handshake on `slot` if it is free and the socket has room.
    fn start(&mut self, slot: usize) {
        if self.ch.handshake.is_some() || self.inner.send_space(slot) < PREFIX + FIRST {
            return;
        }
        let mut secret = [0u8; 32];
        self.rng.fill_bytes(&mut secret);
        let secret = <X25519 as Dh>::PrivateKey::from_slice(&secret);
        let e = KeyPair::new(X25519::pubkey(&secret), secret);
        let Ok(mut state) = Handshake::new(
            noise_nk(),
            PROLOGUE,
            true,
            None,
            Some(e),
            Some(self.ch.relay),
            None,
        ) else {
            return self.fail(slot, Failure::Broken);
        };
        let limit = (RECEIVE_LIMIT as u16).to_be_bytes();
        let mut msg = [0u8; PREFIX + FIRST];
        msg[..PREFIX].copy_from_slice(&(FIRST as u16).to_be_bytes());
        let sent = state
            .write_message(&limit, &mut msg[PREFIX..])
            .is_ok_and(|n| n == FIRST)
            && write_exact(&mut self.inner.io(slot), &msg).is_ok();
        if !sent {
            return self.fail(slot, Failure::Broken);
        }
        self.ch.handshake = Some(Running {
            slot,
            deadline: self.now + self.ch.timeout,
            state,
        });
        self.ch.links[slot].phase = Phase::Handshaking;
    }

    /// Reads the relay's answer once all of it arrived.
    fn finish(&mut self, slot: usize, closed: bool) {
        let mut answer = [0u8; PREFIX + ANSWER];
        let got = self.inner.peek(slot, &mut answer).unwrap_or(0);
        if got >= PREFIX && answer[..PREFIX] != (ANSWER as u16).to_be_bytes() {
            return self.fail(slot, Failure::BadAnswer);
        }
        if got < PREFIX + ANSWER {
            if closed {
                self.fail(slot, Failure::Refused);
            } else if self
                .ch
                .handshake
                .as_ref()
                .is_some_and(|h| self.now >= h.deadline)
            {
                self.fail(slot, Failure::Timeout);
            }
            return;
        }
        let Some(Running { mut state, .. }) = self.ch.handshake.take() else {
            return;
        };
        let keys = state
            .read_message(&answer[PREFIX..], &mut [])
            .ok()
            .and_then(|_| state.finalize().ok())
            .map(|t| t.take());
        let Some(keys) = keys else {
            return self.fail(slot, Failure::BadAnswer);
        };
        self.inner.consume(slot, PREFIX + ANSWER);
        let (tx, tx_n) = keys.initiator_to_responder.take();
        let (rx, rx_n) = keys.responder_to_initiator.take();
        let link = &mut self.ch.links[slot];
        link.len = 0;
        link.report = Report::Clean;
        link.phase = Phase::Ready {
            tx: Direction {
                key: tx,
                nonce: tx_n,
            },
            rx: Direction {
                key: rx,
                nonce: rx_n,
            },
        };
    }

    /// Plaintext that one record written now can carry: the socket's room less one
    /// record's overhead, at most [`SEAL_MAX`].
    fn record_room(&mut self, slot: usize) -> usize {
        match self.ch.links.get(slot).map(|l| &l.phase) {
            Some(Phase::Ready { .. }) => self
                .inner
                .send_space(slot)
                .saturating_sub(OVERHEAD)
                .min(SEAL_MAX),
            _ => 0,
        }
    }

    /// Decrypts whole records from the socket into `slot`'s plaintext while they fit.
    fn fill(&mut self, slot: usize) -> Result<Fill, Failure> {
        let Channel { links, work, .. } = &mut *self.ch;
        let link = &mut links[slot];
        let Phase::Ready { rx, .. } = &mut link.phase else {
            return Ok(Fill::Empty);
        };
        loop {
            let head = &mut work[..PREFIX];
            match self.inner.peek(slot, head) {
                Ok(0) | Err(_) => return Ok(Fill::Empty),
                Ok(1) => return Ok(Fill::Partial),
                Ok(_) => {}
            }
            let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
            if !(TAG..=RECEIVE_LIMIT).contains(&len) {
                return Err(Failure::Tampered);
            }
            let free = PLAIN_BUF - link.len;
            if len - TAG > free {
                return Ok(Fill::Full);
            }
            let record = &mut work[..PREFIX + len];
            match self.inner.peek(slot, record) {
                Ok(n) if n == PREFIX + len => {}
                _ => return Ok(Fill::Partial),
            }
            let nonce = rx.next().ok_or(Failure::Broken)?;
            let out = &mut link.plain[link.len..link.len + len - TAG];
            ChaChaPoly::decrypt(&rx.key, nonce, &[], &record[PREFIX..], out)
                .map_err(|_| Failure::Tampered)?;
            link.len += len - TAG;
            self.inner.consume(slot, PREFIX + len);
        }
    }
}

impl<'x, T: Transport, R: RngCore + CryptoRng, const N: usize> Transport for Sealed<'x, T, R, N> {
    type Error = ChannelError<T::Error>;
    type Io<'a>
        = Sealer<'a, T>
    where
        Self: 'a;

    fn open(&mut self, slot: usize) -> Result<(), Self::Error> {
        self.release(slot);
        let link = self.ch.links.get_mut(slot).ok_or(ChannelError::NotReady)?;
        link.phase = Phase::Connecting;
        link.len = 0;
        self.inner.open(slot).map_err(ChannelError::Link)
    }

    /// Drives the handshake: `Open` only once it completed.
    fn state(&mut self, slot: usize) -> LinkState {
        let Some(link) = self.ch.links.get(slot) else {
            return LinkState::Closed;
        };
        let inner = self.inner.state(slot);
        match (&link.phase, inner) {
            (Phase::Idle | Phase::Failed, _) => LinkState::Closed,
            (Phase::Connecting, LinkState::Open) => {
                self.start(slot);
                if matches!(self.ch.links[slot].phase, Phase::Handshaking) {
                    self.finish(slot, false);
                }
                self.settled(slot)
            }
            (Phase::Handshaking, _) => {
                self.finish(slot, inner == LinkState::Closed);
                self.settled(slot)
            }
            (Phase::Ready { .. }, LinkState::Closed) => {
                match self.fill(slot) {
                    Ok(Fill::Partial) => self.fail(slot, Failure::Truncated),
                    Err(why) => self.fail(slot, why),
                    Ok(Fill::Empty | Fill::Full) => {}
                }
                LinkState::Closed
            }
            (_, inner) => inner,
        }
    }

    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if let Err(why) = self.fill(slot) {
            self.fail(slot, why);
            return Err(ChannelError::Failed(why));
        }
        let link = self.ch.links.get(slot).ok_or(ChannelError::NotReady)?;
        if !matches!(link.phase, Phase::Ready { .. }) {
            return Err(ChannelError::NotReady);
        }
        if link.len == 0 {
            // Nothing decrypted: more later (a record on its way), or the stream is over.
            return self
                .inner
                .peek(slot, &mut [0u8; 1])
                .map(|_| 0)
                .map_err(ChannelError::Link);
        }
        let n = buf.len().min(link.len);
        buf[..n].copy_from_slice(&link.plain[..n]);
        Ok(n)
    }

    fn consume(&mut self, slot: usize, n: usize) {
        if let Some(link) = self.ch.links.get_mut(slot) {
            let n = n.min(link.len);
            link.plain.copy_within(n..link.len, 0);
            link.len -= n;
        }
    }

    fn io(&mut self, slot: usize) -> Sealer<'_, T> {
        let room = self.record_room(slot);
        let Channel { links, work, .. } = &mut *self.ch;
        Sealer {
            inner: &mut *self.inner,
            slot,
            link: links.get_mut(slot),
            work,
            len: 0,
            room,
        }
    }

    /// Room for two records' overhead: the driver spends what this promises in up to two
    /// writes (a DATA header, then its payload), and each write is a record of its own.
    /// With one record's overhead promised, the payload's record did not fit once the
    /// socket's send buffer was nearly full: the write failed mid-frame and the slot
    /// closed (tests/embedded_nat.sh's 1 MiB echo ended after 32-64 KiB).
    fn send_space(&mut self, slot: usize) -> usize {
        match self.ch.links.get(slot).map(|l| &l.phase) {
            Some(Phase::Ready { .. }) => self
                .inner
                .send_space(slot)
                .saturating_sub(2 * OVERHEAD)
                .min(SEAL_MAX),
            _ => 0,
        }
    }

    fn close(&mut self, slot: usize, graceful: bool) {
        self.release(slot);
        if let Some(link) = self.ch.links.get_mut(slot) {
            link.phase = Phase::Idle;
            link.len = 0;
        }
        self.inner.close(slot, graceful);
    }
}

/// One record being written on a slot: collects what the agent writes, seals and sends
/// it when dropped (or flushed), so a frame header and its payload share one record and
/// [`Transport::send_space`] stays exact.
pub struct Sealer<'a, T: Transport> {
    inner: &'a mut T,
    slot: usize,
    link: Option<&'a mut Link>,
    work: &'a mut [u8; WORK],
    len: usize,
    room: usize,
}

impl<T: Transport> core::fmt::Debug for Sealer<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealer")
            .field("slot", &self.slot)
            .field("len", &self.len)
            .field("room", &self.room)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Sealer<'_, T> {
    /// Seals and sends what was collected. On failure the slot reads as failed
    /// ([`Failure::Broken`]), so the agent closes it at its next look.
    fn seal(&mut self) -> Result<(), ChannelError<T::Error>> {
        if self.len == 0 {
            return Ok(());
        }
        let len = core::mem::take(&mut self.len);
        let Some(Link {
            phase: Phase::Ready { tx, .. },
            ..
        }) = self.link.as_deref_mut()
        else {
            return Err(ChannelError::NotReady);
        };
        let record = &mut self.work[..OVERHEAD + len];
        let sealed = tx.next().is_some_and(|nonce| {
            ChaChaPoly::encrypt_in_place(&tx.key, nonce, &[], &mut record[PREFIX..], len).is_ok()
        });
        record[..PREFIX].copy_from_slice(&((len + TAG) as u16).to_be_bytes());
        self.room = self.room.saturating_sub(len);
        if sealed && write_exact(&mut self.inner.io(self.slot), record).is_ok() {
            return Ok(());
        }
        log_warn!(
            "relay channel: slot {} failed: {}",
            self.slot,
            Failure::Broken
        );
        if let Some(link) = self.link.as_deref_mut() {
            link.phase = Phase::Failed;
            link.report = Report::Fresh(Failure::Broken);
        }
        Err(ChannelError::Failed(Failure::Broken))
    }
}

impl<T: Transport> embedded_io::ErrorType for Sealer<'_, T> {
    type Error = ChannelError<T::Error>;
}

impl<T: Transport> embedded_io::Write for Sealer<'_, T> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        if !matches!(
            self.link.as_deref().map(|l| &l.phase),
            Some(Phase::Ready { .. })
        ) {
            return Err(ChannelError::NotReady);
        }
        let n = buf.len().min(self.room - self.len);
        if n == 0 && !buf.is_empty() {
            return Err(ChannelError::NotReady);
        }
        self.work[PREFIX + self.len..PREFIX + self.len + n].copy_from_slice(&buf[..n]);
        self.len += n;
        Ok(n)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.seal()
    }
}

impl<T: Transport> Drop for Sealer<'_, T> {
    fn drop(&mut self) {
        // A failure marks the slot failed: the agent's next look at its state closes it.
        let _ = self.seal();
    }
}

/// clatter's RNG slot, never drawn from: every handshake is given its ephemeral key,
/// drawn from the application's RNG ([`Channel::bind`]), and clatter draws one only when
/// it has none (`NqHandshakeCore::write_message`, token `e`).
#[derive(Debug, Default, Clone)]
struct GivenEphemeral;

impl RngCore for GivenEphemeral {
    fn next_u32(&mut self) -> u32 {
        0
    }
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.fill(0);
    }
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), clatter::rand_core::Error> {
        Err(core::num::NonZeroU32::MIN.into())
    }
}

impl CryptoRng for GivenEphemeral {}

#[cfg(test)]
mod tests;
