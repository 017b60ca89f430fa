//! The device channel (docs/PROTOCOL.md §1.1): Noise `NK_25519_ChaChaPoly_SHA256`, the
//! relay's static key pinned by the terminal, on the relay's TLS port.
//!
//! Devices cannot afford TLS (see docs/EMBEDDED.md); a Linux terminal with no CA store
//! uses the same channel (`--relay-key`). Each Noise message travels with a 2-byte
//! big-endian length. The initiator's first message carries, encrypted, the largest
//! message it accepts, so a device receives records that fit its socket buffer.
//!
//! The relay keeps two keys beside its account store: the current one and the next one,
//! both accepted, so devices can be moved to the next key before the current one retires
//! (rotation: move `…-channel-next.key` over `…-channel.key` and restart; a fresh next
//! key is generated).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll, ready};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::tls::{TlsError, write_new};

/// The Noise protocol name; both sides hash it into the handshake.
const PARAMS: &str = "Noise_NK_25519_ChaChaPoly_SHA256";
/// The Noise prologue: binds the handshake to this channel and its version.
pub const PROLOGUE: &[u8] = b"relay channel 1";
/// The AEAD tag every encrypted message carries.
const TAG: usize = 16;
/// The largest Noise message (the 2-byte length prefix's limit).
pub const MAX_MESSAGE: usize = 65535;
/// The smallest receive limit an initiator may announce: one plaintext byte per message.
const MIN_LIMIT: usize = TAG + 1;
/// The first byte of every TLS connection (a handshake record). The channel's first
/// byte is the high byte of its first message's length (50): zero.
pub const TLS_FIRST_BYTE: u8 = 0x16;

fn params() -> snow::params::NoiseParams {
    PARAMS.parse().expect("a valid Noise protocol name")
}

/// A relay channel public key (X25519), shown as base64 and read as base64 or hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayKey(pub [u8; 32]);

impl fmt::Display for RelayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayKey({self})")
    }
}

/// A string is not a channel key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("a relay key is 32 bytes: 44 characters of base64 or 64 of hex")]
pub struct BadRelayKey;

impl FromStr for RelayKey {
    type Err = BadRelayKey;
    fn from_str(s: &str) -> Result<Self, BadRelayKey> {
        let s = s.trim();
        let bytes = if s.len() == 64 {
            (0..32)
                .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2).unwrap_or("-"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| BadRelayKey)?
        } else {
            B64.decode(s).map_err(|_| BadRelayKey)?
        };
        Ok(Self(bytes.try_into().map_err(|_| BadRelayKey)?))
    }
}

/// One private channel key.
struct Secret([u8; 32]);

impl Secret {
    fn public(&self) -> RelayKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        RelayKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// Reads the key file at `path`, generating it (mode 0600) first if it is missing.
    fn load_or_generate(path: &Path) -> Result<Self, TlsError> {
        if !path.exists() {
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).map_err(|e| TlsError::Io {
                path: path.to_owned(),
                source: io::Error::other(e),
            })?;
            write_new(path, format!("{}\n", B64.encode(key)).as_bytes(), 0o600)?;
            tracing::info!(key = %path.display(), "generated a relay channel key");
        }
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = || TlsError::Pem {
            path: path.to_owned(),
            what: "not a channel key (32 bytes of base64)".into(),
        };
        let bytes = B64.decode(text.trim()).map_err(|_| bad())?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

/// The relay's channel keys: the current one and the next one, both accepted.
pub struct ChannelKeys {
    current: Secret,
    next: Secret,
}

impl fmt::Debug for ChannelKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelKeys")
            .field("current", &self.current())
            .field("next", &self.next())
            .finish()
    }
}

impl ChannelKeys {
    /// Loads the keys kept beside the account store at `db` (`relay.db` →
    /// `relay-channel.key`, `relay-channel-next.key`), generating each one that is missing.
    pub fn load_or_generate(db: &Path) -> Result<Self, TlsError> {
        let (current, next) = key_paths(db);
        Ok(Self {
            current: Secret::load_or_generate(&current)?,
            next: Secret::load_or_generate(&next)?,
        })
    }

    /// The current public key (terminals pin it with `--relay-key`).
    pub fn current(&self) -> RelayKey {
        self.current.public()
    }

    /// The next public key, also accepted: pin it ahead of a rotation.
    pub fn next(&self) -> RelayKey {
        self.next.public()
    }
}

