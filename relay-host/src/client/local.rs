//! The driver's [`Service`] on a Linux host: each session is bridged to a local end (a
//! TCP connection to the exposed service, an accepted local connection, or
//! stdin/stdout) through a [`LocalPipe`], two bounded buffers between the driver and the
//! local end's reader and writer tasks. A full buffer is backpressure: the driver stops
//! reading that relay connection, or the local reader stops reading.
//!
//! The protocol decisions are the driver's and the terminal's; this only moves bytes,
//! answers notices with relay-proto's admission rule, and tells the application.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use relay_proto::driver::{Decision, Service, Session};
use relay_proto::terminal::{self, Event, Handle};
use relay_proto::{RejectReason, ReleaseReason, ServiceName, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{AppEvent, Cmd, Exposed, Shared, Sink, Source};

/// Bytes a session holds each way between the driver and its local end.
const LOCAL_BUF: usize = 256 * 1024;
/// Largest read from a local end at once.
pub(super) const CHUNK: usize = 64 * 1024 - 1;

/// A session's end once it started: the relay's release reason, or `None` when the relay
/// connection was lost.
pub(super) type Ended = oneshot::Receiver<ReleaseReason>;

/// The answer to a demand: the session's end, or why there is no session.
pub(super) type DemandReply = oneshot::Sender<Result<Ended, String>>;

/// One session's local end, shared by the driver and the local end's tasks.
struct LocalPipe {
    st: Mutex<LocalState>,
    /// Relay → local output to write, or the session is over.
    sink: Notify,
    /// Room to read into again, or the session is over.
    source: Notify,
}

#[derive(Default)]
struct LocalState {
    /// From the relay, not written to the local end yet.
    out: BytesMut,
    /// The peer terminated: shut the local write side once `out` is written.
    out_end: bool,
    /// From the local end, not sent yet.
    inp: BytesMut,
    /// The local end has no more to send.
    inp_end: bool,
    /// Writing to the local end failed: what arrives is dropped, our side ends.
    broken: bool,
    /// The session is over: the writer finishes and reports `reason`, the reader stops.
    done: bool,
    reason: Option<ReleaseReason>,
    ended: Option<oneshot::Sender<ReleaseReason>>,
}

impl LocalPipe {
    fn lock(&self) -> MutexGuard<'_, LocalState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sessions of one terminal, by handle.
pub(super) struct HostService {
    shared: Arc<Shared>,
    exposed: Option<Exposed>,
    /// Answers to deferred notices come back here.
    cmds: mpsc::UnboundedSender<Cmd>,
    locals: Vec<Option<Arc<LocalPipe>>>,
    /// Each handle's latest deferred notice: a late answer for an older one is void.
    notices: Vec<u64>,
    next_notice: u64,
    /// Demands waiting for their answer, by handle, with the session's end to hand over.
    waiters: HashMap<u8, (DemandReply, Ended)>,
    /// An online list page arrived.
    pub(super) page: bool,
    /// The first connection logged in (checked against the relay's capabilities).
    pub(super) logged_in: bool,
}

/// A deferred notice's local connection, for the driver task to answer with.
pub(super) struct Answer {
    pub handle: Handle,
    pub notice: u64,
    pub from: UserId,
    pub name: String,
    pub addr: String,
    pub local: Result<TcpStream, String>,
}

impl HostService {
    pub(super) fn new(
        shared: Arc<Shared>,
        exposed: Option<Exposed>,
        cmds: mpsc::UnboundedSender<Cmd>,
        slots: usize,
    ) -> Self {
        HostService {
            shared,
            exposed,
            cmds,
            locals: vec![None; slots],
            notices: vec![0; slots],
            next_notice: 0,
            waiters: HashMap::new(),
            page: false,
            logged_in: false,
        }
    }

    /// Bridges `h`'s session (or the demand or notice answer under way) to a local end.
    pub(super) fn attach(
        &mut self,
        h: Handle,
        sink: Sink,
        source: Source,
        ended: Option<oneshot::Sender<ReleaseReason>>,
    ) {
        let pipe = Arc::new(LocalPipe {
            st: Mutex::new(LocalState {
                ended,
                ..Default::default()
            }),
            sink: Notify::new(),
            source: Notify::new(),
        });
        tokio::spawn(write_local(self.shared.clone(), pipe.clone(), sink));
        tokio::spawn(read_local(self.shared.clone(), pipe.clone(), source));
        if let Some(old) = self
            .locals
            .get_mut(usize::from(h.0))
            .and_then(|l| l.replace(pipe))
        {
            finish(&old);
        }
    }

    /// A demand went out on `h`: `reply` gets its answer.
    pub(super) fn wait(&mut self, h: Handle, reply: DemandReply, ended: Ended) {
        self.waiters.insert(h.0, (reply, ended));
    }

    /// Whether this terminal only makes demands (it exposes nothing).
    pub(super) fn is_requester(&self) -> bool {
        self.exposed.is_none()
    }

    /// Whether `answer` is for the notice that still waits on its handle.
    pub(super) fn current(&self, answer: &Answer) -> bool {
        self.notices.get(usize::from(answer.handle.0)) == Some(&answer.notice)
    }

    /// The session on `h` is over (or never started): the local end finishes.
    pub(super) fn end(&mut self, h: Handle) {
        if let Some(pipe) = self.locals.get_mut(usize::from(h.0)).and_then(Option::take) {
            finish(&pipe);
        }
    }

    fn local(&self, h: Handle) -> Option<&Arc<LocalPipe>> {
        self.locals.get(usize::from(h.0)).and_then(Option::as_ref)
    }

    /// Admission is relay-proto's rule, the same on every device.
    fn admit(
        &self,
        from: &UserId,
        service: &ServiceName,
    ) -> Result<crate::cli::ServiceSpec, RejectReason> {
        let exposed = self.exposed.as_ref().ok_or(RejectReason::Busy)?;
        let names: Vec<&str> = exposed.services.iter().map(|s| s.name.as_str()).collect();
        let allow: Vec<&str> = exposed.allow.iter().map(String::as_str).collect();
        let i = terminal::admit(from, service, &names, &allow)?;
        exposed
            .services
            .get(i)
            .cloned()
            .ok_or(RejectReason::UnknownService)
    }

    /// A late answer to a notice on `h` is void from now on.
    fn forget_notice(&mut self, h: Handle) {
        if let Some(n) = self.notices.get_mut(usize::from(h.0)) {
            *n = 0;
        }
    }

    fn fail_demand(&mut self, h: Handle, message: String) {
        self.end(h);
        if let Some((reply, _)) = self.waiters.remove(&h.0) {
            let _ = reply.send(Err(message));
        }
    }
}

/// Ends a local end: its writer writes what is left, then reports the reason.
fn finish(pipe: &LocalPipe) {
    pipe.lock().done = true;
    pipe.sink.notify_one();
    pipe.source.notify_one();
}

impl Service for HostService {
    fn on_notice(&mut self, h: Handle, from: &UserId, service: &ServiceName) -> Decision {
        let spec = match self.admit(from, service) {
            Ok(spec) => spec,
            Err(reason) => {
                tracing::info!(%from, service = service.as_str(), "rejected: {reason}");
                return Decision::Reject(reason);
            }
        };
        // Reach the local service first: if it is down the requester hears so
        // (ServiceUnavailable) rather than getting a session that ends at once.
        self.next_notice += 1;
        let notice = self.next_notice;
        if let Some(n) = self.notices.get_mut(usize::from(h.0)) {
            *n = notice;
        }
        let cmds = self.cmds.clone();
        let from = from.clone();
        tokio::spawn(async move {
            let connect = TcpStream::connect(&spec.addr);
            let local = match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("service '{}' unreachable: {e}", spec.name)),
                Err(_) => Err(format!("service '{}' did not answer", spec.name)),
            };
            let _ = cmds.send(Cmd::Answer(Answer {
                handle: h,
                notice,
                from,
                name: spec.name,
                addr: spec.addr,
                local,
            }));
        });
        Decision::Defer
    }

    fn on_open(&mut self, s: &mut Session<'_>) {
        if let Some((reply, ended)) = self.waiters.remove(&s.handle().0) {
            let _ = reply.send(Ok(ended));
        }
    }

    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        let Some(pipe) = self.local(s.handle()) else {
            return data.len();
        };
        let mut st = pipe.lock();
        if st.broken {
            drop(st);
            s.terminate();
            return data.len();
        }
        let n = LOCAL_BUF.saturating_sub(st.out.len()).min(data.len());
        st.out.extend_from_slice(&data[..n]);
        pipe.sink.notify_one();
        n
    }

    fn on_writable(&mut self, s: &mut Session<'_>) {
        let Some(pipe) = self.local(s.handle()) else {
            return;
        };
        let mut st = pipe.lock();
        let was_full = st.inp.len() >= LOCAL_BUF;
        while !st.inp.is_empty() {
            let n = s.write(&st.inp);
            if n == 0 {
                break;
            }
            st.inp.advance(n);
        }
        if was_full && st.inp.len() < LOCAL_BUF {
            pipe.source.notify_one();
        }
        // The local application went away or has no more: end our side.
        if st.broken || (st.inp_end && st.inp.is_empty()) {
            drop(st);
            s.terminate();
        }
    }

    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        // Half-close: the local end hears EOF once the peer's data is written; ours goes on.
        if let Some(pipe) = self.local(s.handle()) {
            pipe.lock().out_end = true;
            pipe.sink.notify_one();
        }
    }

    fn on_close(&mut self, h: Handle) {
        self.end(h);
    }

    fn on_event(&mut self, event: &Event) {
        let server = self.shared.server();
        match event {
            Event::Open(_) | Event::Notice { .. } | Event::PeerTerminated { .. } => {}
            Event::Closed { handle, cause } => {
                tracing::debug!(handle = handle.0, ?cause, "relay connection closed");
                // The relay's own reason (an operator's kick, a shutdown) is worth a line.
                if let terminal::Cause::Relay(code) = cause {
                    tracing::warn!(%server, "the relay closed a connection: {code} ({code:?})");
                }
                self.forget_notice(*handle);
                let lost = "the relay connection closed before the demand was answered";
                self.fail_demand(*handle, lost.into());
            }
            Event::LoggedIn => {
                tracing::info!(%server, "logged in to the relay");
                self.logged_in = true;
                let _ = self.shared.app.send(AppEvent::LoggedIn);
            }
            Event::Down if self.shared.stopping() => {}
            Event::Down => {
                tracing::warn!(%server, "lost the relay; reconnecting with back-off");
                let _ = self.shared.app.send(AppEvent::Down);
            }
            Event::Throttled { text, .. } => {
                let _ = self.shared.app.send(AppEvent::Throttled(format!(
                    "the relay refused the login: {} (Throttled)",
                    text.as_str()
                )));
            }
            Event::LoginRefused { code, text } => {
                let _ = self.shared.app.send(AppEvent::Fatal(format!(
                    "the relay refused the login: {} ({code:?})",
                    text.as_str()
                )));
            }
            Event::Redirected { handle, to } => {
                tracing::info!(handle = handle.0, node = %to.address, "demand redirected to another relay node");
            }
            Event::Accepted { handle, peer, .. } => {
                tracing::info!(handle = handle.0, %peer, "session accepted");
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
                // The connection stays with the terminal (idle again): the local end
                // waiting for the session goes, so its socket closes now.
                self.fail_demand(*handle, message);
            }
            Event::SessionEnded { handle, reason } => {
                // A notice withdrawn while its local connection was being made.
                self.forget_notice(*handle);
                if let Some(pipe) = self.local(*handle) {
                    pipe.lock().reason = Some(*reason);
                }
                if *reason != ReleaseReason::Normal {
                    tracing::warn!(handle = handle.0, ?reason, "session ended abnormally");
                }
            }
            Event::OnlinePage => self.page = true,
            Event::RelayError { handle, code, text } => {
                tracing::warn!(handle = handle.0, ?code, "relay error: {}", text.as_str())
            }
        }
    }
}

