//! The driver's [`Link`] over tokio: each relay connection (TLS, the channel, or plain
//! TCP) is a [`Pipe`], two bounded buffers between the driver and the connection's reader
//! and writer tasks. The driver peeks and consumes what the reader put there and writes
//! what fits; a full buffer stops the reader (TCP's window then pushes back on the relay)
//! or shrinks [`Link::send_space`] (the service stops taking local input).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::{Buf, BytesMut};
use relay_proto::driver::{Link, LinkError, LinkState};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::{AppEvent, Shared};
use crate::channel::{ChannelError, NoiseStream, RelayLink};
use crate::cli::ServerAddr;
use crate::tls::{Fingerprint, ServerTrust, TlsError};
use relay_proto::driver::Target;
use relay_proto::frame::Redirect;
use rustls::pki_types::ServerName;

/// Bytes a relay connection holds each way between its socket and the driver.
const LINK_BUF: usize = 256 * 1024;

/// Bytes read from the relay at once.
const READ_CHUNK: usize = 64 * 1024;

/// A stream to the relay: encrypted (TLS or the channel), or plain.
type RelayStream = Either<
    Box<Either<tokio_rustls::client::TlsStream<TcpStream>, NoiseStream<TcpStream>>>,
    TcpStream,
>;

/// One relay connection, shared by the driver and the connection's tasks.
struct Pipe {
    st: Mutex<PipeState>,
    /// Output to write, or the driver closed the slot.
    writer: tokio::sync::Notify,
    /// Room to read into again, or the driver closed the slot.
    reader: tokio::sync::Notify,
}

struct PipeState {
    state: LinkState,
    /// Received, not consumed by the driver yet.
    rx: BytesMut,
    /// The stream ended (EOF, error, or a failed write): once `rx` is used, `peek` fails.
    ended: bool,
    /// Written by the driver, not on the socket yet.
    tx: BytesMut,
    /// The driver closed the slot: `Some(graceful)`.
    close: Option<bool>,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            st: Mutex::new(PipeState {
                state: LinkState::Opening,
                rx: BytesMut::new(),
                ended: false,
                tx: BytesMut::new(),
                close: None,
            }),
            writer: Default::default(),
            reader: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream is over: the driver sees `Closed` and reads what is left.
    fn end(&self, shared: &Shared) {
        let mut st = self.lock();
        st.ended = true;
        st.state = LinkState::Closed;
        drop(st);
        shared.wake.notify_one();
    }
}

/// The relay connections of one terminal, by slot.
pub(super) struct HostLink {
    shared: Arc<Shared>,
    pipes: Vec<Option<Arc<Pipe>>>,
    /// Closed by the driver, their tasks still flushing (after LOGOUT) or stopping.
    closing: Vec<Arc<Pipe>>,
}

impl HostLink {
    pub(super) fn new(shared: Arc<Shared>, slots: usize) -> Self {
        HostLink {
            shared,
            pipes: vec![None; slots],
            closing: Vec::new(),
        }
    }

    /// Whether every connection is closed and its tasks are done (a LOGOUT is out).
    pub(super) fn finished(&mut self) -> bool {
        self.closing.retain(|p| Arc::strong_count(p) > 1);
        self.closing.is_empty() && self.pipes.iter().all(Option::is_none)
    }

    fn pipe(&self, slot: usize) -> Option<&Arc<Pipe>> {
        self.pipes.get(slot).and_then(Option::as_ref)
    }
}

impl Link for HostLink {
    fn open(&mut self, slot: usize) -> Result<(), LinkError> {
        self.open_to(slot, Target::Relay(0))
    }

    fn open_to(&mut self, slot: usize, to: Target<'_>) -> Result<(), LinkError> {
        let to = match to {
            Target::Relay(relay) => Dial::Relay(relay),
            Target::Node(node) => Dial::Node(node.clone()),
        };
        self.dial(slot, to)
    }

