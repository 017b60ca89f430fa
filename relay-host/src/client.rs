//! The Linux terminal: relay-proto's [`Terminal`] on real sockets, for `relay expose`,
//! `relay connect` and `relay online`.
//!
//! The state machine sits behind a `std::sync::Mutex` (never held across an `await`) and
//! asks for connections with [`Event::Open`]; reconnecting, back-off, keep-alives and the
//! pool of spare connections are all its decisions. Each relay connection has the same
//! FIFO + writer as the server ([`Outbox`]): control frames are pulled from
//! [`Terminal::poll_transmit`] when the FIFO is empty; session payload read from the local
//! socket is pushed (DATA header, then the bytes) after room is reserved, so a slow relay
//! connection stops us reading the local application.
//!
//! A session's local end (a TCP connection to the exposed service, an accepted local
//! connection, or stdin/stdout) is *parked* on the handle before the demand or accept goes
//! out, so payload arriving right behind the answer always finds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use relay_proto::terminal::{self, Event, Handle, Offer, SendError, Terminal};
use relay_proto::{Password, RejectReason, ReleaseReason, ServiceName, UserId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::either::Either;

use crate::channel::{ChannelError, NoiseStream, RelayLink};
use crate::cli::{ServerAddr, ServiceSpec, TerminalArgs};
use crate::outbox::{Outbox, run_writer};
use crate::tls::TlsError;

/// Connection slots of one Linux terminal: its concurrent sessions plus spares (the
/// relay's default allows 256 connections and 128 sessions per account).
pub const SLOTS: usize = 128;
type Term = Terminal<SLOTS>;

/// Largest payload read from a local socket at once (one DATA frame).
const CHUNK: usize = 64 * 1024 - 1;

/// A demand that finds no idle connection of ours waits for the pool to grow (one login
/// per new connection), trying again whenever a relay connection's state changes, up to
/// this long, rather than failing. (The relay holds a demand until the target has an
/// idle connection, and the terminal retries one it gave up on.)
const DEMAND_PATIENCE: Duration = Duration::from_secs(15);
/// How long a terminal stopped by a signal waits for its LOGOUT to leave.
const LOGOUT_GRACE: Duration = Duration::from_secs(1);
/// Tries again at least this often while waiting (a missed wake costs no more).
const DEMAND_RETRY_DELAY: Duration = Duration::from_millis(150);

type Sink = Box<dyn AsyncWrite + Send + Unpin>;
type Source = Box<dyn AsyncRead + Send + Unpin>;

/// A session's local end, waiting on its handle for the relay connection's reader.
struct Parked {
    sink: Sink,
    /// Told how the session ended (for `connect`).
    ended: Option<oneshot::Sender<ReleaseReason>>,
    /// Dropped when the session is over: stops the local→relay pump.
    _stop: oneshot::Sender<()>,
}

/// One relay connection's shared parts.
struct Slot {
    out: Outbox,
    /// Stops the reader (the connection is finished).
    stop: Notify,
    parked: Mutex<Option<Parked>>,
}

impl Slot {
    fn park(&self, p: Parked) {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }
    fn unpark(&self) -> Option<Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What the application learns from the terminal.
#[derive(Debug)]
enum AppEvent {
    LoggedIn,
    Fatal(String),
    /// The relay throttled a login: the message says when to retry; the terminal does.
    Throttled(String),
    OnlinePage,
    /// A connection to the relay could not be opened, and why (retried with back-off).
    Unreachable(String),
    /// A relay connection closed (before the first login, that is why there is none).
    Closed(String),
    /// Every relay connection is gone: logged out until a reconnect logs in again.
    Down,
}

struct State {
    term: Term,
    slots: Vec<Option<Arc<Slot>>>,
    /// Demands waiting for their answer, by handle.
    waiters: HashMap<u8, oneshot::Sender<Result<(), DemandFailure>>>,
}

/// Why a demand gave no session. The terminal already retried what can be retried
/// (the target had no idle connection): this is final.
#[derive(Debug)]
struct DemandFailure {
    message: String,
}

/// What the exposing terminal offers.
#[derive(Debug, Clone, Default)]
pub struct Exposed {
    /// Service name → HOST:PORT.
    pub services: Vec<ServiceSpec>,
    /// Requesters allowed (empty: anyone the relay lets through).
    pub allow: Vec<String>,
}

struct Ctx {
    state: Mutex<State>,
    timer: Notify,
    /// Some relay connection took input (it may be idle now): waiting demands try again.
    pool: Notify,
    /// Logging out on purpose: losing the relay is expected, not worth a warning.
    stopping: std::sync::atomic::AtomicBool,
    epoch: std::time::Instant,
    server: ServerAddr,
    tls: Option<RelayLink>,
    app: mpsc::UnboundedSender<AppEvent>,
    exposed: Option<Exposed>,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn now(&self) -> relay_proto::Instant {
        relay_proto::Instant::from_millis(self.epoch.elapsed().as_millis() as u64)
    }
}

impl State {
    fn slot(&self, h: Handle) -> Option<&Arc<Slot>> {
        self.slots.get(usize::from(h.0)).and_then(Option::as_ref)
    }
    fn is(&self, h: Handle, me: &Arc<Slot>) -> bool {
        self.slot(h).is_some_and(|s| Arc::ptr_eq(s, me))
    }
    /// After every call into the terminal: its events, and writers woken for output.
    fn after(&mut self, ctx: &Ctx) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(e) = self.term.poll_event() {
            events.push(e);
        }
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if self.term.has_output(Handle(i as u8)) {
                    s.out.wake.notify_one();
                }
            }
        }
        ctx.timer.notify_one();
        events
    }
    /// Pushes `h`'s control output into its FIFO. `true` if it pushed.
    fn flush_control(&mut self, h: Handle, now: relay_proto::Instant) -> bool {
        let mut buf = [0u8; terminal::MIN_TRANSMIT_BUF];
        match self.term.poll_transmit(h, now, &mut buf) {
            Ok(n) if n > 0 => {
                if let Some(s) = self.slot(h) {
                    s.out.push(Bytes::copy_from_slice(&buf[..n]), 0);
                }
                true
            }
            _ => false,
        }
    }
}

