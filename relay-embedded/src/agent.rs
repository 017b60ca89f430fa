//! The agent: relay-proto's terminal [`Driver`] over a [`Transport`], serving a
//! [`Service`].
//!
//! The driver (relay-proto) does all the work; this is its smoltcp-facing shape: a
//! [`Transport`] (embedded-io's `Write` for the send side) adapted to the driver's
//! [`Link`], and every terminal event logged (defmt or `log`, or nothing).

use relay_proto::driver::{
    Decision, Driver, Link, LinkError, LinkState, Service, Session, SessionInfo,
};
use relay_proto::ident::{Password, ServiceName, UserId};
use relay_proto::terminal::{Config, Event, Handle, SendError, Terminal};
use relay_proto::time::Instant;

use crate::log::log_debug;
use crate::transport::{Transport, write_exact};

pub use relay_proto::driver::{MIN_SOCKET_RX, MIN_SOCKET_TX};

/// A device's connections to one relay: `N` connections (`N` socket slots in the
/// transport).
///
/// Call [`Agent::poll`] after every `Interface::poll` (or whenever a socket may have
/// changed) and at the latest at the instant it returns.
#[derive(Debug)]
pub struct Agent<const N: usize>(Driver<N>);

/// A [`Transport`] as the driver's [`Link`].
struct Adapted<'t, T>(&'t mut T);

impl<T: Transport> Link for Adapted<'_, T> {
    fn open(&mut self, slot: usize) -> Result<(), LinkError> {
        self.0.open(slot).map_err(|_| LinkError)
    }
    fn state(&mut self, slot: usize) -> LinkState {
        self.0.state(slot)
    }
    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        self.0.peek(slot, buf).map_err(|_| LinkError)
    }
    fn consume(&mut self, slot: usize, n: usize) {
        self.0.consume(slot, n);
    }
    fn write(&mut self, slot: usize, bytes: &[u8]) -> Result<(), LinkError> {
        write_exact(&mut self.0.io(slot), bytes).map_err(|()| LinkError)
    }
    fn send_space(&mut self, slot: usize) -> usize {
        self.0.send_space(slot)
    }
    fn close(&mut self, slot: usize, graceful: bool) {
        self.0.close(slot, graceful);
    }
}

/// The application's service with every terminal event logged on the way.
struct Logged<'s, S>(&'s mut S);

impl<S: Service> Service for Logged<'_, S> {
    fn on_notice(&mut self, h: Handle, from: &UserId, service: &ServiceName) -> Decision {
        self.0.on_notice(h, from, service)
    }
    fn on_open(&mut self, s: &mut Session<'_>) {
        self.0.on_open(s);
    }
    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        self.0.on_data(s, data)
    }
    fn on_writable(&mut self, s: &mut Session<'_>) {
        self.0.on_writable(s);
    }
    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        self.0.on_peer_end(s);
    }
    fn on_close(&mut self, handle: Handle) {
        self.0.on_close(handle);
    }
    fn on_event(&mut self, event: &Event) {
        log_debug!("relay: {:?}", event);
        self.0.on_event(event);
    }
}

impl<const N: usize> Agent<N> {
    /// An agent that logs in as `user`. `seed` drives keep-alive and back-off jitter:
    /// give each device its own (from the RNG peripheral or a unique ID).
    pub fn new(config: Config, user: UserId, password: Password, seed: u64) -> Self {
        Agent(Driver::new(config, user, password, seed))
    }

    /// Starts connecting (and reconnecting, from now on). The first `poll` opens sockets.
    pub fn start(&mut self, now: Instant) {
        self.0.start(now);
    }

    /// Logs out: LOGOUT on one connection, the others close; no reconnects until `start`.
    pub fn logout(&mut self, now: Instant) {
        self.0.logout(now);
    }

    /// Asks the relay for a session with `target` (see [`Driver::demand`]).
    pub fn demand(
        &mut self,
        target: UserId,
        service: ServiceName,
        now: Instant,
    ) -> Result<Handle, SendError> {
        self.0.demand(target, service, now)
    }

    /// Whether at least one connection is logged in (the device is reachable).
    pub fn is_up(&self) -> bool {
        self.0.is_up()
    }

    /// The protocol state machine, for what the agent does not wrap (online list, ...).
    pub fn terminal(&self) -> &Terminal<N> {
        self.0.terminal()
    }

    pub fn terminal_mut(&mut self) -> &mut Terminal<N> {
        self.0.terminal_mut()
    }

    /// The session on `h`, if one runs there.
    pub fn session(&self, h: Handle) -> Option<&SessionInfo> {
        self.0.session(h)
    }

    /// Does all pending work (see [`Driver::poll`]). Returns when the agent next needs a
    /// poll even if no packet arrives (`None`: only when a packet arrives).
    pub fn poll<T: Transport, S: Service>(
        &mut self,
        now: Instant,
        transport: &mut T,
        service: &mut S,
    ) -> Option<Instant> {
        self.0
            .poll(now, &mut Adapted(transport), &mut Logged(service))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::convert::Infallible as Never;
    use relay_proto::codes::ErrorCode;
    use relay_proto::frame::{self, Frame, LoginOk, Notice};
    use relay_proto::ident::{ResumeToken, Text};
    use relay_proto::terminal::Cause;
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
        fn on_notice(&mut self, _: Handle, _: &UserId, _: &ServiceName) -> Decision {
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
    fn logging_in(rx: Vec<u8>) -> (Agent<1>, Trickle, Slow, Instant) {
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

    /// Ends every session as soon as it opens (a service with nothing to say).
    struct Hangup;
    impl Service for Hangup {
        fn on_open(&mut self, s: &mut Session<'_>) {
            s.terminate();
        }
        fn on_data(&mut self, _: &mut Session<'_>, data: &[u8]) -> usize {
            data.len()
        }
    }

    /// The control frames in `bytes`, as the relay would read them.
    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Ok(Some((frame::Parsed::Control(f), n))) = frame::parse(&bytes[pos..]) {
            out.push(f);
            pos += n;
        }
        out
    }

    #[test]
    fn a_service_that_ends_the_session_in_on_open_sends_accept_then_terminate() {
        let mut rx = Vec::new();
        login_ok(&mut rx);
        encode(
            Frame::Notice(Notice {
                session: 4,
                from: UserId::new("alice").unwrap(),
                service: ServiceName::new("echo").unwrap(),
            }),
            &mut rx,
        );
        let (mut agent, mut t, _, now) = logging_in(rx);
        t.visible = t.rx.len();
        agent.poll(now, &mut t, &mut Hangup);
        let sent = frames(&t.tx);
        assert!(
            sent.ends_with(&[Frame::Accept { session: 4 }, Frame::Terminate]),
            "{sent:?}"
        );
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
