//! A paired session's data path, handed out of the router (the split of issue 10, as
//! quinn-proto splits its endpoint and its connections).
//!
//! Once a session runs, its DATA frames, KEEPALIVEs and TERMINATEs touch only its two
//! connections' framing, keep-alive and forwarding state ([`Wire`]). [`Relay::hand_out`]
//! moves both wires into a [`Pair`] that the host keeps beside the two connections (behind
//! a lock of their own, say), so that their bytes move without the router. Every other
//! frame, and every transition that changes routing (LIST, LOGOUT, a frame out of place,
//! a deadline, a close), is the router's: [`Pair::handle_input`] answers
//! [`PairOffer::Router`] and the host offers the bytes to the router instead, which takes
//! the wires back first through the host's [`Handback`]. The router reaches for a pair
//! the same way whenever one of its own transitions touches a handed connection (its
//! terminal logs out or is replaced, the operator ends the session, shutdown), so the
//! router's decisions always see the wires as they are.
//!
//! TERMINATE is a half-close that changes only the wires: the pair forwards it and
//! records it ([`Wire::terminate`]). The second one ends the session, and that is the
//! router's (RELEASE to both, the session table and the per-account session counts,
//! [`super::Event::SessionEnded`] with the byte counts): the pair answers
//! [`PairOffer::Finished`], the host gives it back ([`Relay::give_back`] or
//! [`Relay::take_back`]) once it has let go of the pair, and the router applies the end
//! then, exactly as it would have at the TERMINATE. Until it is back, a finished pair
//! still acks KEEPALIVEs and leaves every other frame to the router (which takes it back
//! first), so nothing the terminals see depends on when the host gives it back.
//!
//! The transitions are [`Wire`]'s, the same code the router runs on a connection it
//! holds: a pair forwards exactly as the router would.

use super::conn::{Passed, Wire};
use super::{
    ConnEntry, ConnId, MIN_TRANSMIT_BUF, Phase, Policy, Relay, RelayError, Slab, Storage, Writer,
};
use crate::frame::{self, Frame, Parsed};
use crate::time::{Duration, Instant};

/// How the host hands a pair back when the router needs it ([`Relay::hand_out`]).
pub trait Handback {
    /// The pair that `conn` belongs to, taken from wherever the host keeps it; `None` if
    /// the host has none (then the router goes on with the wires as it handed them out).
    fn take(&mut self, conn: ConnId) -> Option<Pair>;
}

/// A host that never hands pairs out.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPairs;

impl Handback for NoPairs {
    fn take(&mut self, _: ConnId) -> Option<Pair> {
        None
    }
}

/// What [`Pair::handle_input`] did with the bytes offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PairOffer {
    /// As [`super::Offer::Consumed`].
    Consumed(usize),
    /// As [`super::Offer::Forward`]: write `poll_transmit(to)`'s bytes, then these, on `to`.
    Forward { to: ConnId, n: usize },
    /// As [`super::Offer::NeedMore`].
    NeedMore,
    /// A frame for the router: offer the same bytes to [`Relay::handle_input`].
    Router,
    /// As `Consumed`: the first `n` bytes, a TERMINATE, were handled and the peer had
    /// terminated already. The session is over: give the pair back to the router
    /// ([`Relay::give_back`], [`Relay::take_back`]), which sends both RELEASEs and ends
    /// the session. The rest of the bytes go to the router. A host that keeps the pair
    /// under a lock lets go of it first (the router may take pair locks, never the
    /// other way round).
    Finished(usize),
}

/// The data path of one running session: its two connections' wires.
#[derive(Debug, Clone)]
pub struct Pair {
    pub(super) conns: [ConnId; 2],
    pub(super) wires: [Wire; 2],
    /// Connections with output the host has not been told about ([`Pair::poll_wake`]).
    pub(super) wakes: [bool; 2],
    pub(super) max_payload: u16,
    pub(super) keepalive_timeout: Duration,
    /// Payload bytes passed between the two since the pair was handed out.
    pub(super) relayed: u64,
}

