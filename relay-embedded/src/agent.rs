//! The agent: relay-proto's [`Terminal`] wired to a [`Transport`] and a [`Service`].
//!
//! All protocol decisions (login, spares, keep-alive, back-off, demand routing) are the
//! terminal's; the agent only moves bytes and events between it, the sockets and the
//! application. It holds no receive buffer per connection: received bytes stay in the
//! socket until they are used ([`Transport::peek`], [`Transport::consume`]), so a frame
//! split across packets simply waits there, and payload the service cannot take yet is
//! backpressure in the socket's window. One scratch buffer, shared by all connections,
//! holds a control frame while it is decoded or encoded.

use relay_proto::codes::RejectReason;
use relay_proto::frame::HEADER_LEN;
use relay_proto::ident::{Password, ServiceName, Text, UserId};
use relay_proto::terminal::{
    Cause, Config, Event, Handle, MIN_TRANSMIT_BUF, Offer, SendError, Terminal,
};
use relay_proto::time::Instant;

use crate::log::{log_debug, log_warn};
use crate::service::{Decision, Out, Service, Session, SessionInfo};
use crate::transport::{LinkState, Transport, write_exact};

/// The smallest socket transmit buffer that works: control frames are written only when
/// this much space is free, so they never have to be split or held back half-written.
pub const MIN_SOCKET_TX: usize = MIN_TRANSMIT_BUF;

/// The smallest socket receive buffer that works: a whole control frame must fit, since
/// the terminal decodes a frame only once all of it has arrived.
pub const MIN_SOCKET_RX: usize = relay_proto::frame::MAX_CONTROL_FRAME;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection on this slot.
    Idle,
    /// The transport is connecting.
    Opening,
    /// Connected and handed to the terminal.
    Open,
}

/// One connection slot's glue state.
#[derive(Debug)]
struct Link {
    phase: Phase,
    /// The first `payload` bytes still in the socket are session payload the terminal
    /// already accounted for: they go to the service, never to the terminal again.
    payload: u16,
    session: Option<SessionInfo>,
}

impl Link {
    const fn new() -> Self {
        Link {
            phase: Phase::Idle,
            payload: 0,
            session: None,
        }
    }

    fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.payload = 0;
    }
}

/// A device's connections to one relay: `N` connections (`N` socket slots in the
/// transport), `E` the terminal's event queue (at least `2N + 2`).
///
/// Call [`Agent::poll`] after every `Interface::poll` (or whenever a socket may have
/// changed) and at the latest at the instant it returns.
#[derive(Debug)]
pub struct Agent<const N: usize, const E: usize = 16> {
    terminal: Terminal<N, E>,
    links: [Link; N],
    /// A control frame being decoded or encoded, or payload on its way to the service;
    /// shared, since the agent handles one connection at a time.
    scratch: [u8; MIN_TRANSMIT_BUF],
}

/// Session output over the terminal and the transport (see [`Out`]).
struct Wire<'x, T: Transport, const N: usize, const E: usize> {
    terminal: &'x mut Terminal<N, E>,
    transport: &'x mut T,
    /// A write failed half-way: the stream is corrupt and the slot must close.
    broken: bool,
}

impl<T: Transport, const N: usize, const E: usize> Out for Wire<'_, T, N, E> {
    fn space(&mut self, h: Handle) -> usize {
        if self.terminal.has_output(h) {
            return 0;
        }
        self.transport
            .send_space(usize::from(h.0))
            .saturating_sub(HEADER_LEN)
            .min(self.terminal.max_payload())
    }

    fn write(&mut self, h: Handle, data: &[u8]) -> usize {
        let n = data.len().min(self.space(h));
        if n == 0 || self.broken {
            return 0;
        }
        let Ok(header) = self.terminal.send_data(h, n) else {
            return 0;
        };
        let mut io = self.transport.io(usize::from(h.0));
        let ok = write_exact(&mut io, &header).is_ok()
            && data
                .get(..n)
                .is_some_and(|payload| write_exact(&mut io, payload).is_ok());
        if ok {
            n
        } else {
            self.broken = true;
            0
        }
    }

    fn terminate(&mut self, h: Handle) -> bool {
        self.terminal.terminate(h).is_ok()
    }

    fn session(&self, h: Handle) -> Option<(u32, &UserId)> {
        self.terminal.session(h)
    }
}

