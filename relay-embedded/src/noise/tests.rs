//! The channel against an in-memory link and a clatter responder playing the relay.

extern crate std;

use std::vec;
use std::vec::Vec;

use clatter::traits::Handshaker;
use clatter::transportstate::TransportState;
use embedded_io::Write;

use super::*;

#[derive(Debug, PartialEq)]
struct Never;
impl embedded_io::Error for Never {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}
impl core::fmt::Display for Never {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("never")
    }
}
impl core::error::Error for Never {}

/// One TCP connection in memory: what the relay sent and the device has not consumed,
/// what the device sent, and whether the relay closed.
#[derive(Default)]
struct Conn {
    up: bool,
    fin: bool,
    /// A send buffer of this many bytes (nothing drains it); unbounded when `None`.
    window: Option<usize>,
    to_device: Vec<u8>,
    from_device: Vec<u8>,
}

/// Two slots of in-memory connections.
#[derive(Default)]
struct Mem([Conn; 2]);

struct Sink<'a>(&'a mut Vec<u8>);
impl embedded_io::ErrorType for Sink<'_> {
    type Error = Never;
}
impl Write for Sink<'_> {
    fn write(&mut self, b: &[u8]) -> Result<usize, Never> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> Result<(), Never> {
        Ok(())
    }
}

impl Transport for Mem {
    type Error = Never;
    type Io<'a> = Sink<'a>;
    fn open(&mut self, slot: usize) -> Result<(), Never> {
        self.0[slot] = Conn {
            up: true,
            ..Conn::default()
        };
        Ok(())
    }
    fn state(&mut self, slot: usize) -> LinkState {
        match &self.0[slot] {
            c if c.up && !c.fin => LinkState::Open,
            _ => LinkState::Closed,
        }
    }
    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, Never> {
        let c = &self.0[slot];
        if c.to_device.is_empty() && c.fin {
            return Err(Never);
        }
        let n = c.to_device.len().min(buf.len());
        buf[..n].copy_from_slice(&c.to_device[..n]);
        Ok(n)
    }
    fn consume(&mut self, slot: usize, n: usize) {
        self.0[slot].to_device.drain(..n);
    }
    fn io(&mut self, slot: usize) -> Sink<'_> {
        Sink(&mut self.0[slot].from_device)
    }
    fn send_space(&mut self, slot: usize) -> usize {
        let c = &self.0[slot];
        c.window
            .map_or(1024, |w| w.saturating_sub(c.from_device.len()))
    }
    fn close(&mut self, slot: usize, _: bool) {
        self.0[slot].up = false;
    }
}

/// Not random at all: tests only.
#[derive(Default)]
struct Counter(u8);
impl RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1);
        u32::from(self.0)
    }
    fn next_u64(&mut self) -> u64 {
        u64::from(self.next_u32())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u32() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), clatter::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Counter {}

const RELAY_SECRET: [u8; 32] = [9; 32];

fn relay_public(secret: [u8; 32]) -> [u8; 32] {
    X25519::pubkey(&<X25519 as Dh>::PrivateKey::from_slice(&secret))
}

/// The relay's side of one connection (clatter as responder).
struct Relay {
    noise: TransportState<ChaChaPoly, Sha256>,
}

impl Relay {
    /// Answers the first message in `conn` with the key `secret`; `None` (and the
    /// connection closed, as relay-host does) when it does not decrypt.
    fn accept(conn: &mut Conn, secret: [u8; 32]) -> Option<Relay> {
        let s = <X25519 as Dh>::PrivateKey::from_slice(&secret);
        let s = KeyPair::new(X25519::pubkey(&s), s);
        let e = <X25519 as Dh>::PrivateKey::from_slice(&[3; 32]);
        let e = KeyPair::new(X25519::pubkey(&e), e);
        let mut hs =
            Handshake::new(noise_nk(), PROLOGUE, false, Some(s), Some(e), None, None).unwrap();
        let first: Vec<u8> = conn.from_device.drain(..).collect();
        assert_eq!(&first[..2], &(FIRST as u16).to_be_bytes());
        let mut limit = [0u8; 2];
        if hs.read_message(&first[2..], &mut limit).is_err() {
            conn.fin = true;
            return None;
        }
        assert_eq!(u16::from_be_bytes(limit) as usize, RECEIVE_LIMIT);
        let mut answer = [0u8; 64];
        let n = hs.write_message(&[], &mut answer[2..]).unwrap();
        answer[..2].copy_from_slice(&(n as u16).to_be_bytes());
        conn.to_device.extend_from_slice(&answer[..2 + n]);
        Some(Relay {
            noise: hs.finalize().unwrap(),
        })
    }