impl Pair {
    /// The two connections.
    pub fn conns(&self) -> [ConnId; 2] {
        self.conns
    }

    fn side(&self, conn: ConnId) -> Option<usize> {
        self.conns.iter().position(|&c| c == conn)
    }

    /// Both sides sent TERMINATE: the router must have the pair back to end the session
    /// ([`PairOffer::Finished`]).
    pub fn finished(&self) -> bool {
        self.wires.iter().all(|w| w.ended)
    }

    /// Side `me`'s wire and its peer's.
    fn wires_mut(&mut self, me: usize) -> (&mut Wire, &mut Wire) {
        let [a, b] = &mut self.wires;
        if me == 0 { (a, b) } else { (b, a) }
    }

    /// Takes bytes received on `conn`, one frame (or one run of payload) at a time, as
    /// [`Relay::handle_input`] does for the frames a running session sends most.
    pub fn handle_input(&mut self, now: Instant, conn: ConnId, input: &[u8]) -> PairOffer {
        let Some(me) = self.side(conn) else {
            return PairOffer::Router;
        };
        if input.is_empty() {
            return PairOffer::NeedMore;
        }
        let peer = 1 - me;
        self.wires[me].last_rx = now;
        if self.wires[me].inbound.is_some() {
            let Passed {
                n,
                to_peer,
                complete,
            } = self.wires[me].pass(input.len());
            if !to_peer {
                return PairOffer::Consumed(n);
            }
            self.relayed += n as u64;
            if complete {
                self.wires[peer].outbound.complete();
                self.wakes[peer] = true;
            }
            return PairOffer::Forward {
                to: self.conns[peer],
                n,
            };
        }
        match frame::parse(input) {
            Ok(None) => PairOffer::NeedMore,
            Ok(Some((Parsed::DataHeader { len }, n)))
                if len <= self.max_payload && !self.wires[me].ended =>
            {
                let (mine, theirs) = self.wires_mut(me);
                mine.begin_data(theirs, len);
                self.wakes[peer] = true;
                PairOffer::Consumed(n)
            }
            Ok(Some((Parsed::Control(Frame::Terminate), n))) if !self.wires[me].ended => {
                let (mine, theirs) = self.wires_mut(me);
                let both = mine.terminate(theirs);
                self.wakes[peer] = true;
                if both {
                    PairOffer::Finished(n)
                } else {
                    PairOffer::Consumed(n)
                }
            }
            Ok(Some((Parsed::Control(Frame::KeepAlive { seq }), n))) => {
                self.wires[me].keepalive(seq);
                self.wakes[me] = true;
                PairOffer::Consumed(n)
            }
            // Errors, a DATA header too large or after the sender's TERMINATE, a second
            // TERMINATE, and every other frame.
            _ => PairOffer::Router,
        }
    }

    /// As [`Relay::forward_target`].
    pub fn forward_target(&self, conn: ConnId) -> Option<(ConnId, usize)> {
        let me = self.side(conn)?;
        let fwd = self.wires[me].inbound?;
        fwd.pass
            .then_some((self.conns[1 - me], usize::from(fwd.remaining)))
    }