/// A stream to the relay: encrypted (TLS or the channel), or plain.
type RelayStream = Either<
    Box<Either<tokio_rustls::client::TlsStream<TcpStream>, NoiseStream<TcpStream>>>,
    TcpStream,
>;

/// Handles events that are not the calling reader's own business.
fn dispatch(ctx: &Arc<Ctx>, events: Vec<Event>) {
    for e in events {
        match e {
            Event::Open(h) => {
                let slot = Arc::new(Slot {
                    out: Outbox::new(),
                    stop: Notify::new(),
                    parked: Mutex::new(None),
                });
                ctx.lock().slots[usize::from(h.0)] = Some(slot.clone());
                tokio::spawn(open(ctx.clone(), h, slot));
            }
            Event::Closed { handle, cause } => {
                tracing::debug!(handle = handle.0, ?cause, "relay connection closed");
                // The relay's own reason (an operator's kick, a shutdown) is worth a line.
                if let terminal::Cause::Relay(code) = cause {
                    tracing::warn!(server = %ctx.server, "the relay closed a connection: {code} ({code:?})");
                }
                let slot = ctx.lock().slots[usize::from(handle.0)].take();
                if let Some(s) = slot {
                    s.out.kill();
                    s.stop.notify_one();
                    drop(s.unpark());
                }
                ctx.lock().waiters.remove(&handle.0);
            }
            Event::LoggedIn => {
                tracing::info!(server = %ctx.server, "logged in to the relay");
                let runs_as = ctx.lock().term.runs_as();
                if ctx.exposed.is_none() && runs_as == Some(terminal::Kind::Reachable) {
                    tracing::warn!(server = %ctx.server, "the relay does not know requester instances (no REQUESTER capability): this login runs as the user ID's reachable instance and replaced a device logged in with it");
                }
                let _ = ctx.app.send(AppEvent::LoggedIn);
            }
            Event::Down if ctx.stopping.load(std::sync::atomic::Ordering::Relaxed) => {}
            Event::Down => {
                tracing::warn!(server = %ctx.server, "lost the relay; reconnecting with back-off");
                let _ = ctx.app.send(AppEvent::Down);
            }
            Event::Throttled { text, .. } => {
                let _ = ctx.app.send(AppEvent::Throttled(format!(
                    "the relay refused the login: {} (Throttled)",
                    text.as_str()
                )));
            }
            Event::LoginRefused { code, text } => {
                let _ = ctx.app.send(AppEvent::Fatal(format!(
                    "the relay refused the login: {} ({code:?})",
                    text.as_str()
                )));
            }
            Event::Notice {
                handle,
                session,
                from,
                service,
            } => on_notice(ctx, handle, session, from, service),
            Event::Accepted { handle, peer, .. } => {
                tracing::info!(handle = handle.0, %peer, "session accepted");
                if let Some(w) = ctx.lock().waiters.remove(&handle.0) {
                    let _ = w.send(Ok(()));
                }
            }
            Event::DemandFailed {
                handle,
                error,
                text,
            } => {
                let detail = text.as_str();
                let summary = error.to_string();
                // A rejection's text is its reason's (one table): said once.
                let message = if detail.is_empty() || summary.ends_with(detail) {
                    summary
                } else {
                    format!("{error}: {detail}")
                };
                let mut st = ctx.lock();
                // The connection stays with the terminal (idle again): the local end that
                // was parked for the session goes, so its socket closes now.
                if let Some(slot) = st.slot(handle) {
                    drop(slot.unpark());
                }
                if let Some(w) = st.waiters.remove(&handle.0) {
                    let _ = w.send(Err(DemandFailure { message }));
                }
            }
            Event::PeerTerminated { .. } | Event::SessionEnded { .. } => {
                // Handled by the reader of that handle, in order with the payload.
            }
            Event::OnlinePage => {
                let _ = ctx.app.send(AppEvent::OnlinePage);
            }
            Event::RelayError { handle, code, text } => {
                tracing::warn!(handle = handle.0, ?code, "relay error: {}", text.as_str())
            }
        }
    }
}