    /// Seals `plain` into one record toward the device.
    fn send(&mut self, conn: &mut Conn, plain: &[u8]) {
        let mut out = std::vec![0u8; 2 + plain.len() + TAG];
        let n = self.noise.send(plain, &mut out[2..]).unwrap();
        out[..2].copy_from_slice(&(n as u16).to_be_bytes());
        conn.to_device.extend_from_slice(&out);
    }

    /// Opens every record the device sent.
    fn receive(&mut self, conn: &mut Conn) -> Vec<u8> {
        let mut plain = Vec::new();
        let wire: Vec<u8> = conn.from_device.drain(..).collect();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let mut out = std::vec![0u8; len - TAG];
            self.noise.receive(&rest[2..2 + len], &mut out).unwrap();
            plain.extend_from_slice(&out);
            rest = &rest[2 + len..];
        }
        plain
    }
}

const T0: Instant = Instant::from_millis(1000);

fn channel() -> Channel<2> {
    Channel::new(relay_public(RELAY_SECRET), Duration::from_secs(5))
}

/// Opens slot 0 and runs its handshake with a relay holding `secret`.
fn connected(secret: [u8; 32]) -> (Channel<2>, Mem, Option<Relay>) {
    let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.open(0).unwrap();
    assert_eq!(t.state(0), LinkState::Opening);
    let relay = Relay::accept(&mut mem.0[0], secret);
    (ch, mem, relay)
}

fn state(ch: &mut Channel<2>, mem: &mut Mem, slot: usize, now: Instant) -> LinkState {
    ch.bind(now, mem, &mut Counter::default()).state(slot)
}

#[test]
fn the_link_opens_only_after_the_handshake_and_carries_both_ways() {
    let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
    let mut relay = relay.expect("the relay holds the pinned key");
    assert_eq!(state(&mut ch, &mut mem, 0, T0), LinkState::Open);
    assert!(mem.0[0].to_device.is_empty(), "the answer was consumed");

    let mut rng = Counter::default();
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    assert_eq!(t.send_space(0), SEAL_MAX);
    {
        let mut io = t.io(0);
        io.write_all(b"LOGIN ").unwrap();
        io.write_all(b"cam pw").unwrap();
    }
    assert_eq!(relay.receive(&mut mem.0[0]), b"LOGIN cam pw");

    // A frame split across three records comes together for one peek.
    for part in [&b"one "[..], b"frame in ", b"three records"] {
        relay.send(&mut mem.0[0], part);
    }
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    let mut buf = [0u8; 64];
    let n = t.peek(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"one frame in three records");
    t.consume(0, 4);
    let n = t.peek(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"frame in three records");
    t.consume(0, n);
    assert_eq!(t.peek(0, &mut buf).unwrap(), 0);
}

/// What `send_space` promises holds for a DATA header and its payload written as two
/// records (the driver's two writes), however little room the socket has left. With one
/// record's overhead reserved, the payload's record did not fit and the slot closed
/// under load (tests/embedded_nat.sh's 1 MiB echo ended after 32-64 KiB).
#[test]
fn what_send_space_promises_fits_a_header_and_its_payload_as_two_records() {
    for window in [200, 300, 555, 700] {
        let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
        let mut relay = relay.unwrap();
        state(&mut ch, &mut mem, 0, T0);
        mem.0[0].window = Some(mem.0[0].from_device.len() + window);
        let mut rng = Counter::default();
        let mut t = ch.bind(T0, &mut mem, &mut rng);
        let promised = t.send_space(0);
        assert!(promised > 3, "window {window}: {promised}");
        let payload = vec![7u8; promised - 3];
        t.io(0).write_all(&[1, 2, 3]).unwrap();
        t.io(0)
            .write_all(&payload)
            .unwrap_or_else(|e| panic!("window {window}: the payload's record: {e:?}"));
        let mut want = vec![1, 2, 3];
        want.extend_from_slice(&payload);
        assert_eq!(relay.receive(&mut mem.0[0]), want);
    }
}