    fn state(&mut self, slot: usize) -> LinkState {
        self.pipe(slot)
            .map_or(LinkState::Closed, |p| p.lock().state)
    }

    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        let pipe = self.pipe(slot).ok_or(LinkError)?;
        let st = pipe.lock();
        let n = st.rx.len().min(buf.len());
        if n == 0 && st.ended {
            return Err(LinkError);
        }
        buf[..n].copy_from_slice(&st.rx[..n]);
        Ok(n)
    }

    fn consume(&mut self, slot: usize, n: usize) {
        if let Some(pipe) = self.pipe(slot) {
            let mut st = pipe.lock();
            let was_full = st.rx.len() >= LINK_BUF;
            let n = n.min(st.rx.len());
            st.rx.advance(n);
            if was_full && st.rx.len() < LINK_BUF {
                pipe.reader.notify_one();
            }
        }
    }

    fn write(&mut self, slot: usize, bytes: &[u8]) -> Result<(), LinkError> {
        let pipe = self.pipe(slot).ok_or(LinkError)?;
        let mut st = pipe.lock();
        if st.state != LinkState::Open || st.ended {
            return Err(LinkError);
        }
        st.tx.extend_from_slice(bytes);
        pipe.writer.notify_one();
        Ok(())
    }

    fn send_space(&mut self, slot: usize) -> usize {
        self.pipe(slot).map_or(0, |p| {
            let st = p.lock();
            match st.state {
                LinkState::Open if !st.ended => LINK_BUF.saturating_sub(st.tx.len()),
                _ => 0,
            }
        })
    }

    fn close(&mut self, slot: usize, graceful: bool) {
        if let Some(pipe) = self.pipes.get_mut(slot).and_then(Option::take) {
            self.close_pipe(pipe, graceful);
        }
    }
}

impl HostLink {
    /// Starts connecting `slot` to `to`, dropping what the slot held.
    fn dial(&mut self, slot: usize, to: Dial) -> Result<(), LinkError> {
        let pipe = Arc::new(Pipe::new());
        let old = self
            .pipes
            .get_mut(slot)
            .ok_or(LinkError)?
            .replace(pipe.clone());
        if let Some(old) = old {
            self.close_pipe(old, false);
        }
        tokio::spawn(connection(self.shared.clone(), pipe, to));
        Ok(())
    }

    fn close_pipe(&mut self, pipe: Arc<Pipe>, graceful: bool) {
        pipe.lock().close = Some(graceful);
        pipe.writer.notify_one();
        pipe.reader.notify_one();
        self.closing.push(pipe);
    }
}

/// Where a slot connects.
enum Dial {
    /// Our relay at this index of its addresses (`--server`, each with its TLS trust,
    /// channel key or plain: [`Shared::choose`]).
    Relay(u32),
    /// Another node of the relay service, which a demand was redirected to: TLS, pinning
    /// the certificate the redirect names (the relay that named it is trusted already).
    Node(Redirect),
}

/// Connects, then runs the connection's reader and writer until it ends.
async fn connection(shared: Arc<Shared>, pipe: Arc<Pipe>, to: Dial) {
    let (stream, closed) = match to {
        Dial::Relay(relay) => {
            let (server, tls) = shared.choose(relay);
            match connect_relay(server, tls).await {
                Ok(s) => (s, closed_reason(server, tls)),
                Err(e) => {
                    unreachable_relay(&shared, server, e);
                    return pipe.end(&shared);
                }
            }
        }
        Dial::Node(node) => match connect_node(&node).await {
            Ok(s) => (
                s,
                format!("the relay node at {} closed the connection", node.address),
            ),
            // That demand fails with its connection; the terminal and its relay are fine.
            Err(e) => {
                tracing::warn!("cannot reach the relay node a demand was redirected to: {e:#}");
                return pipe.end(&shared);
            }
        },
    };
    {
        let mut st = pipe.lock();
        if st.close.is_some() {
            return;
        }
        st.state = LinkState::Open;
    }
    shared.wake.notify_one();
    let (rd, wr) = tokio::io::split(stream);
    let writer = tokio::spawn(write_relay(shared.clone(), pipe.clone(), wr));
    if read_relay(&shared, &pipe, rd).await {
        let _ = shared.app.send(AppEvent::Closed(closed));
    }
    let _ = writer.await;
    // The connection is finished: a LOGOUT waiting for it sees so at once.
    drop(pipe);
    shared.wake.notify_one();
}

/// Reads the relay into the pipe while it has room. True when the relay ended the
/// stream (false: the driver closed the slot).
async fn read_relay(
    shared: &Shared,
    pipe: &Pipe,
    mut rd: tokio::io::ReadHalf<RelayStream>,
) -> bool {
    let mut buf = BytesMut::new();
    loop {
        let (closed, full) = {
            let st = pipe.lock();
            (st.close.is_some(), st.rx.len() >= LINK_BUF)
        };
        if closed {
            return false;
        }
        if full {
            pipe.reader.notified().await;
            continue;
        }
        buf.reserve(READ_CHUNK);
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r.unwrap_or(0),
            () = pipe.reader.notified() => continue,
        };
        if n == 0 {
            pipe.end(shared);
            return true;
        }
        super::append(&mut pipe.lock().rx, &mut buf);
        shared.wake.notify_one();
    }
}