/// A demand notice on an exposing terminal: check it, reach the local service, accept.
fn on_notice(ctx: &Arc<Ctx>, h: Handle, session: u32, from: UserId, service: ServiceName) {
    // Admission is the terminal's rule (relay-proto), the same on every device.
    let admitted = match &ctx.exposed {
        Some(exposed) => {
            let names: Vec<&str> = exposed.services.iter().map(|s| s.name.as_str()).collect();
            let allow: Vec<&str> = exposed.allow.iter().map(String::as_str).collect();
            terminal::admit(&from, &service, &names, &allow).and_then(|i| {
                let spec = exposed.services.get(i).cloned();
                spec.ok_or(RejectReason::UnknownService)
            })
        }
        None => Err(RejectReason::Busy),
    };
    let spec = match admitted {
        Ok(spec) => spec,
        Err(reason) => {
            tracing::info!(%from, service = service.as_str(), "rejected: {reason}");
            let mut st = ctx.lock();
            let _ = st.term.reject(h, reason);
            let ev = st.after(ctx);
            drop(st);
            return dispatch(ctx, ev);
        }
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let local =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&spec.addr)).await;
        let local = match local {
            Ok(Ok(s)) => s,
            failed => {
                let text = match failed {
                    Ok(Err(e)) => format!("service '{}' unreachable: {e}", spec.name),
                    _ => format!("service '{}' did not answer", spec.name),
                };
                tracing::warn!(%from, "{text}");
                let mut st = ctx.lock();
                let _ = st.term.reject(h, RejectReason::ServiceUnavailable);
                let ev = st.after(&ctx);
                drop(st);
                return dispatch(&ctx, ev);
            }
        };
        let _ = local.set_nodelay(true);
        let (r, w) = local.into_split();
        let (stop_tx, stop_rx) = oneshot::channel();
        let mut st = ctx.lock();
        let Some(slot) = st.slot(h).cloned() else {
            return;
        };
        slot.park(Parked {
            sink: Box::new(w),
            ended: None,
            _stop: stop_tx,
        });
        let now = ctx.now();
        if st.term.accept(h, now).is_err() {
            drop(slot.unpark());
            return;
        }
        tracing::info!(session, %from, service = spec.name, local = spec.addr, "session accepted");
        let ev = st.after(&ctx);
        drop(st);
        dispatch(&ctx, ev);
        tokio::spawn(pump(ctx.clone(), h, slot, Box::new(r), stop_rx));
    });
}