impl<const N: usize, const E: usize> Agent<N, E> {
    /// An agent that logs in as `user`. `seed` drives keep-alive and back-off jitter:
    /// give each device its own (from the RNG peripheral or a unique ID).
    pub fn new(config: Config, user: UserId, password: Password, seed: u64) -> Self {
        Agent {
            terminal: Terminal::new(config, user, password, seed),
            links: [const { Link::new() }; N],
            scratch: [0; MIN_TRANSMIT_BUF],
        }
    }

    /// Starts connecting (and reconnecting, from now on). The first `poll` opens sockets.
    pub fn start(&mut self, now: Instant) {
        self.terminal.start(now);
    }

    /// Logs out: LOGOUT on one connection, the others close; no reconnects until `start`.
    pub fn logout(&mut self, now: Instant) {
        self.terminal.logout(now);
    }

    /// Asks the relay for a session with `target`. The session is served by the same
    /// [`Service`] (`on_open` with `requester: true`), or the demand fails with an
    /// [`Event::DemandFailed`] through [`Service::on_event`].
    pub fn demand(&mut self, target: UserId, service: ServiceName) -> Result<Handle, SendError> {
        let h = self.terminal.demand(target, service.clone())?;
        if let Some(link) = self.links.get_mut(usize::from(h.0)) {
            link.session = Some(SessionInfo {
                service,
                requester: true,
                peer_ended: false,
                ended: false,
                open: false,
            });
        }
        Ok(h)
    }

    /// Whether at least one connection is logged in (the device is reachable).
    pub fn is_up(&self) -> bool {
        self.terminal.is_up()
    }

    /// The protocol state machine, for what the agent does not wrap (online list, ...).
    pub fn terminal(&self) -> &Terminal<N, E> {
        &self.terminal
    }

    pub fn terminal_mut(&mut self) -> &mut Terminal<N, E> {
        &mut self.terminal
    }

    /// The session on `h`, if one runs there. Its relay session number and peer are the
    /// terminal's: [`Terminal::session`].
    pub fn session(&self, h: Handle) -> Option<&SessionInfo> {
        self.links
            .get(usize::from(h.0))
            .and_then(|l| l.session.as_ref())
            .filter(|s| s.open)
    }

    /// Does all pending work: socket state changes, received bytes, timers, service
    /// output, control frames. Returns when the agent next needs a poll even if no
    /// packet arrives (`None`: only when a packet arrives).
    pub fn poll<T: Transport, S: Service>(
        &mut self,
        now: Instant,
        transport: &mut T,
        service: &mut S,
    ) -> Option<Instant> {
        self.drain(now, transport, service);
        for slot in 0..N {
            self.check_link(slot, now, transport, service);
            self.receive(slot, now, transport, service);
        }
        if self.terminal.poll_timeout().is_some_and(|t| t <= now) {
            self.terminal.handle_timeout(now);
            self.drain(now, transport, service);
        }
        for slot in 0..N {
            self.transmit(slot, now, transport, service);
            self.writable(slot, now, transport, service);
            self.transmit(slot, now, transport, service);
        }
        self.terminal.poll_timeout()
    }

