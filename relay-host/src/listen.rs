//! The server's edges that need no protocol knowledge: accepting connections (TLS, the
//! device channel, or plain) under a global connection cap and the handshake deadline, shutdown signals, and
//! watching the account store for edits made by `relay user …` while the relay runs.
//!
//! The protocol core is driven by the `handle` callback given to [`Acceptor::run`]; it
//! receives a connection whose TLS handshake is done and the deadline by which the login
//! must be done too (one deadline for both, so a slow TLS handshake cannot extend it).
//!
//! The device channel ([`crate::channel`]) shares the TLS listener: a TLS connection
//! always starts with a handshake record (0x16), a channel with its first message's
//! length (0x00). One port means one firewall rule and one address for every terminal,
//! and a device behind a restrictive NAT reaches the relay wherever a Linux terminal does.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use tokio_util::either::Either;

use crate::channel::{ChannelKeys, NoiseStream, TLS_FIRST_BYTE};
use crate::metrics::Metrics;
use crate::plain::PlainTcp;
use crate::store::{AccountStore, AccountsSnapshot, StoreError};
use crate::workers::Workers;

/// A client connection: encrypted (boxed: the TLS or Noise state is large, plain
/// connections should not pay for it), or plain TCP on the explicitly allowed plain
/// listener (its write side shareable: [`PlainTcp`]).
pub type ClientStream = Either<Box<Encrypted>, PlainTcp>;

/// An encrypted connection: TLS, or the device channel.
pub type Encrypted = Either<TlsStream<TcpStream>, NoiseStream<TcpStream>>;

/// One slot of the global connection cap; the `relay_connections` gauge counts live slots.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl ConnectionSlot {
    /// A slot under the cap `slots`, counted in `metrics`; `None` when the cap is reached.
    pub fn take(slots: &Arc<Semaphore>, metrics: &Arc<Metrics>) -> Option<Self> {
        let permit = slots.clone().try_acquire_owned().ok()?;
        metrics.connections.inc();
        Some(ConnectionSlot {
            _permit: permit,
            metrics: metrics.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// A connection ready for the protocol: keep `slot` as long as the connection lives.
#[derive(Debug)]
pub struct Accepted {
    /// The stream, TLS handshake done.
    pub stream: ClientStream,
    /// The client's address (for logs and login throttling).
    pub peer: SocketAddr,
    /// The login must be complete by then, or the connection closed.
    pub login_deadline: Instant,
    /// The connection's place under `max_total_connections`.
    pub slot: ConnectionSlot,
}

/// Accepts connections on one listener.
pub struct Acceptor {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    channel: Option<Arc<ChannelKeys>>,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
    /// The runtimes accepted connections are dealt to; `None`: the acceptor's own.
    workers: Option<Arc<Workers>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("channel", &self.channel.is_some())
            .field("free_slots", &self.slots.available_permits())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Resolves when `rx` holds `true` or its sender is gone.
pub(crate) async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl Acceptor {
    /// `tls: None` makes a plain listener. `slots` is shared by all listeners: its size is
    /// `max_total_connections`.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<ServerConfig>>,
        slots: Arc<Semaphore>,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            listener,
            tls: tls.map(TlsAcceptor::from),
            channel: None,
            slots,
            handshake_timeout,
            metrics,
            workers: None,
        }
    }

    /// Runs each accepted connection on the next of `workers`' runtimes in turn.
    pub fn spread_over(mut self, workers: Arc<Workers>) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Also accepts the device channel with `keys` (on a TLS listener only).
    pub fn with_channel(mut self, keys: Arc<ChannelKeys>) -> Self {
        self.channel = self.tls.is_some().then_some(keys);
        self
    }

    /// Whether it takes TLS (and the device channel) rather than plain TCP.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown` turns true (or its sender is dropped), running `handle` in
    /// a task of its own for each connection whose TLS handshake finished in time. Over the
    /// cap, a new connection is closed at once. Returns when it stops accepting; tasks
    /// already running are the caller's to end.
    pub async fn run<F, Fut>(self, mut shutdown: watch::Receiver<bool>, handle: F)
    where
        F: Fn(Accepted) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = stop_requested(&mut shutdown) => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors or memory: wait instead of spinning; the
                        // connections that exist keep working.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = ConnectionSlot::take(&self.slots, &self.metrics) else {
                tracing::debug!(%peer, "connection refused: max_total_connections reached");
                continue;
            };
            // Interactive sessions (ssh) need small writes to go out at once.
            let _ = tcp.set_nodelay(true);
            let login_deadline = Instant::now() + self.handshake_timeout;
            let tls = self.tls.clone();
            let channel = self.channel.clone();
            let handle = handle.clone();
            let task = move |tcp| async move {
                let stream = match tls {
                    None => Either::Right(PlainTcp::new(tcp)),
                    Some(tls) => {
                        // Boxed: the handshake's state (over a kilobyte) would otherwise be
                        // part of every connection task for its whole life, plain TCP too.
                        let handshake = Box::pin(tokio::time::timeout_at(
                            login_deadline,
                            secure(tcp, tls, channel),
                        ));
                        match handshake.await {
                            Ok(Ok(s)) => Either::Left(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "handshake timed out");
                                return;
                            }
                        }
                    }
                };
                handle(Accepted {
                    stream,
                    peer,
                    login_deadline,
                    slot,
                })
                .await;
            };
            match &self.workers {
                Some(workers) => workers.spawn_with(tcp, task),
                None => drop(tokio::spawn(task(tcp))),
            }
        }
    }
}