/// Opens the relay connection for `h` and runs its reader and writer.
async fn open(ctx: Arc<Ctx>, h: Handle, me: Arc<Slot>) {
    let stream = match connect_relay(&ctx).await {
        Ok(s) => s,
        Err(e) => {
            let text = format!("{e:#}");
            let fatal = matches!(e.downcast_ref::<TlsError>(), Some(TlsError::Mismatch(_)))
                || e.downcast_ref::<ChannelError>()
                    .is_some_and(ChannelError::is_wrong_key)
                || text.contains("invalid peer certificate");
            tracing::debug!(server = %ctx.server, "cannot connect to the relay: {text}");
            let _ = ctx.app.send(match fatal {
                true => AppEvent::Fatal(with_hint(text)),
                false => AppEvent::Unreachable(with_hint(text)),
            });
            let mut st = ctx.lock();
            if st.is(h, &me) {
                let now = ctx.now();
                st.term.connect_failed(h, now);
            }
            let ev = st.after(&ctx);
            drop(st);
            return dispatch(&ctx, ev);
        }
    };
    {
        let mut st = ctx.lock();
        if !st.is(h, &me) {
            return;
        }
        let now = ctx.now();
        st.term.connected(h, now);
        let ev = st.after(&ctx);
        drop(st);
        dispatch(&ctx, ev);
    }
    let (rd, wr) = tokio::io::split(stream);
    let writer = {
        let ctx = ctx.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let pull = || {
                let mut st = ctx.lock();
                if !st.is(h, &me) {
                    return false;
                }
                let pushed = st.flush_control(h, ctx.now());
                let ev = st.after(&ctx);
                drop(st);
                dispatch(&ctx, ev);
                pushed
            };
            run_writer(wr, &me.out, pull).await;
            // A failed write: the reader sees the socket end too.
            me.stop.notify_one();
        })
    };
    reader(&ctx, h, &me, rd).await;
    let _ = ctx.app.send(AppEvent::Closed(closed_reason(&ctx)));
    me.out.kill();
    let _ = writer.await;
}

