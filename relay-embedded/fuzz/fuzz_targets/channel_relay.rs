//! relay-host's channel receive path: the first message and then the terminal's bytes
//! are arbitrary (mode 0), or records snow sealed and then altered or cut (mode 1).
//! Whatever comes, no panic, a clear error at worst, and only plaintext the terminal
//! really sealed comes out, in order.
#![no_main]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use relay_host::channel::{ChannelKeys, PROLOGUE, accept};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The relay's keys, generated once per fuzzing process in a directory of its own.
fn keys() -> &'static ChannelKeys {
    static KEYS: OnceLock<ChannelKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("relay-channel-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ChannelKeys::load_or_generate(&dir.join("relay.db")).unwrap()
    })
}

/// Both directions of a connection in memory, shared with the harness: what the
/// terminal sent (and how much the relay read), and what the relay wrote.
#[derive(Default)]
struct Wire {
    to_relay: Vec<u8>,
    read: usize,
    from_relay: Vec<u8>,
}

struct Conn(Rc<RefCell<Wire>>);

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut w = self.0.borrow_mut();
        let n = buf.remaining().min(w.to_relay.len() - w.read);
        buf.put_slice(&w.to_relay[w.read..w.read + n]);
        w.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().from_relay.extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

/// Records of `rest` sealed by `terminal`, then one bit flipped or the stream cut at `at`.
fn records(terminal: &mut snow::TransportState, rest: &[u8], size: usize, at: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for chunk in rest.chunks(size) {
        let mut out = vec![0u8; chunk.len() + 16];
        let n = terminal.write_message(chunk, &mut out).unwrap();
        wire.extend_from_slice(&framed(&out[..n]));
    }
    match at % 3 {
        0 if !wire.is_empty() => {
            let i = at % wire.len();
            wire[i] ^= 1 << (at % 8);
        }
        1 => wire.truncate(at % (wire.len() + 1)),
        _ => {}
    }
    wire
}

fuzz_target!(|data: &[u8]| {
    let [mode, at_hi, at_lo, sizes, rest @ ..] = data else {
        return;
    };
    let at = usize::from(u16::from_be_bytes([*at_hi, *at_lo]));
    let wire = Rc::new(RefCell::new(Wire::default()));
    let mut terminal = snow::Builder::new("Noise_NK_25519_ChaChaPoly_SHA256".parse().unwrap())
        .remote_public_key(&keys().current().0)
        .unwrap()
        .prologue(PROLOGUE)
        .unwrap()
        .build_initiator()
        .unwrap();
    if mode % 2 == 0 {
        wire.borrow_mut().to_relay.extend_from_slice(rest);
    } else {
        let mut first = [0u8; 64];
        let n = terminal.write_message(&[0xff, 0xff], &mut first).unwrap();
        wire.borrow_mut().to_relay = framed(&first[..n]);
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut accepting = Box::pin(accept(Conn(wire.clone()), keys()));
    let Poll::Ready(Ok(mut stream)) = accepting.as_mut().poll(&mut cx) else {
        return;
    };
    let mut sealed = Vec::new();
    if mode % 2 == 1 {
        let answer = std::mem::take(&mut wire.borrow_mut().from_relay);
        terminal.read_message(&answer[2..], &mut []).unwrap();
        let mut terminal = terminal.into_transport_mode().unwrap();
        let size = usize::from(*sizes) * 64 + 1;
        let bytes = records(&mut terminal, rest, size, at);
        wire.borrow_mut().to_relay.extend_from_slice(&bytes);
        sealed.extend_from_slice(rest);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; usize::from(*sizes) * 16 + 1];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut stream).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => got.extend_from_slice(rb.filled()),
            _ => break,
        }
    }
    if mode % 2 == 1 {
        assert!(
            sealed.starts_with(&got),
            "plaintext the terminal never sealed"
        );
    }
});
