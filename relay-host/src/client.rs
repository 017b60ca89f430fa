//! The Linux terminal: relay-proto's terminal [`Driver`] on tokio, for `relay expose`,
//! `relay connect` and `relay online`.
//!
//! The driver is the one every binding runs (relay-embedded's agent, the simulation):
//! login, spares, keep-alives, reconnects and back-off, demand retries, capabilities are
//! all decided in relay-proto. This file is a thin async layer around it: one task owns
//! the driver and calls [`Driver::poll`] whenever a relay connection or a local end has
//! news ([`Shared::wake`]), at the instant `poll` returns, or when the application asks
//! for something ([`Cmd`]). The relay connections are a [`Link`](link::HostLink)
//! (TLS, the channel, or plain TCP); sessions are bridged to local TCP or stdio by a
//! [`Service`](local::HostService).

mod link;
mod local;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use relay_proto::driver::Driver;
use relay_proto::frame::ListAnswer;
use relay_proto::terminal::{self, SendError};
use relay_proto::{Password, RejectReason, ReleaseReason, ServiceName, UserId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::channel::RelayLink;
use crate::cli::{ServerAddr, ServiceSpec, TerminalArgs};
use link::HostLink;
use local::{Answer, DemandReply, Ended, HostService};

/// Connection slots of one Linux terminal: its concurrent sessions plus spares (the
/// relay's default allows 256 connections and 128 sessions per account).
pub const SLOTS: usize = 128;

/// Payload the driver hands to the local side at once: a whole DATA frame. (The driver's
/// default, a control frame's worth, suits a device's RAM; here every hand-over costs two
/// pipe locks and a wake, and ~300 bytes a time made the receiving terminal a stream's
/// bottleneck.)
const HANDOVER: usize = 64 * 1024;

/// The driver of one Linux terminal.
type HostDriver = Driver<SLOTS, HANDOVER>;

/// How long a terminal stopped by a signal waits for its LOGOUT to leave.
const LOGOUT_GRACE: Duration = Duration::from_secs(1);

type Sink = Box<dyn AsyncWrite + Send + Unpin>;
type Source = Box<dyn AsyncRead + Send + Unpin>;

/// What the application learns from the terminal.
#[derive(Debug)]
enum AppEvent {
    LoggedIn,
    Fatal(String),
    /// The relay throttled a login: the message says when to retry; the terminal does.
    Throttled(String),
    /// A connection to the relay could not be opened, and why (retried with back-off).
    Unreachable(String),
    /// A relay connection closed (before the first login, that is why there is none).
    Closed(String),
    /// Every relay connection is gone: logged out until a reconnect logs in again.
    Down,
}

/// What the driver task shares with the connections' and local ends' tasks.
struct Shared {
    /// Something changed (bytes arrived or left, a connection opened or ended): poll.
    wake: Notify,
    /// Logging out on purpose: losing the relay is expected, not worth a warning.
    stopping: AtomicBool,
    /// The relay addresses, in order, each with how its connections are protected.
    relays: Vec<(ServerAddr, Option<RelayLink>)>,
    /// The index in `relays` of the last connection opened (for messages).
    current: AtomicUsize,
    app: mpsc::UnboundedSender<AppEvent>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The relay the terminal uses now (the last one a connection was opened to).
    fn server(&self) -> &ServerAddr {
        &self.relays[self.current.load(Ordering::Relaxed)].0
    }

    /// The address a connection opened for relay number `relay` goes to (the terminal's
    /// [`relay_proto::terminal::Terminal::relay`], modulo the number of addresses), and
    /// how it is protected; it becomes the current one.
    fn choose(&self, relay: u32) -> &(ServerAddr, Option<RelayLink>) {
        let i = relay as usize % self.relays.len();
        self.current.store(i, Ordering::Relaxed);
        &self.relays[i]
    }
}

/// What the application asks of the driver task.
enum Cmd {
    /// A session with `target`, bridged to `sink` and `source`.
    Demand {
        target: UserId,
        service: ServiceName,
        sink: Sink,
        source: Source,
        reply: DemandReply,
    },
    /// A page of the online list.
    Online {
        cursor: u32,
        reply: oneshot::Sender<Result<ListAnswer, String>>,
    },
    /// A deferred notice's local connection is up, or failed.
    Answer(Answer),
    /// LOGOUT; the reply once every connection is closed.
    Logout { reply: oneshot::Sender<()> },
}

/// What the exposing terminal offers.
#[derive(Debug, Clone, Default)]
pub struct Exposed {
    /// Service name → HOST:PORT.
    pub services: Vec<ServiceSpec>,
    /// Requesters allowed (empty: anyone the relay lets through).
    pub allow: Vec<String>,
}

/// The running terminal, as the application holds it.
#[derive(Clone)]
struct Client {
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl Client {
    fn ask(&self, cmd: Cmd) -> anyhow::Result<()> {
        self.cmds.send(cmd).map_err(|_| anyhow!("terminal stopped"))
    }
}

/// The driver task's state besides the driver: replies that wait on the relay.
struct Task {
    epoch: std::time::Instant,
    shared: Arc<Shared>,
    link: HostLink,
    svc: HostService,
    online: Option<oneshot::Sender<Result<ListAnswer, String>>>,
    logout: Option<oneshot::Sender<()>>,
}

impl Task {
    fn now(&self) -> relay_proto::Instant {
        relay_proto::Instant::from_millis(self.epoch.elapsed().as_millis() as u64)
    }

    /// Runs the driver until the application is gone.
    async fn run(mut self, mut driver: Box<HostDriver>, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        driver.start(self.now());
        loop {
            let now = self.now();
            let next = driver.poll(now, &mut self.link, &mut self.svc);
            self.after_poll(&driver);
            let sleep = async {
                match next {
                    Some(t) => {
                        let at = self.epoch + Duration::from_millis(t.as_millis());
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.shared.wake.notified() => {}
                () = sleep => {}
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(&mut driver, cmd),
                    None => return,
                },
            }
        }
    }

    /// Replies whose answer a poll may have brought.
    fn after_poll(&mut self, driver: &HostDriver) {
        if std::mem::take(&mut self.svc.page) {
            if let Some(reply) = self.online.take() {
                let page = driver.terminal().online_page().cloned();
                let _ = reply.send(page.ok_or_else(|| "no page".to_owned()));
            }
        }
        if std::mem::take(&mut self.svc.logged_in)
            && self.svc.is_requester()
            && driver.terminal().runs_as() == Some(terminal::Kind::Reachable)
        {
            tracing::warn!(
                server = %self.shared.server(),
                "the relay does not know requester instances (no REQUESTER capability): this \
                 login runs as the user ID's reachable instance, which replaces a device \
                 logged in with the same user ID (and is replaced by the next one)"
            );
        }
        if self.logout.is_some() && self.link.finished() {
            if let Some(reply) = self.logout.take() {
                let _ = reply.send(());
            }
        }
    }

    fn command(&mut self, driver: &mut HostDriver, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Demand {
                target,
                service,
                sink,
                source,
                reply,
            } => match driver.demand(target, service, now) {
                Ok(h) => {
                    let (end_tx, end_rx) = oneshot::channel();
                    self.svc.attach(h, sink, source, Some(end_tx));
                    self.svc.wait(h, reply, end_rx);
                }
                Err(e) => {
                    let _ = reply.send(Err(match e {
                        SendError::NotLoggedIn => "the terminal has logged out".to_owned(),
                        SendError::NoIdleConnection => {
                            format!("no free connection to the relay (all {SLOTS} in use)")
                        }
                        e => format!("cannot demand a session: {e:?}"),
                    }));
                }
            },
            Cmd::Online { cursor, reply } => match driver.terminal_mut().request_online(cursor) {
                Ok(_) => self.online = Some(reply),
                Err(SendError::Unsupported(_)) => {
                    let server = self.shared.server();
                    let _ = reply.send(Err(format!(
                        "the relay at {server} does not offer the online list \
                         (no LIST capability in its LOGIN_OK)"
                    )));
                }
                Err(e) => {
                    let _ = reply.send(Err(format!("cannot ask the relay: {e:?}")));
                }
            },
            Cmd::Answer(a) => self.answer(driver, a),
            Cmd::Logout { reply } => {
                self.shared.stopping.store(true, Ordering::Relaxed);
                driver.logout(now);
                self.logout = Some(reply);
            }
        }
    }

    /// A deferred notice's local connection: accept with it, or reject.
    fn answer(&mut self, driver: &mut HostDriver, a: Answer) {
        if !self.svc.current(&a) {
            return;
        }
        let now = self.now();
        let h = a.handle;
        let answer = match a.local {
            Ok(local) => {
                let _ = local.set_nodelay(true);
                let (r, w) = local.into_split();
                self.svc.attach(h, Box::new(w), Box::new(r), None);
                Ok(())
            }
            Err(text) => {
                tracing::warn!(from = %a.from, "{text}");
                Err(RejectReason::ServiceUnavailable)
            }
        };
        let accepted = answer.is_ok();
        match driver.answer(h, answer, now, &mut self.link, &mut self.svc) {
            Ok(()) if accepted => {
                let session = driver.terminal().session(h).map(|(id, _)| id);
                tracing::info!(?session, from = %a.from, service = a.name, local = a.addr, "session accepted");
            }
            Ok(()) => {}
            // The relay withdrew the notice meanwhile.
            Err(_) => self.svc.end(h),
        }
    }
}

/// Starts the terminal: its driver task, and the channel of what it tells the
/// application.
fn start(
    args: &TerminalArgs,
    spare: u8,
    exposed: Option<Exposed>,
) -> anyhow::Result<(Client, mpsc::UnboundedReceiver<AppEvent>)> {
    let password = args.password()?;
    let user = UserId::new(args.user.as_str()).map_err(|e| anyhow!("user ID: {e:?}"))?;
    let password = Password::new(&password).map_err(|e| anyhow!("password: {e:?}"))?;
    // `prepare` already warned loudly about --plain (`None`).
    let relays = args.relays()?;
    if relays.is_empty() {
        bail!("no relay address (--server)");
    }
    let mut seed = [0u8; 8];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow!("random seed: {e}"))?;
    // Only `expose` takes demands; `connect` and `online` log in as requesters, so they
    // replace no instance of the account (not even the device's own) and many run at once.
    let kind = match exposed {
        Some(_) => terminal::Kind::Reachable,
        None => terminal::Kind::Requester,
    };
    let config = terminal::Config {
        kind,
        spare,
        // A requester's demand for a device homed on another node of a cluster follows
        // the relay's redirect there (HostLink::open_to).
        follow_redirects: kind == terminal::Kind::Requester,
        ..terminal::Config::default()
    };
    let driver: Box<HostDriver> = Box::new(Driver::new(
        config,
        user,
        password,
        u64::from_le_bytes(seed),
    ));
    let (app, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        wake: Notify::new(),
        stopping: AtomicBool::new(false),
        relays,
        current: AtomicUsize::new(0),
        app,
    });
    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let task = Task {
        epoch: std::time::Instant::now(),
        shared: shared.clone(),
        link: HostLink::new(shared.clone(), SLOTS),
        svc: HostService::new(shared.clone(), exposed, cmds.clone(), SLOTS),
        online: None,
        logout: None,
    };
    tokio::spawn(task.run(driver, cmd_rx));
    Ok((Client { shared, cmds }, rx))
}