async fn connect_relay(ctx: &Ctx) -> anyhow::Result<RelayStream> {
    let addr = (ctx.server.host.as_str(), ctx.server.port);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {}: timed out", ctx.server))?
        .with_context(|| format!("connecting to {}", ctx.server))?;
    let _ = tcp.set_nodelay(true);
    match &ctx.tls {
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

/// Reads the relay connection: protocol to the terminal, payload to the parked local end.
async fn reader(
    ctx: &Arc<Ctx>,
    h: Handle,
    me: &Arc<Slot>,
    mut rd: tokio::io::ReadHalf<RelayStream>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut local: Option<Parked> = None;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r.unwrap_or(0),
            () = me.stop.notified() => return,
        };
        if n == 0 {
            let mut st = ctx.lock();
            if st.is(h, me) {
                let now = ctx.now();
                st.term.transport_closed(h, now);
            }
            let ev = st.after(ctx);
            drop(st);
            dispatch(ctx, ev);
            return;
        }
        while !buf.is_empty() {
            let (offer, own, others) = {
                let mut st = ctx.lock();
                if !st.is(h, me) {
                    return;
                }
                let now = ctx.now();
                let offer = st.term.handle_input(h, now, &buf);
                ctx.pool.notify_waiters();
                let (own, others): (Vec<Event>, Vec<Event>) =
                    st.after(ctx).into_iter().partition(|e| {
                        matches!(e, Event::PeerTerminated { handle } | Event::SessionEnded { handle, .. } if *handle == h)
                    });
                // Under the lock: once the session is released a new demand may park a
                // new local end on this handle, which must not be taken for the old one.
                if local.is_none() && (!own.is_empty() || matches!(offer, Offer::Payload(_))) {
                    local = me.unpark();
                }
                if others.iter().any(|e| matches!(e, Event::Closed { handle, cause: terminal::Cause::Protocol } if *handle == h)) {
                    tracing::debug!(handle = h.0, "protocol error at {:02x?}", &buf[..buf.len().min(24)]);
                }
                (offer, own, others)
            };
            dispatch(ctx, others);
            let consumed = match offer {
                Offer::Consumed(n) => n,
                Offer::NeedMore => break,
                // `after` drained the events: the same bytes again.
                Offer::Blocked => 0,
                Offer::Payload(n) => {
                    if let Some(p) = local.as_mut() {
                        // Flush too: stdout buffers (a no-op for TCP).
                        let wrote = p.sink.write_all(&buf[..n]).await;
                        if wrote.is_err() || p.sink.flush().await.is_err() {
                            // The local application went away: end our side.
                            local = None;
                            let mut st = ctx.lock();
                            let _ = st.term.terminate(h);
                            let ev = st.after(ctx);
                            drop(st);
                            dispatch(ctx, ev);
                        }
                    }
                    n
                }
            };
            buf.advance(consumed);
            for e in own {
                match e {
                    Event::PeerTerminated { .. } => {
                        if let Some(p) = local.as_mut() {
                            let _ = p.sink.flush().await;
                            let _ = p.sink.shutdown().await;
                        }
                    }
                    Event::SessionEnded { reason, .. } => {
                        if let Some(mut p) = local.take() {
                            let _ = p.sink.flush().await;
                            let _ = p.sink.shutdown().await;
                            if let Some(tx) = p.ended.take() {
                                let _ = tx.send(reason);
                            }
                        }
                        if reason != ReleaseReason::Normal {
                            tracing::warn!(handle = h.0, ?reason, "session ended abnormally");
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Local → relay: reads the local end and sends it as DATA frames on `h`'s session.
async fn pump(
    ctx: Arc<Ctx>,
    h: Handle,
    me: Arc<Slot>,
    mut src: Source,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let max = ctx.lock().term.max_payload().clamp(1, CHUNK);
        let mut buf = BytesMut::with_capacity(max);
        let n = tokio::select! {
            r = src.read_buf(&mut buf) => r.unwrap_or(0),
            _ = &mut stop => return,
        };
        if n == 0 {
            let mut st = ctx.lock();
            if st.is(h, &me) {
                let _ = st.term.terminate(h);
            }
            let ev = st.after(&ctx);
            drop(st);
            dispatch(&ctx, ev);
            return;
        }
        let reserved = tokio::select! {
            ok = me.out.reserve(n) => ok,
            _ = &mut stop => return,
        };
        if !reserved {
            return;
        }
        let mut st = ctx.lock();
        if !st.is(h, &me) {
            return;
        }
        let now = ctx.now();
        st.flush_control(h, now);
        match st.term.send_data(h, n) {
            Ok(header) => {
                me.out.push(Bytes::copy_from_slice(&header), 0);
                me.out.push(buf.freeze(), n as u32);
            }
            Err(SendError::NotInSession | SendError::BadHandle) => {
                me.out.release(n as u32);
                return;
            }
            Err(e) => {
                me.out.release(n as u32);
                tracing::warn!(handle = h.0, "cannot send: {e:?}");
                return;
            }
        }
        let ev = st.after(&ctx);
        drop(st);
        dispatch(&ctx, ev);
    }
}

/// Runs the terminal's timers until the process ends.
async fn timers(ctx: Arc<Ctx>) {
    loop {
        let deadline = ctx.lock().term.poll_timeout();
        let sleep = async {
            match deadline {
                Some(t) => {
                    let at = ctx.epoch + Duration::from_millis(t.as_millis());
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    true
                }
                None => std::future::pending().await,
            }
        };
        let fired = tokio::select! {
            f = sleep => f,
            () = ctx.timer.notified() => false,
        };
        if fired {
            let mut st = ctx.lock();
            let now = ctx.now();
            st.term.handle_timeout(now);
            let ev = st.after(&ctx);
            drop(st);
            dispatch(&ctx, ev);
        }
    }
}

fn start(
    args: &TerminalArgs,
    spare: u8,
    exposed: Option<Exposed>,
) -> anyhow::Result<(Arc<Ctx>, mpsc::UnboundedReceiver<AppEvent>)> {
    let password = args.password()?;
    let user = UserId::new(args.user.as_str()).map_err(|e| anyhow!("user ID: {e:?}"))?;
    let password = Password::new(&password).map_err(|e| anyhow!("password: {e:?}"))?;
    // `prepare` already warned loudly about --plain (`None`).
    let tls = args.link()?;
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
        ..terminal::Config::default()
    };
    let term = Term::new(config, user, password, u64::from_le_bytes(seed));
    let (app, rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        state: Mutex::new(State {
            term,
            slots: vec![None; SLOTS],
            waiters: HashMap::new(),
        }),
        timer: Notify::new(),
        pool: Notify::new(),
        stopping: Default::default(),
        epoch: std::time::Instant::now(),
        server: args.server.clone(),
        tls,
        app,
        exposed,
    });
    {
        let mut st = ctx.lock();
        let now = ctx.now();
        st.term.start(now);
        let ev = st.after(&ctx);
        drop(st);
        dispatch(&ctx, ev);
    }
    tokio::spawn(timers(ctx.clone()));
    Ok((ctx, rx))
}

/// Waits for the first login, up to `patience`; a fatal event is an error, and so is the
/// deadline, with the last reason a connection failed (a one-shot command must not keep
/// ssh waiting on an unreachable relay).
async fn logged_in(
    ctx: &Ctx,
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
                ctx.server,
                humantime::format_duration(patience),
                why.as_deref().unwrap_or("no answer")
            ),
        }
    }
}

/// Why a relay connection closed, as a user can act on it (it matters only when no login
/// ever succeeded: then it is why there is none).
fn closed_reason(ctx: &Ctx) -> String {
    let hint = match ctx.tls {
        None => " (is that its TLS port? --plain needs the relay's allow_plain port)",
        Some(_) => "",
    };
    format!("the relay at {} closed the connection{hint}", ctx.server)
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
        let (ctx, mut rx) = start(args, spare, Some(exposed))?;
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
                    log_out(&ctx).await;
                    return Ok(());
                }
            }
        }
    })
}