/// Records wait in the socket while the plaintext buffer is full: backpressure, and
/// nothing is lost or reordered.
#[test]
fn records_that_do_not_fit_wait_in_the_socket() {
    let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
    let mut relay = relay.unwrap();
    state(&mut ch, &mut mem, 0, T0);
    let data: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
    for chunk in data.chunks(RECEIVE_LIMIT - TAG) {
        relay.send(&mut mem.0[0], chunk);
    }
    let mut got = Vec::new();
    let mut rng = Counter::default();
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    let mut buf = [0u8; 100];
    loop {
        let n = t.peek(0, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        t.consume(0, n);
    }
    assert_eq!(got, data);
}

#[test]
fn a_relay_without_the_pinned_key_closes_and_nothing_follows_the_first_message() {
    let (mut ch, mut mem, relay) = connected([4; 32]);
    assert!(relay.is_none());
    assert_eq!(state(&mut ch, &mut mem, 0, T0), LinkState::Closed);
    assert_eq!(ch.failure(0), Some(Failure::Refused));
    assert!(mem.0[0].from_device.is_empty());
    // The handshake is free again for the next try.
    assert!(ch.poll_at().is_none());
}

#[test]
fn a_forged_answer_fails_the_handshake() {
    let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.open(0).unwrap();
    t.state(0);
    mem.0[0].from_device.clear();
    let mut forged = std::vec![0u8, ANSWER as u8];
    forged.extend_from_slice(&[0x5a; ANSWER]);
    mem.0[0].to_device = forged;
    assert_eq!(state(&mut ch, &mut mem, 0, T0), LinkState::Closed);
    assert_eq!(ch.failure(0), Some(Failure::BadAnswer));
    assert!(mem.0[0].from_device.is_empty() && !mem.0[0].up);
}

#[test]
fn no_answer_by_the_deadline_fails_the_handshake() {
    let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.open(0).unwrap();
    t.state(0);
    let deadline = ch.poll_at().unwrap();
    assert_eq!(deadline, T0 + Duration::from_secs(5));
    let before = Instant::from_millis(deadline.as_millis() - 1);
    assert_eq!(state(&mut ch, &mut mem, 0, before), LinkState::Opening);
    assert_eq!(state(&mut ch, &mut mem, 0, deadline), LinkState::Closed);
    assert_eq!(ch.failure(0), Some(Failure::Timeout));
}

#[test]
fn an_altered_record_ends_the_connection() {
    let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
    let mut relay = relay.unwrap();
    state(&mut ch, &mut mem, 0, T0);
    relay.send(&mut mem.0[0], b"ERROR frame");
    let last = mem.0[0].to_device.len() - 1;
    mem.0[0].to_device[last] ^= 1;
    let mut rng = Counter::default();
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    let mut buf = [0u8; 64];
    assert_eq!(
        t.peek(0, &mut buf).unwrap_err(),
        ChannelError::Failed(Failure::Tampered)
    );
    assert_eq!(t.state(0), LinkState::Closed);
    assert_eq!(ch.failure(0), Some(Failure::Tampered));
}

#[test]
fn a_record_longer_than_announced_ends_the_connection() {
    let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
    let mut relay = relay.unwrap();
    state(&mut ch, &mut mem, 0, T0);
    relay.send(&mut mem.0[0], &[1; RECEIVE_LIMIT - TAG + 1]);
    let mut buf = [0u8; 64];
    let got = ch
        .bind(T0, &mut mem, &mut Counter::default())
        .peek(0, &mut buf);
    assert_eq!(got.unwrap_err(), ChannelError::Failed(Failure::Tampered));
}

#[test]
fn a_stream_cut_inside_a_record_is_a_truncation() {
    let (mut ch, mut mem, relay) = connected(RELAY_SECRET);
    let mut relay = relay.unwrap();
    state(&mut ch, &mut mem, 0, T0);
    relay.send(&mut mem.0[0], b"whole");
    relay.send(&mut mem.0[0], b"cut short");
    mem.0[0].to_device.truncate(mem.0[0].to_device.len() - 3);
    mem.0[0].fin = true;
    assert_eq!(state(&mut ch, &mut mem, 0, T0), LinkState::Closed);
    assert_eq!(ch.failure(0), Some(Failure::Truncated));
}

#[test]
fn one_connection_handshakes_at_a_time() {
    let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.open(0).unwrap();
    t.open(1).unwrap();
    assert_eq!(t.state(0), LinkState::Opening);
    assert_eq!(t.state(1), LinkState::Opening);
    assert!(
        mem.0[1].from_device.is_empty(),
        "slot 1 waits for the handshake"
    );
    let _relay0 = Relay::accept(&mut mem.0[0], RELAY_SECRET).unwrap();
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    assert_eq!(t.state(0), LinkState::Open);
    assert_eq!(t.state(1), LinkState::Opening);
    assert_eq!(mem.0[1].from_device.len(), PREFIX + FIRST);
    let _relay1 = Relay::accept(&mut mem.0[1], RELAY_SECRET).unwrap();
    assert_eq!(state(&mut ch, &mut mem, 1, T0), LinkState::Open);
}

/// The handshake uses the ephemeral key drawn from the application's RNG (clatter's own
/// RNG slot is never drawn from), and two handshakes use two keys.
#[test]
fn each_handshake_draws_its_ephemeral_key_from_the_application() {
    let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
    let mut expected = [0u8; 32];
    Counter::default().fill_bytes(&mut expected);
    let expected = relay_public(expected);
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.open(0).unwrap();
    t.state(0);
    assert_eq!(&mem.0[0].from_device[2..34], &expected);
    let first: Vec<u8> = mem.0[0].from_device.clone();
    let mut t = ch.bind(T0, &mut mem, &mut rng);
    t.close(0, false);
    t.open(0).unwrap();
    t.state(0);
    assert_ne!(mem.0[0].from_device[2..34], first[2..34]);
}

/// The agent over the channel: its LOGIN (with the password) goes out only after the
/// handshake, sealed; against a relay without the pinned key it never goes out at all,
/// however often the agent retries.
#[test]
fn the_agent_sends_its_login_only_through_a_finished_handshake() {
    use crate::{Agent, Echo};
    use relay_proto::ident::{Password, UserId};
    use relay_proto::terminal::Config;

    let password = b"device-secret";
    for secret in [RELAY_SECRET, [4; 32]] {
        let config = Config {
            spare: 1,
            ..Config::default()
        };
        let mut agent: Agent<2> = Agent::new(
            config,
            UserId::new("cam").unwrap(),
            Password::new("device-secret").unwrap(),
            1,
        );
        let (mut ch, mut mem, mut rng) = (channel(), Mem::default(), Counter::default());
        let mut now = T0;
        agent.start(now);
        let mut login = Vec::new();
        let mut handshakes = 0;
        for _ in 0..200 {
            agent.poll(now, &mut ch.bind(now, &mut mem, &mut rng), &mut Echo);
            let conn = &mut mem.0[0];
            if conn.from_device.len() == PREFIX + FIRST && conn.to_device.is_empty() && !conn.fin {
                handshakes += 1;
                match Relay::accept(conn, secret) {
                    Some(mut relay) => {
                        agent.poll(now, &mut ch.bind(now, &mut mem, &mut rng), &mut Echo);
                        login = relay.receive(&mut mem.0[0]);
                        break;
                    }
                    None => assert!(conn.from_device.is_empty()),
                }
            }
            assert!(
                !conn
                    .from_device
                    .windows(password.len())
                    .any(|w| w == password),
                "the password in clear"
            );
            now = now + Duration::from_millis(500);
        }
        if secret == RELAY_SECRET {
            assert!(
                login.windows(password.len()).any(|w| w == password),
                "LOGIN"
            );
        } else {
            assert!(handshakes > 1, "the agent retried ({handshakes})");
            assert!(login.is_empty());
            assert_eq!(ch.failure(0), Some(Failure::Refused));
            assert_eq!(ch.take_failure(), Some((0, Failure::Refused)));
        }
    }
}