    /// As [`Relay::poll_transmit`], for `conn`'s keep-alive acks, DATA headers and the
    /// peer's TERMINATE (the only output a handed-out connection has).
    pub fn poll_transmit(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, RelayError> {
        if buf.len() < MIN_TRANSMIT_BUF {
            return Err(RelayError::BufferTooSmall);
        }
        let me = self.side(conn).ok_or(RelayError::UnknownConn)?;
        let wire = &mut self.wires[me];
        if let Some(again) = wire.hold() {
            self.wakes[me] |= again;
            return Ok(0);
        }
        let mut w = Writer { buf, len: 0 };
        if let Some(acks) = wire.acks.take() {
            wire.acks = w.put_acks(acks);
        }
        w.put_wire_tail(wire);
        self.wakes[me] |= wire.has_output();
        Ok(w.len)
    }

    /// The next connection with output: call [`Pair::poll_transmit`] for it.
    pub fn poll_wake(&mut self) -> Option<ConnId> {
        let i = self.wakes.iter().position(|&w| w)?;
        self.wakes[i] = false;
        Some(self.conns[i])
    }

    /// When `conn`'s keep-alive deadline passes: then the host gives the router the
    /// deadline ([`Relay::handle_timeout`]), which takes the pair back.
    pub fn poll_timeout(&self, conn: ConnId) -> Option<Instant> {
        let me = self.side(conn)?;
        Some(self.wires[me].last_rx + self.keepalive_timeout)
    }
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    /// Hands the data path of `conn`'s running session to the host: both connections'
    /// wires, as a [`Pair`] (also a session one side has terminated: the other side's
    /// DATA and TERMINATE go through the pair). `None` unless the session runs and no
    /// router output waits on either connection (a result...): the host writes that
    /// first and asks again. While handed out, the
    /// host offers the two connections' bytes to the pair, and to the router only what
    /// the pair answers [`PairOffer::Router`]; the router takes the pair back through
    /// `H` before it touches either connection.
    pub fn hand_out(&mut self, conn: ConnId) -> Option<Pair> {
        let key = self.key(conn)?;
        let peer = self.handable(key)?;
        if self.handable(peer) != Some(key) {
            return None;
        }
        let mut wakes = [false; 2];
        for (i, k) in [key, peer].into_iter().enumerate() {
            wakes[i] = self.unwake(k);
            if let Some(c) = self.conns.get_mut(k) {
                c.handed = true;
            }
        }
        let wire = |k| self.conns.get(k).map(|c| c.wire);
        Some(Pair {
            conns: [conn, self.id(peer)],
            wires: [wire(key)?, wire(peer)?],
            wakes,
            max_payload: self.config.max_frame_payload,
            keepalive_timeout: self.config.keepalive_timeout,
            relayed: 0,
        })
    }

    /// `key`'s session peer if `key` may be handed out.
    fn handable(&self, key: u32) -> Option<u32> {
        let c = self.conns.get(key)?;
        match c.phase()? {
            &Phase::Session { peer, .. } if !c.handed && c.out.is_empty() => Some(peer),
            _ => None,
        }
    }

    /// Takes `key`'s pair back if it is handed out: the router is about to use it.
    pub(super) fn home(&mut self, key: u32) {
        if !self.conns.get(key).is_some_and(|c| c.handed) {
            return;
        }
        match self.handback.take(self.id(key)) {
            Some(pair) => self.put_back(pair),
            // The host lost it: the wires stay as they were handed out.
            None => {
                let peer = self
                    .conns
                    .get(key)
                    .and_then(ConnEntry::phase)
                    .and_then(|p| match p {
                        Phase::Session { peer, .. } => Some(*peer),
                        _ => None,
                    });
                for k in [Some(key), peer].into_iter().flatten() {
                    if let Some(c) = self.conns.get_mut(k) {
                        c.handed = false;
                    }
                }
            }
        }
    }

    /// A pair the host cannot use any more (a [`PairOffer::Finished`] one, say), back
    /// into the router.
    pub fn give_back(&mut self, pair: Pair) {
        self.put_back(pair);
    }

    /// Takes `conn`'s pair back through the host's [`Handback`], if it is handed out: for
    /// a host that keeps its pairs where the router finds them and got
    /// [`PairOffer::Finished`].
    pub fn take_back(&mut self, conn: ConnId) {
        if let Some(key) = self.key(conn) {
            self.home(key);
        }
    }

    /// A pair's wires back into their entries, with the wakes it owes; the session's end
    /// if both sides terminated through the pair.
    fn put_back(&mut self, pair: Pair) {
        self.stats.bytes_relayed += pair.relayed;
        let mut back = [None; 2];
        for (i, slot) in back.iter_mut().enumerate() {
            let Some(key) = self.key(pair.conns[i]) else {
                continue;
            };
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.handed) {
                c.wire = pair.wires[i];
                c.handed = false;
                *slot = Some(key);
                if pair.wakes[i] {
                    self.wake(key);
                }
            }
        }
        if let [Some(a), Some(b)] = back
            && pair.finished()
        {
            self.both_terminated(a, b);
        }
    }