/// Waits for the first login, up to `patience`; a fatal event is an error, and so is the
/// deadline, with the last reason a connection failed (a one-shot command must not keep
/// ssh waiting on an unreachable relay).
async fn logged_in(
    client: &Client,
    rx: &mut mpsc::UnboundedReceiver<AppEvent>,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::sleep(patience);
    tokio::pin!(deadline);
    let mut why = None;
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(AppEvent::LoggedIn) => return Ok(()),
                Some(AppEvent::Fatal(m) | AppEvent::Throttled(m)) => bail!("{m}"),
                Some(AppEvent::Unreachable(m) | AppEvent::Closed(m)) => why = Some(m),
                Some(_) => {}
                None => bail!("terminal stopped"),
            },
            () = &mut deadline => bail!(
                "not logged in to the relay at {} within {}: {}",
                client.shared.server(),
                humantime::format_duration(patience),
                why.as_deref().unwrap_or("no answer")
            ),
        }
    }
}

/// `expose`'s view of why it is not logged in: said once per change of reason, not at
/// every retry (the back-off retries for as long as it takes).
#[derive(Debug, Default)]
struct Reasons {
    logged_in: bool,
    last: Option<String>,
}

impl Reasons {
    fn on(&mut self, e: &AppEvent) {
        match e {
            AppEvent::LoggedIn => {
                self.logged_in = true;
                self.last = None;
            }
            AppEvent::Down => self.logged_in = false,
            AppEvent::Unreachable(why) | AppEvent::Closed(why)
                if !self.logged_in && self.last.as_ref() != Some(why) =>
            {
                tracing::warn!("cannot log in to the relay, retrying with back-off: {why}");
                self.last = Some(why.clone());
            }
            _ => {}
        }
    }
}