/// Where the channel keys of the store at `db` live.
pub fn key_paths(db: &Path) -> (PathBuf, PathBuf) {
    let stem = db
        .file_stem()
        .map_or_else(|| "relay".into(), |s| s.to_string_lossy().into_owned());
    (
        db.with_file_name(format!("{stem}-channel.key")),
        db.with_file_name(format!("{stem}-channel-next.key")),
    )
}

/// How a terminal protects its connections to the relay.
#[derive(Debug, Clone)]
pub enum RelayLink {
    /// TLS, trusting the relay as configured, checking this name.
    Tls(
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
    /// The channel, pinning this key.
    Channel(RelayKey),
}

/// Why a channel handshake failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The connection failed or closed before the handshake finished.
    #[error("the connection ended during the channel handshake: {0}")]
    Io(#[from] io::Error),
    /// The relay closed at once: it holds none of the pinned key's private halves (or it
    /// is no relay with a channel).
    #[error(
        "the relay closed the channel handshake: it does not hold the pinned relay key \
         (check --relay-key against what `relay serve` prints)"
    )]
    Refused,
    /// A handshake message did not decrypt: the pinned key is not the peer's, or the
    /// message was altered on the way.
    #[error("the channel handshake failed: {0} (wrong relay key, or altered on the way)")]
    Noise(#[from] snow::Error),
    /// The initiator announced a receive limit below one byte of plaintext.
    #[error("the initiator's receive limit is missing or below {MIN_LIMIT}")]
    BadLimit,
}

impl ChannelError {
    /// The relay is not the one pinned: retrying cannot help.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, ChannelError::Refused | ChannelError::Noise(_))
    }
}

/// The handshake's first message: `e` (32), the 2-byte receive limit and its tag.
const FIRST_LEN: usize = 32 + 2 + TAG;
/// The handshake's answer: `e` (32) and the tag of an empty payload.
const ANSWER_LEN: usize = 32 + TAG;

/// Reads one length-prefixed handshake message, which must be `expected` bytes long.
async fn read_message<S: AsyncRead + Unpin>(io: &mut S, expected: usize) -> io::Result<Vec<u8>> {
    let len = usize::from(io.read_u16().await?);
    if len != expected {
        return Err(bad_data("a channel handshake message of the wrong length"));
    }
    let mut msg = vec![0; len];
    io.read_exact(&mut msg).await?;
    Ok(msg)
}

/// Writes one length-prefixed Noise message.
async fn write_message<S: AsyncWrite + Unpin>(io: &mut S, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(io::Error::other)?;
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    io.write_all(&framed).await?;
    io.flush().await
}

/// The relay's side: reads the first message with each key in turn, answers with the one
/// that decrypts it.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    keys: &ChannelKeys,
) -> Result<NoiseStream<S>, ChannelError> {
    let first = read_message(&mut io, FIRST_LEN).await?;
    let mut payload = [0u8; 64];
    let mut last = snow::Error::Decrypt;
    for secret in [&keys.current, &keys.next] {
        let mut hs = snow::Builder::new(params())
            .local_private_key(&secret.0)?
            .prologue(PROLOGUE)?
            .build_responder()?;
        match hs.read_message(&first, &mut payload) {
            Ok(n) => {
                let limit = payload
                    .get(..n)
                    .and_then(|p| <[u8; 2]>::try_from(p).ok())
                    .map(|b| usize::from(u16::from_be_bytes(b)))
                    .filter(|&l| l >= MIN_LIMIT)
                    .ok_or(ChannelError::BadLimit)?;
                let mut second = [0u8; 64];
                let len = hs.write_message(&[], &mut second)?;
                write_message(&mut io, &second[..len]).await?;
                return Ok(NoiseStream::new(io, hs.into_transport_mode()?, limit));
            }
            Err(e) => last = e,
        }
    }
    Err(last.into())
}

/// The terminal's side: pins `relay`, announces that it accepts messages of any size.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    relay: &RelayKey,
) -> Result<NoiseStream<S>, ChannelError> {
    let mut hs = snow::Builder::new(params())
        .remote_public_key(&relay.0)?
        .prologue(PROLOGUE)?
        .build_initiator()?;
    let mut first = [0u8; 64];
    let limit = (MAX_MESSAGE as u16).to_be_bytes();
    let len = hs.write_message(&limit, &mut first)?;
    write_message(&mut io, &first[..len]).await?;
    let second = match read_message(&mut io, ANSWER_LEN).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ChannelError::Refused),
        other => other?,
    };
    hs.read_message(&second, &mut [])?;
    Ok(NoiseStream::new(io, hs.into_transport_mode()?, MAX_MESSAGE))
}