    /// Takes every pair back (before [`Relay::session_bytes`], say).
    pub fn take_back_all(&mut self) {
        let mut k = 0;
        while let Some(key) = self.conns.next_key(k) {
            self.home(key);
            k = key + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AllowAll, Config, Event, Fixed, Offer, Relay, Verdict, error_frame};
    use super::*;
    use crate::codes::{ErrorCode, ReleaseReason};
    use crate::frame::{Credential, Demand, Hello, Login, caps};
    use crate::ident::{Password, ResumeToken, ServiceName, UserId};

    type R = Relay<Fixed<4, 2, 7>, AllowAll, Stash>;

    /// The host's side in these tests: one pair, kept here.
    #[derive(Debug, Default)]
    struct Stash(Option<Pair>, usize);

    impl Handback for Stash {
        fn take(&mut self, conn: ConnId) -> Option<Pair> {
            let p = self.0.take().filter(|p| p.conns().contains(&conn));
            self.1 += usize::from(p.is_some());
            p
        }
    }

    fn enc(f: &Frame) -> heapless::Vec<u8, 512> {
        let mut b = [0u8; 512];
        let n = f.encode(&mut b).unwrap();
        heapless::Vec::from_slice(&b[..n]).unwrap()
    }

    fn t(s: u64) -> Instant {
        Instant::from_secs(s)
    }

    fn login(r: &mut R, user: &str, caps: u32) -> ConnId {
        let c = r.accept(t(0)).unwrap();
        let f = enc(&Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).unwrap(),
            credential: Credential::Password(Password::new("pw").unwrap()),
        }));
        assert_eq!(r.handle_input(t(0), c, &f), Offer::Consumed(f.len()));
        let token = ResumeToken::from_slice(&[1]).unwrap();
        let instance = c.index() as u64 + 1;
        r.login_verdict(t(0), c, Verdict::Accept { instance, token });
        drain(r, c);
        c
    }

    fn drain(r: &mut R, c: ConnId) -> heapless::Vec<u8, 512> {
        while r.poll_event().is_some() {}
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let n = r.poll_transmit(c, &mut buf).unwrap().len;
        while r.poll_event().is_some() {}
        heapless::Vec::from_slice(&buf[..n]).unwrap()
    }

    /// Two logged-in connections with a running session: (requester, target).
    fn session(r: &mut R) -> (ConnId, ConnId) {
        let tgt = login(r, "dev", caps::ALL);
        let req = login(r, "cli", caps::ALL | caps::REQUESTER);
        let d = enc(&Frame::Demand(Demand {
            target: UserId::new("dev").unwrap(),
            service: ServiceName::default(),
        }));
        r.handle_input(t(1), req, &d);
        let notice = drain(r, tgt);
        let Ok(Some((Parsed::Control(Frame::Notice(n)), _))) = frame::parse(&notice) else {
            panic!("no notice: {notice:?}");
        };
        let a = enc(&Frame::Accept { session: n.session });
        r.handle_input(t(1), tgt, &a);
        drain(r, req);
        (req, tgt)
    }

    #[test]
    fn a_pair_forwards_data_and_acks_without_the_router() {
        let mut r = R::new(Config::default(), AllowAll);
        let (req, tgt) = session(&mut r);
        let mut p = r.hand_out(req).expect("a running session is handed out");
        assert_eq!(p.conns(), [req, tgt]);
        assert!(r.hand_out(tgt).is_none(), "handed out once");
        let data = [0x0C, 0, 2, b'h', b'i'];
        assert_eq!(p.handle_input(t(2), req, &data), PairOffer::Consumed(3));
        assert_eq!(p.forward_target(req), Some((tgt, 2)));
        assert_eq!(p.poll_wake(), Some(tgt));
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        assert_eq!(p.poll_transmit(tgt, &mut buf), Ok(3), "the DATA header");
        assert_eq!(&buf[..3], &data[..3]);
        assert_eq!(
            p.handle_input(t(2), req, &data[3..]),
            PairOffer::Forward { to: tgt, n: 2 }
        );
        assert_eq!(p.poll_wake(), Some(tgt));
        assert_eq!(p.poll_transmit(tgt, &mut buf), Ok(0), "the lock lifts");
        assert_eq!(p.poll_wake(), Some(tgt));
        let keepalive = enc(&Frame::KeepAlive { seq: 9 });
        let n = keepalive.len();
        assert_eq!(
            p.handle_input(t(3), tgt, &keepalive),
            PairOffer::Consumed(n)
        );
        assert_eq!(p.poll_wake(), Some(tgt));
        let ack = enc(&Frame::KeepAliveAck { seq: 9 });
        assert_eq!(p.poll_transmit(tgt, &mut buf), Ok(ack.len()), "its ack");
        assert_eq!(&buf[..ack.len()], ack.as_slice());
        assert_eq!(p.poll_timeout(tgt), Some(t(93)));
        // TERMINATE too, after the DATA before it: the session is half-closed, the
        // router sees nothing of it.
        assert_eq!(
            p.handle_input(t(4), req, &[0x0D, 0, 0]),
            PairOffer::Consumed(3)
        );
        assert!(!p.finished());
        assert_eq!(p.poll_wake(), Some(tgt));
        assert_eq!(p.poll_transmit(tgt, &mut buf), Ok(3));
        assert_eq!(&buf[..3], &[0x0D, 0, 0], "TERMINATE forwarded");
        assert_eq!(r.poll_event(), None);
        r.give_back(p);
        let mut ended = None;
        while let Some(e) = r.poll_event() {
            if let Event::SessionEnded { up, .. } = e {
                ended = Some(up);
            }
        }
        assert_eq!(ended, None, "half-closed only");
        assert_eq!(r.stats().active_sessions, 1);
        assert_eq!(r.stats().bytes_relayed, 2, "the pair's bytes count");
    }

    /// A router transition that touches a handed-out connection (here: the operator
    /// kicks the target) takes the pair back first, and sees its payload under way.
    #[test]
    fn the_router_takes_a_pair_back_before_touching_it() {
        let mut r = R::new(Config::default(), AllowAll);
        let (req, tgt) = session(&mut r);
        let mut p = r.hand_out(tgt).unwrap();
        assert_eq!(
            p.handle_input(t(2), tgt, &[0x0C, 0, 4]),
            PairOffer::Consumed(3)
        );
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        assert_eq!(p.poll_transmit(req, &mut buf), Ok(3));
        assert_eq!(
            p.handle_input(t(2), tgt, &[1, 2]),
            PairOffer::Forward { to: req, n: 2 }
        );
        r.handback_mut().0 = Some(p);
        r.kick_user(&UserId::new("dev").unwrap());
        assert_eq!(r.handback_mut().1, 1);
        // The requester is in the middle of a payload: it cannot be told in-band, so it
        // closes (§10.3) rather than getting a RELEASE inside the payload.
        let t = r.poll_transmit(req, &mut buf).unwrap();
        assert!(t.close && t.len == 0, "{t:?}");
    }

    const TERMINATE: &[u8] = &[0x0D, 0, 0];

    /// A TERMINATE on a handed-out pair is forwarded by the pair alone: the router is
    /// not asked for the pair (the host keeps it) and has no event; the other direction
    /// still carries DATA through the pair. The second TERMINATE finishes the pair.
    #[test]
    fn a_pair_forwards_terminate_without_the_router() {
        let mut r = R::new(Config::default(), AllowAll);
        let (req, tgt) = session(&mut r);
        let mut p = r.hand_out(req).unwrap();
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        assert_eq!(p.handle_input(t(2), req, TERMINATE), PairOffer::Consumed(3));
        assert_eq!(p.poll_wake(), Some(tgt));
        assert_eq!(p.poll_transmit(tgt, &mut buf), Ok(3));
        assert_eq!(&buf[..3], TERMINATE);
        // The target still sends, through the pair.
        let data = [0x0C, 0, 1, b'!'];
        assert_eq!(p.handle_input(t(2), tgt, &data), PairOffer::Consumed(3));
        assert_eq!(
            p.handle_input(t(2), tgt, &data[3..]),
            PairOffer::Forward { to: req, n: 1 }
        );
        // Its TERMINATE ends the session: the pair says so and the host gives it back.
        assert_eq!(p.handle_input(t(3), tgt, TERMINATE), PairOffer::Finished(3));
        assert!(p.finished());
        assert_eq!(r.handback_mut().1, 0, "the router never asked for the pair");
        assert_eq!(r.poll_event(), None, "nor did anything");
        assert_eq!(r.stats().active_sessions, 1);
        r.give_back(p);
        assert_eq!(r.stats().active_sessions, 0);
        let mut ended = None;
        while let Some(e) = r.poll_event() {
            if let Event::SessionEnded {
                up, down, reason, ..
            } = e
            {
                ended = Some((up, down, reason));
            }
        }
        assert_eq!(ended, Some((0, 1, ReleaseReason::Normal)));
        let release = enc(&Frame::Release {
            reason: ReleaseReason::Normal,
        });
        let mut want = heapless::Vec::<u8, 512>::from_slice(&data[..3]).unwrap();
        want.extend_from_slice(TERMINATE).unwrap();
        want.extend_from_slice(&release).unwrap();
        // (The payload byte itself is the host's to write, after the header, which ends
        // its burst; the next lifts the output lock, the one after has the rest.)
        let mut got = drain(&mut r, req);
        for _ in 0..2 {
            got.extend_from_slice(&drain(&mut r, req)).unwrap();
        }
        assert_eq!(got, want, "DATA header, TERMINATE, RELEASE");
    }

    /// One step of a script that both data paths run.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Bytes from the requester (0) or the target (1).
        In(usize, &'static [u8]),
        /// The host writes both connections' output.
        Flush,
    }

    /// How the host of [`run`] moves the session's bytes.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Path {
        /// Through the router only.
        Router,
        /// Through a pair handed out at the start; a finished one is given back at once,
        /// or (`late`) left where the router takes it back at its next call.
        Pair { late: bool },
    }

    /// What the terminals and the host saw, and the router's view after.
    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        /// Bytes written on the requester's and the target's connection.
        out: [heapless::Vec<u8, 256>; 2],
        /// Events other than wakes, in order.
        events: heapless::Vec<Event, 8>,
        phases: [Option<Phase>; 2],
        /// Sessions counted against each side's terminal.
        sessions: [u16; 2],
        active: u64,
        relayed: u64,
    }

    struct Host {
        r: R,
        pair: Option<Pair>,
        conns: [ConnId; 2],
        path: Path,
        seen: Seen,
        /// The pair answered [`PairOffer::Finished`].
        finished: bool,
    }

    impl Host {
        fn side(&self, c: ConnId) -> usize {
            self.conns.iter().position(|&x| x == c).unwrap()
        }

        fn drain(&mut self) {
            while let Some(e) = self.r.poll_event() {
                if !matches!(e, Event::Wake(_)) {
                    self.seen.events.push(e).unwrap();
                }
            }
        }

        fn flush(&mut self, c: ConnId) {
            let mut buf = [0u8; MIN_TRANSMIT_BUF];
            let n = match self.pair.as_mut() {
                Some(p) => {
                    let n = p.poll_transmit(c, &mut buf).unwrap();
                    while p.poll_wake().is_some() {}
                    n
                }
                None => self.r.poll_transmit(c, &mut buf).unwrap().len,
            };
            let side = self.side(c);
            self.seen.out[side].extend_from_slice(&buf[..n]).unwrap();
            self.drain();
        }

        /// Offers `bytes` as a host must, through the pair while it has one.
        fn offer(&mut self, side: usize, bytes: &[u8]) {
            let c = self.conns[side];
            let mut pos = 0;
            while pos < bytes.len() {
                let rest = &bytes[pos..];
                let offer = match self.pair.as_mut().map(|p| p.handle_input(t(5), c, rest)) {
                    None => self.r.handle_input(t(5), c, rest),
                    Some(PairOffer::Consumed(n)) => Offer::Consumed(n),
                    Some(PairOffer::Forward { to, n }) => Offer::Forward { to, n },
                    Some(PairOffer::NeedMore) => Offer::NeedMore,
                    Some(PairOffer::Finished(n)) => {
                        self.finished = true;
                        let pair = self.pair.take();
                        match (self.path, pair) {
                            (Path::Pair { late: false }, Some(p)) => self.r.give_back(p),
                            (_, p) => self.r.handback_mut().0 = p,
                        }
                        Offer::Consumed(n)
                    }
                    Some(PairOffer::Router) => {
                        self.r.handback_mut().0 = self.pair.take();
                        continue;
                    }
                };
                match offer {
                    Offer::Consumed(n) => pos += n,
                    Offer::Forward { to, n } => {
                        self.flush(to);
                        let to = self.side(to);
                        self.seen.out[to].extend_from_slice(&rest[..n]).unwrap();
                        pos += n;
                    }
                    Offer::NeedMore | Offer::Hold => break,
                }
                self.drain();
            }
            self.drain();
        }
    }

    /// Runs `script` on a fresh session (requester "cli", target "dev") along `path`;
    /// `true` if the pair finished the session.
    fn run(script: &[Step], path: Path) -> (Seen, bool) {
        let mut r = R::new(Config::default(), AllowAll);
        let (req, tgt) = session(&mut r);
        let pair = (path != Path::Router).then(|| r.hand_out(req).unwrap());
        let mut h = Host {
            r,
            pair,
            conns: [req, tgt],
            path,
            seen: Seen::default(),
            finished: false,
        };
        for step in script {
            match *step {
                Step::In(side, bytes) => h.offer(side, bytes),
                Step::Flush => {
                    // Thrice: a payload's end lifts the output lock on the next call.
                    for _ in 0..3 {
                        h.flush(req);
                        h.flush(tgt);
                    }
                }
            }
        }
        let mut seen = h.seen;
        for (i, c) in [req, tgt].into_iter().enumerate() {
            let entry = h.r.conn_entry(c).unwrap();
            seen.phases[i] = entry.phase().cloned();
            let term = entry.term().and_then(|k| h.r.terms.get(k));
            seen.sessions[i] = term.map_or(u16::MAX, |t| t.sessions);
        }
        seen.active = h.r.stats().active_sessions;
        seen.relayed = h.r.stats().bytes_relayed;
        (seen, h.finished)
    }

    /// Both data paths, for the same inputs, give the same frames, events, session
    /// table, per-account session counts and byte counts. `finishes`: both TERMINATEs
    /// went through the pair (else the router took it back before the second one).
    fn same_on_both_paths(script: &[Step], finishes: bool) -> Seen {
        let (router, _) = run(script, Path::Router);
        for late in [false, true] {
            let (paired, finished) = run(script, Path::Pair { late });
            assert_eq!(paired, router, "late: {late}");
            assert_eq!(finished, finishes, "late: {late}");
        }
        router
    }

    fn release() -> heapless::Vec<u8, 512> {
        enc(&Frame::Release {
            reason: ReleaseReason::Normal,
        })
    }

    fn ended(seen: &Seen) -> Option<(u64, u64, ReleaseReason)> {
        seen.events.iter().find_map(|e| match *e {
            Event::SessionEnded {
                up, down, reason, ..
            } => Some((up, down, reason)),
            _ => None,
        })
    }

    /// A session half-closed, then closed: DATA each way, the requester's TERMINATE,
    /// DATA from the target (the open direction), the target's TERMINATE.
    #[test]
    fn half_closed_then_closed_is_the_same_through_a_pair() {
        use Step::*;
        let seen = same_on_both_paths(
            &[
                In(0, &[0x0C, 0, 2, b'h', b'i']),
                Flush,
                In(0, TERMINATE),
                Flush,
                In(1, &[0x0C, 0, 3, b'y', b'o', b'u']),
                Flush,
                In(1, TERMINATE),
                Flush,
            ],
            true,
        );
        assert_eq!(ended(&seen), Some((2, 3, ReleaseReason::Normal)));
        assert_eq!(seen.phases, [Some(Phase::Idle), Some(Phase::Idle)]);
        assert_eq!(seen.sessions, [0, 0], "the session slots are free again");
        assert_eq!((seen.active, seen.relayed), (0, 5));
        let mut req =
            heapless::Vec::<u8, 256>::from_slice(&[0x0C, 0, 3, b'y', b'o', b'u']).unwrap();
        req.extend_from_slice(TERMINATE).unwrap();
        req.extend_from_slice(&release()).unwrap();
        assert_eq!(seen.out[0], req);
    }

    /// Both sides TERMINATE before the host writes anything: each gets the other's
    /// TERMINATE, then RELEASE Normal.
    #[test]
    fn crossing_terminates_are_the_same_through_a_pair() {
        use Step::*;
        let seen = same_on_both_paths(&[In(0, TERMINATE), In(1, TERMINATE), Flush], true);
        assert_eq!(ended(&seen), Some((0, 0, ReleaseReason::Normal)));
        let mut both = heapless::Vec::<u8, 256>::from_slice(TERMINATE).unwrap();
        both.extend_from_slice(&release()).unwrap();
        assert_eq!(seen.out, [both.clone(), both]);
        assert_eq!(seen.sessions, [0, 0]);
    }

    /// DATA, and a second TERMINATE, after the sender's own TERMINATE: ERROR
    /// UnexpectedFrame from the router (the pair leaves those frames to it), the payload
    /// skipped; the session goes on until the peer's TERMINATE.
    #[test]
    fn terminate_then_data_is_the_same_through_a_pair() {
        use Step::*;
        let seen = same_on_both_paths(
            &[
                In(0, TERMINATE),
                In(0, &[0x0C, 0, 1, b'x']),
                Flush,
                In(0, TERMINATE),
                Flush,
                In(1, TERMINATE),
                Flush,
            ],
            false,
        );
        let error = enc(&error_frame(ErrorCode::UnexpectedFrame, None));
        let mut req = heapless::Vec::<u8, 256>::from_slice(&error).unwrap();
        req.extend_from_slice(&error).unwrap();
        req.extend_from_slice(TERMINATE).unwrap();
        req.extend_from_slice(&release()).unwrap();
        assert_eq!(seen.out[0], req);
        assert_eq!(ended(&seen).map(|e| e.2), Some(ReleaseReason::Normal));
    }

    /// The peer's TERMINATE waits behind the DATA it sent before it, whichever side
    /// finishes the session; a KEEPALIVE after the end is acked (before RELEASE).
    #[test]
    fn terminate_behind_data_and_keepalive_after_it_are_the_same_through_a_pair() {
        use Step::*;
        let keepalive = &[0x03, 0, 1, 7];
        assert_eq!(enc(&Frame::KeepAlive { seq: 7 }).as_slice(), keepalive);
        let seen = same_on_both_paths(
            &[
                In(1, &[0x0C, 0, 3, b'a', b'b', b'c']),
                In(1, TERMINATE),
                In(0, TERMINATE),
                In(0, keepalive),
                Flush,
            ],
            true,
        );
        assert_eq!(ended(&seen), Some((0, 3, ReleaseReason::Normal)));
        let ack = enc(&Frame::KeepAliveAck { seq: 7 });
        let mut req =
            heapless::Vec::<u8, 256>::from_slice(&[0x0C, 0, 3, b'a', b'b', b'c']).unwrap();
        req.extend_from_slice(&ack).unwrap();
        req.extend_from_slice(TERMINATE).unwrap();
        req.extend_from_slice(&release()).unwrap();
        assert_eq!(seen.out[0], req);
    }
}