/// One thread: a terminal is an edge process whose work is mostly waiting on sockets, and
/// a single-threaded runtime wakes its tasks without cross-thread hand-offs (measured:
/// fewer context switches and about 7% more HTTP requests/s through the relay).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `relay expose`: stays logged in and serves demands until killed or refused.
pub fn expose(args: &TerminalArgs, spare: u8, exposed: Exposed) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let services: Vec<String> = exposed
            .services
            .iter()
            .map(|s| format!("{}={}", s.name, s.addr))
            .collect();
        tracing::info!(
            services = services.join(" "),
            allow = exposed.allow.join(","),
            "exposing"
        );
        let (client, mut rx) = start(args, spare, Some(exposed))?;
        let mut reasons = Reasons::default();
        loop {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(AppEvent::Fatal(m)) => bail!("{m}"),
                    Some(AppEvent::Throttled(m)) => tracing::warn!("{m}; trying again then"),
                    Some(e) => reasons.on(&e),
                    None => bail!("terminal stopped"),
                },
                r = crate::listen::shutdown_signal() => {
                    r?;
                    log_out(&client).await;
                    return Ok(());
                }
            }
        }
    })
}

/// Stopped by a signal: sends LOGOUT so the relay takes us offline at once (peers in a
/// session learn `PeerLoggedOut` rather than waiting for a keep-alive deadline), and
/// waits a moment for the connections to close.
async fn log_out(client: &Client) {
    let (reply, done) = oneshot::channel();
    if client.ask(Cmd::Logout { reply }).is_ok() {
        let _ = tokio::time::timeout(LOGOUT_GRACE, done).await;
    }
    tracing::info!(server = %client.shared.server(), "logged out");
}