/// A byte stream over the channel: each write goes out as one or more Noise messages,
/// reads return plaintext only once its whole message is authenticated.
pub struct NoiseStream<S> {
    io: S,
    noise: snow::TransportState,
    /// The largest message the peer accepts.
    limit: usize,
    /// Bytes read that do not make a whole message yet.
    received: Vec<u8>,
    /// The last decrypted message and how much of it was read.
    plain: Vec<u8>,
    taken: usize,
    /// Sealed messages not yet written, and how much of them was.
    sealed: Vec<u8>,
    sent: usize,
}

impl<S> fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseStream")
            .field("limit", &self.limit)
            .field("received", &self.received.len())
            .field("sealed", &(self.sealed.len() - self.sent))
            .finish_non_exhaustive()
    }
}

fn bad_data(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<S> NoiseStream<S> {
    fn new(io: S, noise: snow::TransportState, limit: usize) -> Self {
        Self {
            io,
            noise,
            limit,
            received: Vec::new(),
            plain: Vec::new(),
            taken: 0,
            sealed: Vec::new(),
            sent: 0,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Decrypts the first whole message in `received`, if there is one.
    fn open_message(&mut self) -> io::Result<bool> {
        let Some(len) = self
            .received
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return Ok(false);
        };
        let Some(msg) = self.received.get(2..2 + len) else {
            return Ok(false);
        };
        self.plain.resize(len, 0);
        let n = self
            .noise
            .read_message(msg, &mut self.plain)
            .map_err(|_| bad_data("a channel message failed authentication (altered or forged)"))?;
        self.plain.truncate(n);
        self.taken = 0;
        self.received.drain(..2 + len);
        if self.received.is_empty() {
            // An idle connection keeps no buffer (relay-host holds thousands of them).
            self.received = Vec::new();
        }
        Ok(true)
    }

    /// Seals up to one message's worth of `buf`; returns how much it took.
    fn seal(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.limit - TAG);
        let start = self.sealed.len();
        self.sealed.resize(start + 2 + n + TAG, 0);
        let len = self
            .noise
            .write_message(&buf[..n], &mut self.sealed[start + 2..])
            .map_err(io::Error::other)?;
        self.sealed[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(n)
    }
}

impl<S: AsyncWrite + Unpin> NoiseStream<S> {
    /// Writes sealed bytes until none are left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.sealed.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.sealed[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sealed = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plain.len() {
                    this.plain = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.open_message()? {
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(if this.received.is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a channel message",
                    ))
                });
            }
            this.received.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    /// Seals one message at a time: the previous one must be on its way first, so at
    /// most one message waits here.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = this.seal(buf)?;
        // Start sending now; what the socket cannot take goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    fn keys() -> (tempfile::TempDir, ChannelKeys) {
        let dir = tempfile::tempdir().unwrap();
        let keys = ChannelKeys::load_or_generate(&dir.path().join("relay.db")).unwrap();
        (dir, keys)
    }

    #[test]
    fn keys_are_kept_private_beside_the_store_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, keys) = keys();
        let (current, next) = key_paths(&dir.path().join("relay.db"));
        for path in [&current, &next] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        assert_ne!(keys.current(), keys.next());
        let again = ChannelKeys::load_or_generate(&dir.path().join("relay.db")).unwrap();
        assert_eq!(
            (again.current(), again.next()),
            (keys.current(), keys.next())
        );
    }

    #[test]
    fn relay_keys_parse_as_base64_or_hex() {
        let key = RelayKey([0xab; 32]);
        assert_eq!(key.to_string().parse::<RelayKey>(), Ok(key));
        assert_eq!("ab".repeat(32).parse::<RelayKey>(), Ok(key));
        assert_eq!("abcd".parse::<RelayKey>(), Err(BadRelayKey));
        assert_eq!("zz".repeat(32).parse::<RelayKey>(), Err(BadRelayKey));
    }

    async fn pair(pinned: RelayKey, keys: &ChannelKeys) -> Result<(), ChannelError> {
        let (a, b) = duplex(1 << 20);
        let (client, server) = tokio::join!(connect(a, &pinned), accept(b, keys));
        let (mut client, mut server) = (client?, server?);
        let big = vec![7u8; 200_000];
        let (sent, got) = tokio::join!(
            async {
                client.write_all(&big).await.unwrap();
                client.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        let () = sent;
        assert_eq!(got, big);
        Ok(())
    }

    #[tokio::test]
    async fn both_the_current_and_the_next_key_are_accepted() {
        let (_dir, keys) = keys();
        pair(keys.current(), &keys).await.unwrap();
        pair(keys.next(), &keys).await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_pinned_key_is_refused_by_the_relay() {
        let (_dir, keys) = keys();
        let (a, b) = duplex(4096);
        let server = tokio::spawn(async move {
            let r = accept(b, &keys).await;
            // The relay drops the connection: the terminal sees it closed.
            r.map(|_| ())
        });
        let err = connect(a, &RelayKey([1; 32])).await.unwrap_err();
        assert!(matches!(err, ChannelError::Refused), "{err}");
        assert!(matches!(server.await.unwrap(), Err(ChannelError::Noise(_))));
    }

    /// A first message announcing another length than 50 is refused at once: the relay
    /// neither allocates for it nor waits for bytes that a valid handshake never has.
    #[tokio::test]
    async fn a_first_message_of_another_length_is_refused_at_once() {
        let (_dir, keys) = keys();
        let (mut a, b) = duplex(4096);
        a.write_all(&60_000u16.to_be_bytes()).await.unwrap();
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), accept(b, &keys))
            .await
            .expect("refused without waiting for 60,000 bytes");
        match refused {
            Err(ChannelError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
            other => panic!("{other:?}"),
        }
    }

    /// Messages of the relay toward a device never exceed the limit it announced.
    #[tokio::test]
    async fn sealed_messages_respect_the_peer_limit() {
        let (_dir, keys) = keys();
        let (a, b) = duplex(1 << 16);
        let mut hs = snow::Builder::new(params())
            .remote_public_key(&keys.current().0)
            .unwrap()
            .prologue(PROLOGUE)
            .unwrap()
            .build_initiator()
            .unwrap();
        let (mut raw, server) = tokio::join!(
            async {
                let mut raw = a;
                let mut first = [0u8; 64];
                let len = hs.write_message(&100u16.to_be_bytes(), &mut first).unwrap();
                write_message(&mut raw, &first[..len]).await.unwrap();
                let second = read_message(&mut raw, ANSWER_LEN).await.unwrap();
                hs.read_message(&second, &mut []).unwrap();
                raw
            },
            accept(b, &keys)
        );
        let mut server = server.unwrap();
        server.write_all(&[5u8; 1000]).await.unwrap();
        server.flush().await.unwrap();
        let mut noise = hs.into_transport_mode().unwrap();
        let mut total = 0;
        while total < 1000 {
            let len = usize::from(raw.read_u16().await.unwrap());
            assert!(len <= 100, "message of {len} bytes");
            let mut msg = vec![0; len];
            raw.read_exact(&mut msg).await.unwrap();
            let mut plain = [0u8; 100];
            total += noise.read_message(&msg, &mut plain).unwrap();
        }
    }

    #[tokio::test]
    async fn altered_and_truncated_messages_are_errors() {
        let (_dir, keys) = keys();
        for cut in [false, true] {
            let (a, b) = duplex(1 << 16);
            let pinned = keys.current();
            let (client, server) = tokio::join!(connect(a, &pinned), accept(b, &keys));
            let (mut client, server) = (client.unwrap(), server.unwrap());
            client.write_all(b"secret session bytes").await.unwrap();
            client.flush().await.unwrap();
            // Take the sealed bytes off the relay's socket and alter or truncate them.
            let NoiseStream {
                mut io,
                noise,
                limit,
                ..
            } = server;
            let mut wire = [0u8; 64];
            let n = io.read(&mut wire).await.unwrap();
            let bytes = if cut {
                wire[..n - 1].to_vec()
            } else {
                wire[n - 1] ^= 1;
                wire[..n].to_vec()
            };
            let (c, mut d) = duplex(1024);
            d.write_all(&bytes).await.unwrap();
            drop(d);
            let mut server = NoiseStream::new(c, noise, limit);
            let mut out = Vec::new();
            let err = server.read_to_end(&mut out).await.unwrap_err();
            assert!(out.is_empty());
            let want = if cut {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::InvalidData
            };
            assert_eq!(err.kind(), want, "{err}");
        }
    }
}
