//! relay-embedded's channel receive path: after a real handshake with a snow responder,
//! the relay's bytes are arbitrary (mode 0), or records snow sealed and then altered or
//! cut (mode 1), or the handshake answer itself is arbitrary (mode 2). Whatever comes,
//! no panic, and the agent only ever sees plaintext the relay really sealed, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_embedded::rand_core::{CryptoRng, RngCore};
use relay_embedded::relay_proto::time::{Duration, Instant};
use relay_embedded::{Channel, LinkState, PROLOGUE, Transport};

const SECRET: [u8; 32] = [9; 32];

#[derive(Debug)]
struct Never;
impl core::fmt::Display for Never {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("closed")
    }
}
impl core::error::Error for Never {}
impl embedded_io::Error for Never {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

#[derive(Default)]
struct Mem {
    to_device: Vec<u8>,
    from_device: Vec<u8>,
    fin: bool,
}

struct Sink<'a>(&'a mut Vec<u8>);
impl embedded_io::ErrorType for Sink<'_> {
    type Error = Never;
}
impl embedded_io::Write for Sink<'_> {
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
    fn open(&mut self, _: usize) -> Result<(), Never> {
        Ok(())
    }
    fn state(&mut self, _: usize) -> LinkState {
        if self.fin {
            LinkState::Closed
        } else {
            LinkState::Open
        }
    }
    fn peek(&mut self, _: usize, buf: &mut [u8]) -> Result<usize, Never> {
        if self.fin && self.to_device.is_empty() {
            return Err(Never);
        }
        let n = buf.len().min(self.to_device.len());
        buf[..n].copy_from_slice(&self.to_device[..n]);
        Ok(n)
    }
    fn consume(&mut self, _: usize, n: usize) {
        assert!(n <= self.to_device.len(), "consumed more than received");
        self.to_device.drain(..n);
    }
    fn io(&mut self, _: usize) -> Sink<'_> {
        Sink(&mut self.from_device)
    }
    fn send_space(&mut self, _: usize) -> usize {
        1024
    }
    fn close(&mut self, _: usize, _: bool) {
        self.fin = true;
    }
}

struct Fixed(u8);
impl RngCore for Fixed {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1);
        u32::from(self.0)
    }
    fn next_u64(&mut self) -> u64 {
        u64::from(self.next_u32())
    }
    fn fill_bytes(&mut self, d: &mut [u8]) {
        d.iter_mut().for_each(|b| *b = self.next_u32() as u8);
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), relay_embedded::rand_core::Error> {
        self.fill_bytes(d);
        Ok(())
    }
}
impl CryptoRng for Fixed {}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

fuzz_target!(|data: &[u8]| {
    let [mode, at_hi, at_lo, sizes, rest @ ..] = data else {
        return;
    };
    let at = usize::from(u16::from_be_bytes([*at_hi, *at_lo]));
    let now = Instant::from_millis(1);
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(SECRET));
    let mut ch: Channel<1> = Channel::new(public.to_bytes(), Duration::from_secs(5));
    let (mut mem, mut rng) = (Mem::default(), Fixed(0));
    ch.bind(now, &mut mem, &mut rng).open(0).unwrap();
    assert_eq!(
        ch.bind(now, &mut mem, &mut rng).state(0),
        LinkState::Opening
    );

    let mut relay = snow::Builder::new("Noise_NK_25519_ChaChaPoly_SHA256".parse().unwrap())
        .local_private_key(&SECRET)
        .unwrap()
        .prologue(PROLOGUE)
        .unwrap()
        .build_responder()
        .unwrap();
    let first = std::mem::take(&mut mem.from_device);
    relay.read_message(&first[2..], &mut [0u8; 2]).unwrap();
    let mut answer = [0u8; 48];
    relay.write_message(&[], &mut answer).unwrap();
    if mode % 3 == 2 {
        mem.to_device = framed(&answer[..at % 48]);
        mem.to_device.extend_from_slice(rest);
        for _ in 0..3 {
            assert_ne!(
                ch.bind(now, &mut mem, &mut rng).state(0),
                LinkState::Open,
                "forged answer"
            );
        }
        return;
    }
    mem.to_device = framed(&answer);
    assert_eq!(ch.bind(now, &mut mem, &mut rng).state(0), LinkState::Open);
    let mut relay = relay.into_transport_mode().unwrap();

    // What the relay sealed, in order: only a prefix of it may ever reach the agent.
    let mut sealed = Vec::new();
    if mode % 3 == 0 {
        mem.to_device.extend_from_slice(rest);
    } else {
        let mut wire = Vec::new();
        for chunk in rest.chunks(usize::from(*sizes % 160) + 1) {
            let mut out = vec![0u8; chunk.len() + 16];
            let n = relay.write_message(chunk, &mut out).unwrap();
            wire.extend_from_slice(&framed(&out[..n]));
            sealed.extend_from_slice(chunk);
        }
        match at % 3 {
            0 if !wire.is_empty() => {
                let i = at % wire.len();
                wire[i] ^= 1 << (at % 8);
            }
            1 => wire.truncate(at % (wire.len() + 1)),
            _ => {}
        }
        mem.to_device.extend_from_slice(&wire);
    }
    mem.fin = at % 2 == 0;

    let mut got = Vec::new();
    let mut buf = [0u8; 339];
    let step = usize::from(*sizes).max(1);
    for _ in 0..4096 {
        let mut t = ch.bind(now, &mut mem, &mut rng);
        t.state(0);
        match t.peek(0, &mut buf[..step.min(339)]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                t.consume(0, n);
            }
        }
    }
    if mode % 3 == 1 {
        assert!(sealed.starts_with(&got), "plaintext the relay never sealed");
    }
});
