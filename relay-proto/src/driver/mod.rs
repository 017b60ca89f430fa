//! The terminal driver: a [`Terminal`] wired to a non-blocking [`Link`] (the sockets)
//! and a [`Service`] (the application), written once for every binding
//! (relay-embedded's agent runs it over smoltcp, the simulation over its pipes,
//! relay-host's `expose` and `connect` over tokio sockets).
//!
//! All protocol decisions (login, spares, keep-alive, back-off, demand routing) are the
//! terminal's; the driver only moves bytes and events between it, the sockets and the
//! application. It holds no receive buffer per connection: received bytes stay in the
//! socket until they are used ([`Link::peek`], [`Link::consume`]), so a frame split
//! across packets simply waits there, and payload the service cannot take yet is
//! backpressure in the socket's window. One scratch buffer, shared by all connections,
//! holds a control frame while it is decoded or encoded, and payload on its way to the
//! service: its size `B` is how much payload one hand-over moves. A device keeps the
//! minimum (a control frame's worth, RAM is dear); a host gives it tens of KiB, since
//! every hand-over costs a peek, a service call and a consume.

mod link;
mod service;

pub use link::{Link, LinkError, LinkState, Target};
pub use service::{Decision, Echo, Service, Session, SessionInfo};

use crate::codes::RejectReason;
use crate::frame::HEADER_LEN;
use crate::ident::{Password, ServiceName, UserId};
use crate::terminal::{Cause, Config, Event, Handle, MIN_TRANSMIT_BUF, Offer, SendError, Terminal};
use crate::time::Instant;

use service::Out;

/// The smallest socket transmit buffer that works: control frames are written only when
/// this much space is free, so they never have to be split or held back half-written.
pub const MIN_SOCKET_TX: usize = MIN_TRANSMIT_BUF;

/// The smallest socket receive buffer that works: a whole control frame must fit, since
/// the terminal decodes a frame only once all of it has arrived.
pub const MIN_SOCKET_RX: usize = crate::frame::MAX_CONTROL_FRAME;

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
struct Slot {
    phase: Phase,
    /// The first `payload` bytes still in the socket are session payload the terminal
    /// already accounted for: they go to the service, never to the terminal again.
    payload: u16,
    session: Option<SessionInfo>,
}