/// Writes what the driver put in the pipe; after a graceful close, flushes and sends FIN.
async fn write_relay(shared: Arc<Shared>, pipe: Arc<Pipe>, mut wr: impl AsyncWrite + Unpin) {
    loop {
        let (chunk, close) = {
            let mut st = pipe.lock();
            (st.tx.split(), st.close)
        };
        if !chunk.is_empty() {
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return pipe.end(&shared);
            }
            // Room again for the driver's output.
            shared.wake.notify_one();
            continue;
        }
        match close {
            Some(true) => {
                let _ = wr.shutdown().await;
                return;
            }
            Some(false) => return,
            None => pipe.writer.notified().await,
        }
    }
}

/// TLS to the node a redirect names, trusting exactly its certificate's fingerprint.
async fn connect_node(node: &Redirect) -> anyhow::Result<RelayStream> {
    let address = node.address.as_str();
    let addr: ServerAddr = address
        .parse()
        .map_err(|e: String| anyhow!("redirected to {address}: {e}"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect((addr.host.as_str(), addr.port)),
    )
    .await
    .map_err(|_| anyhow!("connecting to {address} (redirected): timed out"))?
    .with_context(|| format!("connecting to {address} (redirected)"))?;
    let _ = tcp.set_nodelay(true);
    let trust = ServerTrust::Pinned(Fingerprint(node.fingerprint));
    // The pinned certificate is checked, not its names: any valid name will do.
    let name = ServerName::try_from("relay")?;
    let tls = crate::tls::connect(crate::tls::client_config(&trust)?, name, tcp).await?;
    Ok(Either::Left(Box::new(Either::Left(tls))))
}

/// Tells the terminal why its relay at `server` cannot be reached: a fatal mismatch of
/// its certificate or key (retrying cannot help), or unreachable for now.
fn unreachable_relay(shared: &Shared, server: &ServerAddr, e: anyhow::Error) {
    let text = format!("{e:#}");
    let fatal = matches!(e.downcast_ref::<TlsError>(), Some(TlsError::Mismatch(_)))
        || e.downcast_ref::<ChannelError>()
            .is_some_and(ChannelError::is_wrong_key)
        || text.contains("invalid peer certificate");
    tracing::debug!(%server, "cannot connect to the relay: {text}");
    let _ = shared.app.send(match fatal {
        true => AppEvent::Fatal(with_hint(text)),
        false => AppEvent::Unreachable(with_hint(text)),
    });
}

async fn connect_relay(
    server: &ServerAddr,
    tls: &Option<RelayLink>,
) -> anyhow::Result<RelayStream> {
    let addr = (server.host.as_str(), server.port);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {server}: timed out"))?
        .with_context(|| format!("connecting to {server}"))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Either::Right(tcp)),
        Some(RelayLink::Tls(config, name)) => {
            let tls = crate::tls::connect(config.clone(), name.clone(), tcp).await?;
            Ok(Either::Left(Box::new(Either::Left(tls))))
        }
        Some(RelayLink::Channel(key)) => {
            let channel = crate::channel::connect(tcp, key).await?;
            Ok(Either::Left(Box::new(Either::Right(channel))))
        }
    }
}

/// Why a relay connection closed, as a user can act on it (it matters only when no login
/// ever succeeded: then it is why there is none).
fn closed_reason(server: &ServerAddr, tls: &Option<RelayLink>) -> String {
    let hint = match tls {
        None => " (is that its TLS port? --plain needs the relay's allow_plain port)",
        Some(_) => "",
    };
    format!("the relay at {server} closed the connection{hint}")
}

/// A connection error with the step that fixes it, where there is an obvious one.
fn with_hint(text: String) -> String {
    let hint = if text.contains("invalid peer certificate") {
        "; pin the relay's certificate with --fingerprint (relay serve prints it) or give \
         its CA with --ca"
    } else if text.contains("TLS handshake") {
        " (is that the relay's plain port? TLS needs its TLS port, or use --plain)"
    } else {
        ""
    };
    text + hint
}