    /// Follows the transport's state: connection up, connect failed, connection lost.
    fn check_link<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        let h = Handle(slot as u8);
        match (self.links[slot].phase, t.state(slot)) {
            (Phase::Opening, LinkState::Open) => {
                log_debug!("relay: {:?} connected", h);
                self.links[slot].phase = Phase::Open;
                self.terminal.connected(h, now);
            }
            (Phase::Opening, LinkState::Closed) => {
                log_debug!("relay: {:?} connect failed", h);
                self.terminal.connect_failed(h, now);
            }
            (Phase::Open, LinkState::Closed) => {
                log_debug!("relay: {:?} transport closed", h);
                // What the relay sent before closing still counts (a last ERROR frame
                // says why); a frame it never finished does not hold the slot open.
                self.receive(slot, now, t, svc);
                if self.links[slot].phase == Phase::Open {
                    self.terminal.transport_closed(h, now);
                }
            }
            _ => return,
        }
        self.drain(now, t, svc);
    }

    /// Offers what the slot received to the terminal, frame by frame, and hands payload
    /// to the service. Bytes are consumed from the socket only once used.
    fn receive<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        let h = Handle(slot as u8);
        loop {
            if self.links[slot].phase != Phase::Open {
                return;
            }
            // Payload first: it came before anything after it in the stream.
            if self.links[slot].payload > 0 {
                if !self.deliver(slot, now, t, svc) {
                    return;
                }
                continue;
            }
            let n = match t.peek(slot, &mut self.scratch) {
                Ok(0) => return,
                Ok(n) => n.min(self.scratch.len()),
                // The relay closed and every byte was used, or the stack failed.
                Err(_) => return self.fail(slot, now, t, svc),
            };
            let bytes = self.scratch.get(..n).unwrap_or(&[]);
            match self.terminal.handle_input(h, now, bytes) {
                Offer::Consumed(used) => t.consume(slot, used.clamp(1, n)),
                Offer::Payload(len) => self.links[slot].payload = len.min(n) as u16,
                Offer::NeedMore if n == self.scratch.len() => {
                    // A frame larger than any the protocol allows: the terminal would have
                    // refused it, so this cannot happen; close rather than spin.
                    log_warn!("relay: {:?} frame larger than the scratch buffer", h);
                    return self.fail(slot, now, t, svc);
                }
                // The rest of the frame is still on its way: it waits in the socket.
                Offer::NeedMore => return self.drain(now, t, svc),
            }
            self.drain(now, t, svc);
        }
    }

    /// Hands accounted payload to the service, as much as the scratch holds at a time.
    /// Returns false when some is left (the service is full: stop reading, the socket's
    /// window pushes back) or the slot closed.
    fn deliver<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) -> bool {
        let Agent {
            terminal,
            links,
            scratch,
        } = self;
        let link = &mut links[slot];
        let pending = usize::from(link.payload).min(scratch.len());
        let available = match t.peek(slot, scratch.get_mut(..pending).unwrap_or_default()) {
            Ok(n) => n.min(pending),
            Err(_) => {
                self.fail(slot, now, t, svc);
                return false;
            }
        };
        if available == 0 {
            return false;
        }
        let mut wire = Wire {
            terminal,
            transport: t,
            broken: false,
        };
        let data = scratch.get(..available).unwrap_or(&[]);
        let used = match link.session.as_mut().filter(|s| s.open) {
            Some(info) => {
                let mut s = Session {
                    handle: Handle(slot as u8),
                    info,
                    out: &mut wire,
                };
                svc.on_data(&mut s, data).min(available)
            }
            // No session to take it (a stray after the service closed): drop it.
            None => available,
        };
        let broken = wire.broken;
        t.consume(slot, used);
        link.payload -= used as u16;
        if broken {
            self.fail(slot, now, t, svc);
            return false;
        }
        used == available
    }

    /// Lets the service write on a running session.
    fn writable<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        let Agent {
            terminal, links, ..
        } = self;
        let link = &mut links[slot];
        if link.phase != Phase::Open {
            return;
        }
        let Some(info) = link.session.as_mut().filter(|s| s.open && !s.ended) else {
            return;
        };
        let mut wire = Wire {
            terminal,
            transport: t,
            broken: false,
        };
        let mut s = Session {
            handle: Handle(slot as u8),
            info,
            out: &mut wire,
        };
        svc.on_writable(&mut s);
        if wire.broken {
            self.fail(slot, now, t, svc);
        }
    }

    /// Writes the slot's pending control frames when the socket has room for any.
    fn transmit<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        let h = Handle(slot as u8);
        if self.links[slot].phase != Phase::Open
            || !self.terminal.has_output(h)
            || t.send_space(slot) < MIN_TRANSMIT_BUF
        {
            return;
        }
        match self.terminal.poll_transmit(h, now, &mut self.scratch) {
            Ok(0) | Err(_) => {}
            Ok(n) => {
                let bytes = self.scratch.get(..n).unwrap_or(&[]);
                if write_exact(&mut t.io(slot), bytes).is_err() {
                    return self.fail(slot, now, t, svc);
                }
            }
        }
        // After LOGOUT the terminal finishes the slot here.
        self.drain(now, t, svc);
    }

    /// The transport misbehaved (read or write error, EOF): the terminal closes the slot.
    fn fail<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        self.terminal.transport_closed(Handle(slot as u8), now);
        self.drain(now, t, svc);
    }

    fn open_session<T: Transport, S: Service>(&mut self, slot: usize, t: &mut T, svc: &mut S) {
        let Agent {
            terminal, links, ..
        } = self;
        let Some(info) = links[slot].session.as_mut() else {
            return;
        };
        info.open = true;
        let mut wire = Wire {
            terminal,
            transport: t,
            broken: false,
        };
        let mut s = Session {
            handle: Handle(slot as u8),
            info,
            out: &mut wire,
        };
        svc.on_open(&mut s);
    }

    fn close_session<S: Service>(&mut self, slot: usize, svc: &mut S) {
        if self.links[slot]
            .session
            .take()
            .is_some_and(|info| info.open)
        {
            svc.on_close(Handle(slot as u8));
        }
    }

    /// Acts on every queued terminal event.
    fn drain<T: Transport, S: Service>(&mut self, now: Instant, t: &mut T, svc: &mut S) {
        while let Some(event) = self.terminal.poll_event() {
            log_debug!("relay: {:?}", event);
            svc.on_event(&event);
            match event {
                Event::Open(h) => {
                    let slot = usize::from(h.0);
                    if slot >= N {
                        continue;
                    }
                    self.links[slot].reset();
                    if t.open(slot).is_ok() {
                        self.links[slot].phase = Phase::Opening;
                    } else {
                        self.terminal.connect_failed(h, now);
                    }
                }
                Event::Closed { handle, cause } => {
                    let slot = usize::from(handle.0);
                    if slot >= N {
                        continue;
                    }
                    self.close_session(slot, svc);
                    if self.links[slot].phase != Phase::Idle {
                        t.close(slot, cause == Cause::Local);
                    }
                    self.links[slot].reset();
                }
                Event::Notice {
                    handle,
                    from,
                    service,
                    ..
                } => {
                    let slot = usize::from(handle.0);
                    match svc.on_notice(&from, &service) {
                        Decision::Accept if slot < N => {
                            if self.terminal.accept(handle, now).is_ok() {
                                self.links[slot].session = Some(SessionInfo {
                                    service,
                                    requester: false,
                                    peer_ended: false,
                                    ended: false,
                                    open: false,
                                });
                                self.open_session(slot, t, svc);
                            }
                        }
                        Decision::Accept => {}
                        Decision::Reject(reason) => {
                            let _ = self.terminal.reject(handle, reason, reject_text(reason));
                        }
                    }
                }
                Event::Accepted { handle, .. } => {
                    let slot = usize::from(handle.0);
                    if slot >= N {
                        continue;
                    }
                    // A demand made through the terminal directly has no record yet.
                    self.links[slot].session.get_or_insert(SessionInfo {
                        service: ServiceName::default(),
                        requester: true,
                        peer_ended: false,
                        ended: false,
                        open: false,
                    });
                    self.open_session(slot, t, svc);
                }
                Event::DemandFailed { handle, .. } => {
                    if let Some(link) = self.links.get_mut(usize::from(handle.0)) {
                        link.session = None;
                    }
                }
                Event::PeerTerminated { handle } => {
                    let slot = usize::from(handle.0);
                    let Agent {
                        terminal, links, ..
                    } = self;
                    let Some(info) = links
                        .get_mut(slot)
                        .and_then(|l| l.session.as_mut())
                        .filter(|s| s.open)
                    else {
                        continue;
                    };
                    info.peer_ended = true;
                    let mut wire = Wire {
                        terminal,
                        transport: t,
                        broken: false,
                    };
                    let mut s = Session {
                        handle,
                        info,
                        out: &mut wire,
                    };
                    svc.on_peer_end(&mut s);
                    if wire.broken {
                        self.terminal.transport_closed(handle, now);
                    }
                }
                Event::SessionEnded { handle, .. } => {
                    let slot = usize::from(handle.0);
                    if slot < N {
                        self.close_session(slot, svc);
                    }
                }
                Event::LoggedIn
                | Event::Down
                | Event::LoginRefused { .. }
                | Event::Throttled { .. }
                | Event::OnlinePage
                | Event::RelayError { .. } => {}
            }
        }
    }
}

