//! The agent: relay-proto's [`Terminal`] wired to a [`Transport`] and a [`Service`].
//!
//! All protocol decisions (login, spares, keep-alive, back-off, demand routing) are the
//! terminal's; the agent only moves bytes and events between it, the sockets and the
//! application, with fixed buffers: one carry buffer per connection for a frame split
//! across reads (and for payload the service could not take yet), and one transmit
//! scratch shared by all connections.

use relay_proto::codes::RejectReason;
use relay_proto::frame::{HEADER_LEN, MAX_CONTROL_FRAME};
use relay_proto::ident::{Password, ServiceName, Text, UserId};
use relay_proto::terminal::{
    Cause, Config, Event, Handle, MIN_TRANSMIT_BUF, Offer, SendError, Terminal,
};
use relay_proto::time::Instant;

use embedded_io::{Read, ReadReady};

use crate::log::{log_debug, log_warn};
use crate::service::{Decision, Out, Service, Session, SessionInfo};
use crate::transport::{LinkState, Transport, write_exact};

/// Carry buffer per connection: the largest control frame must fit, since the terminal
/// asks for more bytes (`NeedMore`) until a whole frame is there.
pub const RX_CARRY: usize = MAX_CONTROL_FRAME;

/// The smallest socket transmit buffer that works: control frames are written only when
/// this much space is free, so they never have to be split or held back half-written.
pub const MIN_SOCKET_TX: usize = MIN_TRANSMIT_BUF;

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
    /// Received bytes not yet used: the first `rx_payload` of them are session payload
    /// the terminal already accounted for, the rest are not yet offered to it.
    rx: [u8; RX_CARRY],
    rx_len: u16,
    rx_payload: u16,
    session: Option<SessionInfo>,
}

impl Link {
    const fn new() -> Self {
        Link {
            phase: Phase::Idle,
            rx: [0; RX_CARRY],
            rx_len: 0,
            rx_payload: 0,
            session: None,
        }
    }

    fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.rx_len = 0;
        self.rx_payload = 0;
    }

    /// Drops the first `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        let len = usize::from(self.rx_len);
        let n = n.min(len);
        self.rx.copy_within(n..len, 0);
        self.rx_len = (len - n) as u16;
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
        let h = self.terminal.demand(target.clone(), service.clone())?;
        if let Some(link) = self.links.get_mut(usize::from(h.0)) {
            link.session = Some(SessionInfo {
                id: 0,
                peer: target,
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

    /// The session on `h`, if one runs there.
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
                self.terminal.transport_closed(h, now);
            }
            _ => return,
        }
        self.drain(now, t, svc);
    }

    /// Reads what the slot has, feeds the terminal, hands payload to the service.
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
            // Payload first: it came before anything still in the buffer.
            if !self.deliver(slot, now, t, svc) {
                return;
            }
            // Offer the buffered bytes to the terminal, frame by frame.
            let mut need_more = false;
            while self.links[slot].phase == Phase::Open
                && self.links[slot].rx_len > 0
                && self.links[slot].rx_payload == 0
            {
                let link = &mut self.links[slot];
                let len = usize::from(link.rx_len);
                let offer = self.terminal.handle_input(h, now, &link.rx[..len]);
                match offer {
                    Offer::Consumed(n) => link.consume(n.max(1)),
                    Offer::Payload(n) => {
                        link.rx_payload = n.min(len) as u16;
                    }
                    Offer::NeedMore => need_more = true,
                }
                self.drain(now, t, svc);
                if need_more {
                    break;
                }
                if !self.deliver(slot, now, t, svc) {
                    return;
                }
            }
            let link = &mut self.links[slot];
            if link.phase != Phase::Open {
                return;
            }
            let len = usize::from(link.rx_len);
            if len == RX_CARRY {
                // A frame larger than any the protocol allows: the terminal would have
                // refused it, so this cannot happen; close rather than spin.
                log_warn!("relay: {:?} frame larger than the carry buffer", h);
                return self.fail(slot, now, t, svc);
            }
            let read = {
                let mut io = t.io(slot);
                match io.read_ready() {
                    Ok(true) => io.read(&mut link.rx[len..]).map_err(|_| ()),
                    Ok(false) => return,
                    Err(_) => Err(()),
                }
            };
            match read {
                Ok(n) if n > 0 => link.rx_len = (len + n.min(RX_CARRY - len)) as u16,
                // End of stream, or the stack failed: the connection is gone.
                _ => return self.fail(slot, now, t, svc),
            }
        }
    }

    /// Hands buffered payload to the service. Returns false when some is left (the
    /// service is full: stop reading) or the slot closed.
    fn deliver<T: Transport, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) -> bool {
        let Agent {
            terminal, links, ..
        } = self;
        let link = &mut links[slot];
        let pending = usize::from(link.rx_payload);
        if pending == 0 {
            return true;
        }
        let mut wire = Wire {
            terminal,
            transport: t,
            broken: false,
        };
        let used = match link.session.as_mut().filter(|s| s.open) {
            Some(info) => {
                let mut s = Session {
                    handle: Handle(slot as u8),
                    info,
                    out: &mut wire,
                };
                svc.on_data(&mut s, &link.rx[..pending]).min(pending)
            }
            // No session to take it (a stray after the service closed): drop it.
            None => pending,
        };
        let broken = wire.broken;
        link.consume(used);
        link.rx_payload = (pending - used) as u16;
        if broken {
            self.fail(slot, now, t, svc);
            return false;
        }
        used == pending
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
                    session,
                    from,
                    service,
                } => {
                    let slot = usize::from(handle.0);
                    match svc.on_notice(&from, &service) {
                        Decision::Accept if slot < N => {
                            if self.terminal.accept(handle, now).is_ok() {
                                self.links[slot].session = Some(SessionInfo {
                                    id: session,
                                    peer: from,
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
                Event::Accepted {
                    handle,
                    session,
                    peer,
                } => {
                    let slot = usize::from(handle.0);
                    if slot >= N {
                        continue;
                    }
                    let info = self.links[slot].session.get_or_insert(SessionInfo {
                        id: session,
                        peer: peer.clone(),
                        service: ServiceName::default(),
                        requester: true,
                        peer_ended: false,
                        ended: false,
                        open: false,
                    });
                    info.id = session;
                    info.peer = peer;
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