/// Opens one session to `target`, bridged to `sink` and `source`. Returns the session's
/// end.
async fn session(
    client: &Client,
    target: &UserId,
    service: &ServiceName,
    sink: Sink,
    source: Source,
) -> anyhow::Result<Ended> {
    let (reply, answer) = oneshot::channel();
    client.ask(Cmd::Demand {
        target: target.clone(),
        service: service.clone(),
        sink,
        source,
        reply,
    })?;
    match answer.await {
        Ok(Ok(end)) => Ok(end),
        Ok(Err(message)) => bail!("{message}"),
        Err(_) => bail!("terminal stopped"),
    }
}

fn target_of(target: &str, service: Option<&str>) -> anyhow::Result<(UserId, ServiceName)> {
    let t = UserId::new(target).map_err(|e| anyhow!("target: {e:?}"))?;
    let s = ServiceName::new(service.unwrap_or(""))
        .or_else(|_| Ok::<_, anyhow::Error>(ServiceName::default()))?;
    Ok((t, s))
}

/// `relay connect --stdio`: one session on stdin/stdout.
///
/// ssh sends its ProxyCommand SIGHUP at every logout: that is a normal end, not a crash.
/// It reads as the end of standard input (TERMINATE: the session ends as if ssh had
/// closed the pipe), then, if the session has not ended within [`LOGOUT_GRACE`], a LOGOUT.
pub fn connect_stdio(
    args: &TerminalArgs,
    target: &str,
    service: Option<&str>,
    patience: Duration,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let result = rt.block_on(async {
        let mut hangup = hangup()?;
        let (t, s) = target_of(target, service)?;
        let (client, mut rx) = start(args, 1, None)?;
        tokio::select! {
            r = logged_in(&client, &mut rx, patience) => r?,
            _ = hangup.wait_for(|h| *h) => return Ok(()),
        }
        let end = session(
            &client,
            &t,
            &s,
            Box::new(tokio::io::stdout()),
            Box::new(stdin_until(hangup.clone())),
        )
        .await
        .with_context(|| target.to_owned())?;
        tokio::pin!(end);
        let hung_up = async {
            let _ = hangup.wait_for(|h| *h).await;
            tokio::time::sleep(LOGOUT_GRACE).await;
        };
        let reason = tokio::select! {
            r = &mut end => r.map_err(|_| anyhow!("session to {target} ended: the relay connection was lost"))?,
            e = fatal(&mut rx) => return Err(e),
            () = hung_up => {
                log_out(&client).await;
                return Ok(());
            }
        };
        if reason != ReleaseReason::Normal {
            bail!("session to {target} ended: {}", describe(reason));
        }
        Ok(())
    });
    // stdin's reader thread may be blocked in read(2): do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Turns `true` at the first SIGHUP (registered now, so that it no longer kills us).
fn hangup() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("watching for SIGHUP")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        hup.recv().await;
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Standard input until it ends or a hang-up arrives, whichever is first; either way the
/// reader then sees the end of input.
fn stdin_until(mut hangup: tokio::sync::watch::Receiver<bool>) -> tokio::io::DuplexStream {
    let (mut w, r) = tokio::io::duplex(local::CHUNK);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        tokio::select! {
            _ = tokio::io::copy(&mut stdin, &mut w) => {}
            _ = hangup.wait_for(|h| *h) => {}
        }
    });
    r
}