/// Stopped by a signal: sends LOGOUT so the relay takes us offline at once (peers in a
/// session learn `PeerLoggedOut` rather than waiting for a keep-alive deadline), and
/// waits a moment for the connections to close.
async fn log_out(ctx: &Arc<Ctx>) {
    ctx.stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let events = {
        let mut st = ctx.lock();
        let now = ctx.now();
        st.term.logout(now);
        st.after(ctx)
    };
    dispatch(ctx, events);
    let deadline = tokio::time::Instant::now() + LOGOUT_GRACE;
    while tokio::time::Instant::now() < deadline && ctx.lock().slots.iter().any(Option::is_some) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(server = %ctx.server, "logged out");
}

/// Opens one session to `target`: wait for an idle connection of ours, park the local
/// end, demand, wait for the answer. Returns the session's end.
async fn session(
    ctx: &Arc<Ctx>,
    target: &UserId,
    service: &ServiceName,
    sink: Sink,
    src: Source,
) -> anyhow::Result<oneshot::Receiver<ReleaseReason>> {
    let mut sink = Some(sink);
    let give_up = tokio::time::Instant::now() + DEMAND_PATIENCE;
    loop {
        let pool_changed = ctx.pool.notified();
        tokio::pin!(pool_changed);
        pool_changed.as_mut().enable();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (end_tx, end_rx) = oneshot::channel();
        let (ans_tx, ans_rx) = oneshot::channel();
        let handle = {
            let mut st = ctx.lock();
            match st.term.demand(target.clone(), service.clone(), ctx.now()) {
                Ok(h) => {
                    let Some(slot) = st.slot(h).cloned() else {
                        bail!("internal: no slot for handle");
                    };
                    slot.park(Parked {
                        sink: sink.take().ok_or_else(|| anyhow!("internal: sink"))?,
                        ended: Some(end_tx),
                        _stop: stop_tx,
                    });
                    st.waiters.insert(h.0, ans_tx);
                    let ev = st.after(ctx);
                    drop(st);
                    dispatch(ctx, ev);
                    Some((h, slot))
                }
                Err(SendError::NoIdleConnection | SendError::NotLoggedIn) => None,
                Err(e) => bail!("cannot demand a session: {e:?}"),
            }
        };
        if let Some((h, slot)) = handle {
            // The terminal retries a target without an idle connection itself.
            return match ans_rx.await {
                Ok(Ok(())) => {
                    tokio::spawn(pump(ctx.clone(), h, slot, src, stop_rx));
                    Ok(end_rx)
                }
                Ok(Err(f)) => bail!("{}", f.message),
                Err(_) => bail!("the relay connection closed before the demand was answered"),
            };
        }
        if tokio::time::Instant::now() >= give_up {
            bail!("no idle connection to the relay");
        }
        let _ = tokio::time::timeout(DEMAND_RETRY_DELAY, pool_changed).await;
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
        let (ctx, mut rx) = start(args, 1, None)?;
        tokio::select! {
            r = logged_in(&ctx, &mut rx, patience) => r?,
            _ = hangup.wait_for(|h| *h) => return Ok(()),
        }
        let end = session(
            &ctx,
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
                log_out(&ctx).await;
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
    let (mut w, r) = tokio::io::duplex(CHUNK);
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
        let (ctx, mut rx) = start(args, 2, None)?;
        logged_in(&ctx, &mut rx, patience).await?;
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
                    log_out(&ctx).await;
                    return Ok(());
                }
            };
            let _ = local.set_nodelay(true);
            let (ctx, t, s) = (ctx.clone(), t.clone(), s.clone());
            let target = target.to_owned();
            tokio::spawn(async move {
                let (r, w) = local.into_split();
                match session(&ctx, &t, &s, Box::new(w), Box::new(r)).await {
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
        let (ctx, mut rx) = start(args, 1, None)?;
        logged_in(&ctx, &mut rx, patience).await?;
        let mut cursor = 0;
        let mut users = Vec::new();
        loop {
            let mut sent = false;
            let give_up = tokio::time::Instant::now() + DEMAND_PATIENCE;
            while tokio::time::Instant::now() < give_up {
                let events = {
                    let mut st = ctx.lock();
                    match st.term.request_online(cursor) {
                        Ok(_) => Some(st.after(&ctx)),
                        Err(SendError::Unsupported(_)) => bail!(
                            "the relay at {} does not offer the online list (no LIST capability in its LOGIN_OK)",
                            ctx.server
                        ),
                        Err(_) => None,
                    }
                };
                if let Some(ev) = events {
                    dispatch(&ctx, ev);
                    sent = true;
                    break;
                }
                tokio::time::sleep(DEMAND_RETRY_DELAY).await;
            }
            if !sent {
                bail!("no idle connection to ask the relay");
            }
            let page = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match rx.recv().await {
                        Some(AppEvent::OnlinePage) => {
                            return ctx.lock().term.online_page().cloned();
                        }
                        Some(AppEvent::Fatal(_)) | None => return None,
                        Some(_) => {}
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("the relay did not answer the online list request"))?
            .ok_or_else(|| anyhow!("the relay connection was lost"))?;
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