impl Slot {
    const fn new() -> Self {
        Slot {
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
/// transport).
///
/// Call [`Driver::poll`] after every `Interface::poll` (or whenever a socket may have
/// changed) and at the latest at the instant it returns.
///
/// `B` is the scratch buffer's size, at least [`MIN_TRANSMIT_BUF`] (checked when the
/// driver is made): control frames use that much of it, payload all of it.
#[derive(Debug)]
pub struct Driver<const N: usize, const B: usize = MIN_TRANSMIT_BUF> {
    terminal: Terminal<N>,
    links: [Slot; N],
    /// A control frame being decoded or encoded, or payload on its way to the service;
    /// shared, since the driver handles one connection at a time.
    scratch: [u8; B],
}

/// Session output over the terminal and the transport (see [`Out`]).
struct Wire<'x, T: Link, const N: usize> {
    terminal: &'x mut Terminal<N>,
    transport: &'x mut T,
    /// A write failed half-way: the stream is corrupt and the slot must close.
    broken: bool,
}

impl<T: Link, const N: usize> Out for Wire<'_, T, N> {
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
        let slot = usize::from(h.0);
        let ok = self.transport.write(slot, &header).is_ok()
            && data
                .get(..n)
                .is_some_and(|payload| self.transport.write(slot, payload).is_ok());
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

impl<const N: usize, const B: usize> Driver<N, B> {
    /// A scratch buffer too small for a control frame does not build.
    const SCRATCH_HOLDS_A_CONTROL_FRAME: () = assert!(B >= MIN_TRANSMIT_BUF);

    /// A driver that logs in as `user`. `seed` drives keep-alive and back-off jitter:
    /// give each device its own (from the RNG peripheral or a unique ID).
    pub fn new(config: Config, user: UserId, password: Password, seed: u64) -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::SCRATCH_HOLDS_A_CONTROL_FRAME;
        Driver {
            terminal: Terminal::new(config, user, password, seed),
            links: [const { Slot::new() }; N],
            scratch: [0; B],
        }
    }

    /// The part of the scratch buffer a control frame uses: peeking more for a frame
    /// header would copy payload that [`Driver::deliver`] copies again, and more output
    /// than that would not fit the room [`Driver::transmit`] checks for.
    fn control(scratch: &mut [u8; B]) -> &mut [u8] {
        scratch.get_mut(..MIN_TRANSMIT_BUF).unwrap_or_default()
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
    pub fn demand(
        &mut self,
        target: UserId,
        service: ServiceName,
        now: Instant,
    ) -> Result<Handle, SendError> {
        let h = self.terminal.demand(target, service.clone(), now)?;
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

    /// The protocol state machine, for what the driver does not wrap (online list, ...).
    pub fn terminal(&self) -> &Terminal<N> {
        &self.terminal
    }

    pub fn terminal_mut(&mut self) -> &mut Terminal<N> {
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
    /// output, control frames. Returns when the driver next needs a poll even if no
    /// packet arrives (`None`: only when a packet arrives).
    pub fn poll<T: Link, S: Service>(
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
            for slot in 0..N {
                self.unlink_held(slot, transport);
            }
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
    fn check_link<T: Link, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) {
        let h = Handle(slot as u8);
        match (self.links[slot].phase, t.state(slot)) {
            (Phase::Opening, LinkState::Open) => {
                self.links[slot].phase = Phase::Open;
                self.terminal.connected(h, now);
            }
            (Phase::Opening, LinkState::Closed) => {
                self.terminal.connect_failed(h, now);
            }
            (Phase::Open, LinkState::Closed) => {
                // What the relay sent before closing still counts (a last ERROR frame
                // says why); a frame it never finished does not hold the slot open.
                self.receive(slot, now, t, svc);
                if self.links[slot].phase == Phase::Open {
                    self.terminal.transport_closed(h, now);
                }
            }
            _ => return,
        }
        self.unlink_held(slot, t);
        self.drain(now, t, svc);
    }

    /// A connection the terminal holds for a waiting demand after it failed before its
    /// login: its transport goes now; the terminal opens the slot again after the
    /// back-off ([`Event::Open`] with no `Closed`).
    fn unlink_held<T: Link>(&mut self, slot: usize, t: &mut T) {
        if self.links[slot].phase != Phase::Idle && self.terminal.is_held(Handle(slot as u8)) {
            t.close(slot, false);
            self.links[slot].reset();
        }
    }

    /// Offers what the slot received to the terminal, frame by frame, and hands payload
    /// to the service. Bytes are consumed from the socket only once used.
    ///
    /// Events are drained once the slot's input is used up, if there was any, and
    /// whenever one holds the input back ([`Offer::Blocked`]: an event the terminal holds
    /// goes before any later frame), not after every frame: a drain looks at every slot,
    /// and a stream is mostly DATA frames, which make no events.
    fn receive<T: Link, S: Service>(&mut self, slot: usize, now: Instant, t: &mut T, svc: &mut S) {
        if self.receive_frames(slot, now, t, svc) {
            self.drain(now, t, svc);
        }
    }

    /// [`Driver::receive`] but the last drain. `true` if anything happened: bytes offered
    /// or delivered, or the slot failed.
    fn receive_frames<T: Link, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) -> bool {
        let h = Handle(slot as u8);
        let mut worked = false;
        loop {
            if self.links[slot].phase != Phase::Open {
                return worked;
            }
            // Payload first: it came before anything after it in the stream.
            if self.links[slot].payload > 0 {
                if !self.deliver(slot, now, t, svc) {
                    return true;
                }
                continue;
            }
            let n = match t.peek(slot, Self::control(&mut self.scratch)) {
                Ok(0) => return worked,
                Ok(n) => n.min(MIN_TRANSMIT_BUF),
                // The relay closed and every byte was used, or the stack failed.
                Err(_) => {
                    self.fail(slot, now, t, svc);
                    return true;
                }
            };
            worked = true;
            let bytes = self.scratch.get(..n).unwrap_or(&[]);
            let offer = self.terminal.handle_input(h, now, bytes);
            // A refused login may leave the slot held for a waiting demand.
            self.unlink_held(slot, t);
            if self.links[slot].phase != Phase::Open {
                return true;
            }
            match offer {
                Offer::Consumed(used) => t.consume(slot, used.clamp(1, n)),
                Offer::Payload(len) => self.links[slot].payload = len.min(n) as u16,
                Offer::NeedMore if n == MIN_TRANSMIT_BUF => {
                    // A frame larger than any the protocol allows: the terminal would have
                    // refused it, so this cannot happen; close rather than spin.
                    self.fail(slot, now, t, svc);
                    return true;
                }
                // The rest of the frame is still on its way: it waits in the socket.
                Offer::NeedMore => return true,
                // The event first; then the same bytes again.
                Offer::Blocked => self.drain(now, t, svc),
            }
        }
    }

    /// Hands accounted payload to the service, as much as the scratch holds at a time.
    /// Returns false when some is left (the service is full: stop reading, the socket's
    /// window pushes back) or the slot closed.
    fn deliver<T: Link, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) -> bool {
        let Driver {
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
    fn writable<T: Link, S: Service>(&mut self, slot: usize, now: Instant, t: &mut T, svc: &mut S) {
        let Driver {
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
    fn transmit<T: Link, S: Service>(&mut self, slot: usize, now: Instant, t: &mut T, svc: &mut S) {
        let h = Handle(slot as u8);
        if self.links[slot].phase != Phase::Open
            || !self.terminal.has_output(h)
            || t.send_space(slot) < MIN_TRANSMIT_BUF
        {
            return;
        }
        match self
            .terminal
            .poll_transmit(h, now, Self::control(&mut self.scratch))
        {
            Ok(0) | Err(_) => {}
            Ok(n) => {
                let bytes = self.scratch.get(..n).unwrap_or(&[]);
                if t.write(slot, bytes).is_err() {
                    return self.fail(slot, now, t, svc);
                }
            }
        }
        // After LOGOUT the terminal finishes the slot here.
        self.drain(now, t, svc);
    }

    /// The transport misbehaved (read or write error, EOF): the terminal closes the slot.
    fn fail<T: Link, S: Service>(&mut self, slot: usize, now: Instant, t: &mut T, svc: &mut S) {
        self.terminal.transport_closed(Handle(slot as u8), now);
        self.unlink_held(slot, t);
        self.drain(now, t, svc);
    }

    /// Answers the notice the service deferred on `h` ([`Decision::Defer`]): `Ok` accepts
    /// (the session opens, [`Service::on_open`]), `Err` rejects with that reason.
    /// [`SendError::NoNotice`] when none waits there any more (the relay withdrew it).
    pub fn answer<T: Link, S: Service>(
        &mut self,
        h: Handle,
        answer: Result<(), RejectReason>,
        now: Instant,
        transport: &mut T,
        service: &mut S,
    ) -> Result<(), SendError> {
        let slot = usize::from(h.0);
        let link = self.links.get_mut(slot).ok_or(SendError::BadHandle)?;
        if !link
            .session
            .as_ref()
            .is_some_and(|s| !s.open && !s.requester)
        {
            return Err(SendError::NoNotice);
        }
        let done = match answer {
            Ok(()) => self.accept(slot, now, transport, service),
            Err(reason) => {
                link.session = None;
                self.terminal.reject(h, reason)
            }
        };
        self.drain(now, transport, service);
        done
    }

    /// Accepts the notice on `slot`, whose session record is in place, and opens it; a
    /// refused accept drops the record.
    fn accept<T: Link, S: Service>(
        &mut self,
        slot: usize,
        now: Instant,
        t: &mut T,
        svc: &mut S,
    ) -> Result<(), SendError> {
        match self.terminal.accept(Handle(slot as u8), now) {
            Ok(()) => {
                self.open_session(slot, t, svc);
                Ok(())
            }
            Err(e) => {
                if let Some(link) = self.links.get_mut(slot) {
                    link.session = None;
                }
                Err(e)
            }
        }
    }

    fn open_session<T: Link, S: Service>(&mut self, slot: usize, t: &mut T, svc: &mut S) {
        let Driver {
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

    /// Opens `h`'s transport to `to` (our relay's current address, or the node a demand
    /// was redirected to), dropping what the slot held.
    fn open<T: Link>(&mut self, h: Handle, to: Target<'_>, now: Instant, t: &mut T) {
        let slot = usize::from(h.0);
        if slot >= N {
            return;
        }
        self.links[slot].reset();
        if t.open_to(slot, to).is_err() {
            self.terminal.connect_failed(h, now);
        } else if t.state(slot) == LinkState::Open {
            // Up at once (a stack that connects synchronously): LOGIN goes out in this
            // poll, not the next.
            self.links[slot].phase = Phase::Open;
            self.terminal.connected(h, now);
        } else {
            self.links[slot].phase = Phase::Opening;
        }
    }

    /// Acts on every queued terminal event.
    fn drain<T: Link, S: Service>(&mut self, now: Instant, t: &mut T, svc: &mut S) {
        while let Some(event) = self.terminal.poll_event() {
            svc.on_event(&event);
            match event {
                Event::Open(h) => self.open(h, Target::Relay(self.terminal.relay()), now, t),
                // The demand's record stays on the slot: it goes on at the other node.
                #[cfg(feature = "redirect")]
                Event::Redirected { handle, to } => self.open(handle, Target::Node(&to), now, t),
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
                    let decision = svc.on_notice(handle, &from, &service);
                    if let (Decision::Accept | Decision::Defer, Some(link)) =
                        (decision, self.links.get_mut(slot))
                    {
                        link.session = Some(SessionInfo {
                            service,
                            requester: false,
                            peer_ended: false,
                            ended: false,
                            open: false,
                        });
                    }
                    match decision {
                        // Refused only if the notice is gone: nothing to answer.
                        Decision::Accept => {
                            let _ = self.accept(slot, now, t, svc);
                        }
                        Decision::Defer | Decision::Ignore => {}
                        Decision::Reject(reason) => {
                            let _ = self.terminal.reject(handle, reason);
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
                    let Driver {
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

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::frame::{self, Frame, LoginOk, Notice, Parsed, caps};
    use crate::ident::ResumeToken;
    use crate::terminal::Config;
    use std::vec::Vec;

    /// One slot, always connected: the relay's bytes are `rx`, ours go to `tx`.
    #[derive(Default)]
    struct Script {
        rx: Vec<u8>,
        tx: Vec<u8>,
        /// The relay address index of each `open_to` a relay.
        opened: Vec<u32>,
        /// Where `open_to` was asked to connect instead: the nodes of redirects.
        redirected: Vec<frame::Redirect>,
        /// The connection ends (the relay is gone).
        gone: bool,
    }

    impl Script {
        fn relay_sends(&mut self, f: Frame) {
            let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
            let n = f.encode(&mut buf).unwrap();
            self.rx.extend_from_slice(&buf[..n]);
        }

        /// The control frames written since the last call.
        fn sent(&mut self) -> Vec<Frame> {
            let mut out = Vec::new();
            let mut pos = 0;
            while pos < self.tx.len() {
                let (parsed, used) = frame::parse(&self.tx[pos..]).unwrap().unwrap();
                if let Parsed::Control(f) = parsed {
                    out.push(f);
                }
                pos += used;
            }
            self.tx.clear();
            out
        }
    }

    impl Link for Script {
        fn open(&mut self, _: usize) -> Result<(), LinkError> {
            unreachable!("the driver opens with open_to")
        }
        fn open_to(&mut self, _: usize, to: Target<'_>) -> Result<(), LinkError> {
            match to {
                Target::Relay(relay) => self.opened.push(relay),
                Target::Node(node) => self.redirected.push(node.clone()),
            }
            self.gone = false;
            Ok(())
        }
        fn state(&mut self, _: usize) -> LinkState {
            match self.gone {
                true => LinkState::Closed,
                false => LinkState::Open,
            }
        }
        fn peek(&mut self, _: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
            let n = self.rx.len().min(buf.len());
            buf[..n].copy_from_slice(&self.rx[..n]);
            Ok(n)
        }
        fn consume(&mut self, _: usize, n: usize) {
            self.rx.drain(..n);
        }
        fn write(&mut self, _: usize, bytes: &[u8]) -> Result<(), LinkError> {
            self.tx.extend_from_slice(bytes);
            Ok(())
        }
        fn send_space(&mut self, _: usize) -> usize {
            4096
        }
        fn close(&mut self, _: usize, _: bool) {}
    }

    /// Defers every notice; counts the sessions it sees open.
    #[derive(Default)]
    struct Later {
        deferred: Vec<Handle>,
        opened: usize,
    }

    impl Service for Later {
        fn on_notice(&mut self, h: Handle, _: &UserId, _: &ServiceName) -> Decision {
            self.deferred.push(h);
            Decision::Defer
        }
        fn on_open(&mut self, _: &mut Session<'_>) {
            self.opened += 1;
        }
        fn on_data(&mut self, _: &mut Session<'_>, data: &[u8]) -> usize {
            data.len()
        }
    }

    /// A driver with one connection, logged in, and a NOTICE for session 9 on it.
    fn noticed() -> (Driver<1>, Script, Later, Instant) {
        let now = Instant::from_secs(1);
        let user = UserId::new("dev").unwrap();
        let mut d = Driver::new(Config::default(), user, Password::new("pw").unwrap(), 1);
        let (mut link, mut svc) = (Script::default(), Later::default());
        d.start(now);
        d.poll(now, &mut link, &mut svc);
        assert!(matches!(link.sent()[..], [Frame::Login(_)]));
        link.relay_sends(Frame::LoginOk(LoginOk {
            caps: caps::ALL,
            keepalive_ms: 30_000,
            max_payload: 1024,
            token: ResumeToken::from_slice(b"t").unwrap(),
        }));
        link.relay_sends(Frame::Notice(Notice {
            session: 9,
            from: UserId::new("peer").unwrap(),
            service: ServiceName::new("web").unwrap(),
        }));
        d.poll(now, &mut link, &mut svc);
        assert_eq!(svc.deferred, [Handle(0)]);
        assert_eq!(link.sent(), []);
        (d, link, svc, now)
    }

    /// The driver opens each connection to the terminal's current relay address, and
    /// after losing its relay, to the next one.
    #[test]
    fn connections_open_to_the_terminals_relay_address() {
        let (mut d, mut link, mut svc, now) = noticed();
        assert_eq!(link.opened, [0]);
        link.gone = true;
        d.poll(now, &mut link, &mut svc);
        let later = now + crate::time::Duration::from_secs(120);
        d.poll(later, &mut link, &mut svc);
        assert_eq!(link.opened, [0, 1]);
    }

    #[test]
    fn a_deferred_notice_is_accepted_when_the_service_answers() {
        let (mut d, mut link, mut svc, now) = noticed();
        assert_eq!(
            d.answer(Handle(0), Ok(()), now, &mut link, &mut svc),
            Ok(())
        );
        d.poll(now, &mut link, &mut svc);
        assert_eq!(link.sent(), [Frame::Accept { session: 9 }]);
        assert_eq!(svc.opened, 1);
        // Once only.
        assert_eq!(
            d.answer(Handle(0), Ok(()), now, &mut link, &mut svc),
            Err(SendError::NoNotice)
        );
    }

    #[test]
    fn a_deferred_notice_is_rejected_with_the_services_reason() {
        let (mut d, mut link, mut svc, now) = noticed();
        let unavailable = Err(RejectReason::ServiceUnavailable);
        assert_eq!(
            d.answer(Handle(0), unavailable, now, &mut link, &mut svc),
            Ok(())
        );
        d.poll(now, &mut link, &mut svc);
        let sent = link.sent();
        assert!(
            matches!(sent[..], [Frame::Reject(ref r)] if r.session == 9 && r.reason == RejectReason::ServiceUnavailable),
            "{sent:?}"
        );
        assert_eq!(svc.opened, 0);
    }

    #[test]
    fn an_answer_after_the_relay_withdrew_the_notice_is_refused() {
        let (mut d, mut link, mut svc, now) = noticed();
        link.relay_sends(Frame::Release {
            reason: crate::codes::ReleaseReason::Cancelled,
        });
        d.poll(now, &mut link, &mut svc);
        assert_eq!(
            d.answer(Handle(0), Ok(()), now, &mut link, &mut svc),
            Err(SendError::NoNotice)
        );
        d.poll(now, &mut link, &mut svc);
        assert_eq!(link.sent(), []);
        assert_eq!(svc.opened, 0);
    }

    /// A redirected demand: the driver opens the same slot at the other node (the
    /// demand's record stays), logs in there with the token and demands again; the
    /// session that follows is the service's as any other.
    #[cfg(feature = "redirect")]
    #[test]
    fn a_redirect_reopens_the_slot_at_the_other_node() {
        let now = Instant::from_secs(1);
        let config = Config {
            kind: crate::terminal::Kind::Requester,
            follow_redirects: true,
            ..Config::default()
        };
        let user = UserId::new("laptop").unwrap();
        let mut d: Driver<1> = Driver::new(config, user, Password::new("pw").unwrap(), 1);
        let (mut link, mut svc) = (Script::default(), Later::default());
        d.start(now);
        d.poll(now, &mut link, &mut svc);
        link.sent();
        let token = ResumeToken::from_slice(b"t").unwrap();
        link.relay_sends(Frame::LoginOk(LoginOk {
            caps: caps::ALL | caps::REQUESTER | caps::REDIRECT,
            keepalive_ms: 30_000,
            max_payload: 1024,
            token: token.clone(),
        }));
        d.poll(now, &mut link, &mut svc);
        let cam = UserId::new("cam").unwrap();
        assert_eq!(d.demand(cam, ServiceName::default(), now), Ok(Handle(0)));
        d.poll(now, &mut link, &mut svc);
        assert!(matches!(link.sent()[..], [Frame::Demand(_)]));
        let to = frame::Redirect {
            address: crate::ident::NodeAddress::new("n7:7835").unwrap(),
            fingerprint: [7; 32],
        };
        link.relay_sends(Frame::DemandResult(frame::DemandResult::Redirect(
            to.clone(),
        )));
        d.poll(now, &mut link, &mut svc);
        assert_eq!(link.redirected, [to]);
        let sent = link.sent();
        assert!(
            matches!(&sent[..], [Frame::Login(l), Frame::Demand(_)] if l.credential == frame::Credential::Resume(token.clone())),
            "{sent:?}"
        );
        link.relay_sends(Frame::LoginOk(LoginOk {
            caps: caps::ALL | caps::REQUESTER,
            keepalive_ms: 30_000,
            max_payload: 1024,
            token,
        }));
        d.poll(now, &mut link, &mut svc);
        assert!(link.sent().is_empty());
        link.relay_sends(Frame::DemandResult(frame::DemandResult::Accepted {
            session: 4,
        }));
        d.poll(now, &mut link, &mut svc);
        assert_eq!(svc.opened, 1);
        assert!(d.session(Handle(0)).is_some_and(|s| s.requester));
    }
}