/// The TLS or channel handshake, told apart by the connection's first byte.
async fn secure(
    tcp: TcpStream,
    tls: TlsAcceptor,
    channel: Option<Arc<ChannelKeys>>,
) -> Result<Encrypted, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(keys) = channel {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] != TLS_FIRST_BYTE {
            return Ok(Either::Right(crate::channel::accept(tcp, &keys).await?));
        }
    }
    Ok(Either::Left(tls.accept(tcp).await?))
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// Loads the accounts now and reloads them whenever the store's generation moves, polled
/// every `every` on a blocking thread. The receiver always holds the newest snapshot;
/// compare with the previous one ([`AccountsSnapshot::removed`]) to close the
/// connections of deleted accounts. The task ends when every receiver is dropped.
pub fn watch_accounts(
    store: Arc<dyn AccountStore>,
    every: Duration,
) -> Result<watch::Receiver<Arc<AccountsSnapshot>>, StoreError> {
    watch_accounts_with(store, every, Arc::new(tokio::sync::Notify::new()))
}

/// [`watch_accounts`], also re-reading the store at once whenever `refresh` is notified
/// (a login by an account the snapshot does not know yet: added a moment ago), and
/// whenever the store says it changed ([`AccountStore::watch_changes`]: another relay
/// or `relay user` edited the shared database).
pub fn watch_accounts_with(
    store: Arc<dyn AccountStore>,
    every: Duration,
    refresh: Arc<tokio::sync::Notify>,
) -> Result<watch::Receiver<Arc<AccountsSnapshot>>, StoreError> {
    let first = AccountsSnapshot::load(store.as_ref())?;
    store.watch_changes(refresh.clone());
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = refresh.notified() => {}
            }
            if tx.is_closed() {
                return;
            }
            let seen = tx.borrow().generation();
            let store = store.clone();
            let reloaded = tokio::task::spawn_blocking(move || {
                if store.generation()? == seen {
                    Ok(None)
                } else {
                    AccountsSnapshot::load(store.as_ref()).map(Some)
                }
            })
            .await;
            match reloaded {
                Ok(Ok(Some(snapshot))) => {
                    tracing::info!(generation = snapshot.generation(), "account store changed");
                    if tx.send(Arc::new(snapshot)).is_err() {
                        return;
                    }
                }
                Ok(Ok(None)) => {}
                // A store error (say, a long write lock) is retried at the next tick.
                Ok(Err(e)) => tracing::warn!("reading the account store: {e}"),
                Err(e) => tracing::warn!("account store reader: {e}"),
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::store::{AccountName, SqliteStore};
    use crate::tls::ServerIdentity;

    async fn echo(mut a: Accepted) {
        let mut buf = [0u8; 64];
        while let Ok(n) = a.stream.read(&mut buf).await {
            if n == 0 || a.stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }

    #[tokio::test]
    async fn cap_refuses_extra_connections_and_shutdown_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let acceptor = Acceptor::new(
            listener,
            None,
            Arc::new(Semaphore::new(1)),
            Duration::from_secs(10),
            metrics.clone(),
        );
        let addr = acceptor.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(acceptor.run(stopped, echo));

        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(metrics.connections.get(), 1);

        // Over the cap: closed at once, the first connection undisturbed.
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(second.read(&mut buf).await.unwrap_or(0), 0);
        first.write_all(b"ok").await.unwrap();
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");

        // The slot comes back when the connection ends.
        drop(first);
        for _ in 0..100 {
            if metrics.connections.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.connections.get(), 0);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("run returns on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_tls_is_closed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = ServerIdentity::load_or_generate(&dir.path().join("relay.db")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let acceptor = Acceptor::new(
            listener,
            Some(identity.server_config().unwrap()),
            Arc::new(Semaphore::new(10)),
            Duration::from_millis(200),
            metrics.clone(),
        );
        let addr = acceptor.local_addr().unwrap();
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(acceptor.run(stopped, echo));

        let started = std::time::Instant::now();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
            .await
            .expect("closed by the relay")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(200));
        for _ in 0..100 {
            if metrics.connections.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.connections.get(), 0);
    }

    #[tokio::test]
    async fn account_edits_reach_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store: Arc<dyn AccountStore> = Arc::new(SqliteStore::open(&path).unwrap());
        let mut rx = watch_accounts(store, Duration::from_millis(20)).unwrap();
        assert!(!rx.borrow().exists("cam"));

        // Another process (here: another handle) edits the store.
        let cli = SqliteStore::open(&path).unwrap();
        cli.add(&AccountName::new("cam").unwrap(), "pw").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.exists("cam")))
            .await
            .expect("the watcher saw the new account")
            .unwrap();
        let before = rx.borrow().clone();
        cli.delete(&AccountName::new("cam").unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| !s.exists("cam")))
            .await
            .expect("the watcher saw the deletion")
            .unwrap();
        assert_eq!(before.removed(&rx.borrow()), ["cam"]);
    }
}