/// Relay → local: writes what the session received; shuts the write side when the peer
/// terminated; once the session is over, reports how it ended.
async fn write_local(shared: Arc<Shared>, pipe: Arc<LocalPipe>, mut sink: Sink) {
    let mut shut = false;
    loop {
        let (chunk, end, done) = {
            let mut st = pipe.lock();
            (st.out.split(), st.out_end, st.done)
        };
        if !chunk.is_empty() {
            // Flush too: stdout buffers (a no-op for TCP).
            if !shut && (sink.write_all(&chunk).await.is_err() || sink.flush().await.is_err()) {
                pipe.lock().broken = true;
                shut = true;
            }
            shared.wake.notify_one();
            continue;
        }
        if (end || done) && !shut {
            let _ = sink.flush().await;
            let _ = sink.shutdown().await;
            shut = true;
        }
        if done {
            let mut st = pipe.lock();
            if let (Some(reason), Some(tx)) = (st.reason, st.ended.take()) {
                let _ = tx.send(reason);
            }
            return;
        }
        pipe.sink.notified().await;
    }
}

/// Local → relay: reads the local end while its buffer has room, until EOF or the end of
/// the session.
async fn read_local(shared: Arc<Shared>, pipe: Arc<LocalPipe>, mut source: Source) {
    let mut buf = BytesMut::new();
    loop {
        let (done, full) = {
            let st = pipe.lock();
            (st.done, st.inp.len() >= LOCAL_BUF)
        };
        if done {
            return;
        }
        if full {
            pipe.source.notified().await;
            continue;
        }
        buf.reserve(CHUNK);
        let n = tokio::select! {
            r = source.read_buf(&mut buf) => r.unwrap_or(0),
            () = pipe.source.notified() => continue,
        };
        {
            let mut st = pipe.lock();
            if n == 0 {
                st.inp_end = true;
            } else {
                super::append(&mut st.inp, &mut buf);
            }
        }
        shared.wake.notify_one();
        if n == 0 {
            return;
        }
    }
}