async fn fatal(rx: &mut mpsc::UnboundedReceiver<AppEvent>) -> anyhow::Error {
    loop {
        match rx.recv().await {
            Some(AppEvent::Fatal(m)) => return anyhow!("{m}"),
            Some(_) => {}
            None => return anyhow!("terminal stopped"),
        }
    }
}

fn describe(reason: ReleaseReason) -> &'static str {
    match reason {
        ReleaseReason::Normal => "normally",
        ReleaseReason::PeerLost => "the peer's connection was lost",
        ReleaseReason::PeerLoggedOut => "the peer logged out or was replaced",
        ReleaseReason::Cancelled => "cancelled by the relay",
        ReleaseReason::ShuttingDown => "the relay is shutting down",
        ReleaseReason::EndedByOperator => "the relay's operator ended the session",
    }
}

/// `relay connect --listen`: every accepted local connection becomes one session.
pub fn connect_listen(
    args: &TerminalArgs,
    target: &str,
    service: Option<&str>,
    listen: SocketAddr,
    patience: Duration,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (t, s) = target_of(target, service)?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let (client, mut rx) = start(args, 2, None)?;
        logged_in(&client, &mut rx, patience).await?;
        tracing::info!(%listen, target, "forwarding local connections");
        loop {
            let (local, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(p) => p,
                    Err(e) => { tracing::warn!("accept: {e}"); continue; }
                },
                e = fatal(&mut rx) => return Err(e),
                r = crate::listen::shutdown_signal() => {
                    r?;
                    log_out(&client).await;
                    return Ok(());
                }
            };
            let _ = local.set_nodelay(true);
            let (client, t, s) = (client.clone(), t.clone(), s.clone());
            let target = target.to_owned();
            tokio::spawn(async move {
                let (r, w) = local.into_split();
                match session(&client, &t, &s, Box::new(w), Box::new(r)).await {
                    Ok(end) => match end.await {
                        Ok(ReleaseReason::Normal) => {}
                        Ok(reason) => {
                            tracing::error!(%peer, "session to {target} ended: {}", describe(reason))
                        }
                        Err(_) => tracing::error!(
                            %peer,
                            "session to {target} ended: the relay connection was lost"
                        ),
                    },
                    Err(e) => tracing::error!(%peer, "session to {target} failed: {e:#}"),
                }
            });
        }
    })
}

/// `relay online`: the logged-in user IDs, every page of the relay's list.
pub fn online(args: &TerminalArgs, patience: Duration) -> anyhow::Result<Vec<String>> {
    let rt = runtime()?;
    let result = rt.block_on(async {
        let (client, mut rx) = start(args, 1, None)?;
        logged_in(&client, &mut rx, patience).await?;
        let mut cursor = 0;
        let mut users = Vec::new();
        loop {
            let (reply, answer) = oneshot::channel();
            client.ask(Cmd::Online { cursor, reply })?;
            let page = tokio::select! {
                page = tokio::time::timeout(Duration::from_secs(10), answer) => page
                    .map_err(|_| anyhow!("the relay did not answer the online list request"))?
                    .map_err(|_| anyhow!("terminal stopped"))?
                    .map_err(|m| anyhow!("{m}"))?,
                e = fatal(&mut rx) => return Err(e),
            };
            users.extend(page.users.iter().map(|u| u.to_string()));
            match page.next {
                Some(next) => cursor = next,
                None => return Ok(users),
            }
        }
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Appends what a reader task read (`read`) to the buffer it shares with the driver
/// (`to`), leaving `read` empty for the next read. An empty `to` (the driver kept up: the
/// usual case) takes the read buffer itself, so the bytes are not copied; the reader
/// goes on with `to`'s old allocation.
fn append(to: &mut bytes::BytesMut, read: &mut bytes::BytesMut) {
    if to.is_empty() {
        std::mem::swap(to, read);
    } else {
        to.extend_from_slice(read);
    }
    read.clear();
}