/// A short reason text; the code is what programs act on.
fn reject_text(reason: RejectReason) -> Text {
    Text::lossy(match reason {
        RejectReason::UnknownService => "no such service",
        RejectReason::NotAllowed => "not allowed",
        RejectReason::Busy => "busy",
        RejectReason::ServiceUnavailable => "service unavailable",
        RejectReason::Other => "rejected",
    })
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::convert::Infallible as Never;
    use relay_proto::codes::ErrorCode;
    use relay_proto::frame::{self, Frame, LoginOk, Notice};
    use relay_proto::ident::ResumeToken;
    use std::vec::Vec;

    /// One slot whose received bytes become visible `step` at a time, so every frame is
    /// split at every boundary; it records what the agent consumes and sends.
    #[derive(Default)]
    struct Trickle {
        rx: Vec<u8>,
        visible: usize,
        consumed: usize,
        tx: Vec<u8>,
        open: bool,
        /// The relay closed its side after `rx`.
        fin: bool,
        closes: usize,
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

    impl Transport for Trickle {
        type Error = Never;
        type Io<'a> = Sink<'a>;

        fn open(&mut self, _: usize) -> Result<(), Never> {
            self.open = true;
            Ok(())
        }
        fn state(&mut self, _: usize) -> LinkState {
            if self.open && !self.fin {
                LinkState::Open
            } else {
                LinkState::Closed
            }
        }
        fn peek(&mut self, _: usize, buf: &mut [u8]) -> Result<usize, Never> {
            let avail = &self.rx[self.consumed..self.visible];
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            Ok(n)
        }
        fn consume(&mut self, _: usize, n: usize) {
            assert!(
                self.consumed + n <= self.visible,
                "consumed bytes never peeked"
            );
            self.consumed += n;
        }
        fn io(&mut self, _: usize) -> Sink<'_> {
            Sink(&mut self.tx)
        }
        fn send_space(&mut self, _: usize) -> usize {
            4096
        }
        fn close(&mut self, _: usize, _: bool) {
            self.open = false;
            self.closes += 1;
        }
    }

    /// Takes at most two payload bytes per call, so payload waits in the "socket".
    #[derive(Default)]
    struct Slow {
        got: Vec<u8>,
        notices: usize,
        peer_ended: bool,
        closed: Vec<Cause>,
        /// The session as the service saw it when data arrived.
        seen: Option<(u32, UserId)>,
    }

    impl Service for Slow {
        fn on_notice(&mut self, _: &UserId, _: &ServiceName) -> Decision {
            self.notices += 1;
            Decision::Accept
        }
        fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
            self.seen = s.id().zip(s.peer().cloned());
            let n = data.len().min(2);
            self.got.extend_from_slice(&data[..n]);
            n
        }
        fn on_peer_end(&mut self, _: &mut Session<'_>) {
            self.peer_ended = true;
        }
        fn on_event(&mut self, e: &Event) {
            if let Event::Closed { cause, .. } = e {
                self.closed.push(cause.clone());
            }
        }
    }

    fn login_ok(rx: &mut Vec<u8>) {
        encode(
            Frame::LoginOk(LoginOk {
                caps: 3,
                keepalive_ms: 30_000,
                max_payload: 1024,
                token: ResumeToken::from_slice(&[7; 48]).unwrap(),
            }),
            rx,
        );
    }

    /// An agent with one connection (one spare) that has opened it and sent its LOGIN;
    /// the relay's bytes `rx` are all queued, none visible yet.
    fn logging_in(rx: Vec<u8>) -> (Agent<1, 4>, Trickle, Slow, Instant) {
        let config = Config {
            spare: 1,
            ..Config::default()
        };
        let mut agent = Agent::new(
            config,
            UserId::new("cam").unwrap(),
            Password::new("pw").unwrap(),
            1,
        );
        let mut t = Trickle {
            rx,
            ..Trickle::default()
        };
        let mut svc = Slow::default();
        let now = Instant::from_millis(1);
        agent.start(now);
        agent.poll(now, &mut t, &mut svc);
        agent.poll(now, &mut t, &mut svc);
        (agent, t, svc, now)
    }

    /// An agent with one connection that has sent its LOGIN; then all of `rx` arrives
    /// at once, with `fin` followed by the relay closing its side, and the agent polls.
    fn run(rx: Vec<u8>, fin: bool) -> (Trickle, Slow) {
        let (mut agent, mut t, mut svc, now) = logging_in(rx);
        t.visible = t.rx.len();
        t.fin = fin;
        agent.poll(now, &mut t, &mut svc);
        (t, svc)
    }

    #[test]
    fn a_last_error_before_the_relay_closes_is_read() {
        let mut rx = Vec::new();
        login_ok(&mut rx);
        encode(
            Frame::Error {
                code: ErrorCode::ShuttingDown,
                text: Text::lossy("bye"),
                retry_after: None,
            },
            &mut rx,
        );
        let (t, svc) = run(rx, true);
        assert_eq!(svc.closed, [Cause::Relay(ErrorCode::ShuttingDown)]);
        assert_eq!((t.consumed, t.closes), (t.rx.len(), 1));
    }

    #[test]
    fn a_frame_the_relay_never_finished_does_not_hold_the_slot() {
        let mut rx = Vec::new();
        login_ok(&mut rx);
        let mut notice = Vec::new();
        encode(
            Frame::Notice(Notice {
                session: 1,
                from: UserId::new("alice").unwrap(),
                service: ServiceName::new("echo").unwrap(),
            }),
            &mut notice,
        );
        rx.extend_from_slice(&notice[..notice.len() / 2]);
        let (t, svc) = run(rx.clone(), false);
        assert!(
            svc.closed.is_empty(),
            "waits for the rest while the stream is open"
        );
        assert_eq!(t.closes, 0);
        let (t, svc) = run(rx, true);
        assert_eq!(svc.closed, [Cause::Transport]);
        assert_eq!(t.closes, 1);
    }

    fn encode(f: Frame, out: &mut Vec<u8>) {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut buf).unwrap();
        out.extend_from_slice(&buf[..n]);
    }

    #[test]
    fn split_frames_wait_in_the_socket_and_payload_is_delivered_exactly_once() {
        let payload = b"hello, relay: payload longer than a poll takes";
        let mut rx = Vec::new();
        login_ok(&mut rx);
        encode(
            Frame::Notice(Notice {
                session: 9,
                from: UserId::new("alice").unwrap(),
                service: ServiceName::new("echo").unwrap(),
            }),
            &mut rx,
        );
        rx.extend_from_slice(&frame::data_header(payload.len()).unwrap());
        rx.extend_from_slice(payload);
        encode(Frame::Terminate, &mut rx);

        for step in [1, 2, 3, 5, 64] {
            let (mut agent, mut t, mut svc, now) = logging_in(rx.clone());
            assert!(t.tx.starts_with(&[0x01]), "LOGIN first, step {step}");
            while t.visible < t.rx.len() {
                t.visible = (t.visible + step).min(t.rx.len());
                for _ in 0..4 {
                    agent.poll(now, &mut t, &mut svc);
                }
            }
            for _ in 0..payload.len() {
                agent.poll(now, &mut t, &mut svc);
            }
            assert!(agent.is_up(), "step {step}");
            assert_eq!(svc.notices, 1, "step {step}");
            assert_eq!(svc.got, payload, "step {step}");
            assert_eq!(svc.seen, Some((9, UserId::new("alice").unwrap())));
            assert!(svc.peer_ended, "step {step}");
            assert_eq!(t.consumed, t.rx.len(), "step {step}");
            // ACCEPT followed the LOGIN.
            assert!(t.tx.windows(2).any(|w| w == [0x09, 0]), "step {step}");
        }
    }
}
