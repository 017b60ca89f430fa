//! The relay core driven by arbitrary bytes on many connections. The run starts deep:
//! three logged-in terminals, `a` in a session with `b`, and a requester instance of
//! `b` beside its reachable one. The input is then a script of
//! operations (accept, feed a chunk to a connection, advance time, close, flush, hand a
//! running session's data path out as a `Pair`, which then takes the bytes the router
//! leaves to it, TERMINATEs too, until the router takes it back or the pair finishes).
//! Checks: no panic, forwards only to live connections, `NeedMore` never holds a whole
//! frame's worth, and the core's counts agree with the host's view.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::frame::{self, Credential, Demand, Frame, Hello, Login, caps};
use relay_proto::relay::{
    self, AllowAll, ConnId, Event, Handback, Heap, Offer, Pair, PairOffer, Refusal, Relay, Verdict,
};
use relay_proto::{Duration, Instant, Password, ResumeToken, ServiceName, UserId};

type Core = Relay<Heap, AllowAll, Pairs>;

/// The pairs handed out, given back when the router asks.
#[derive(Default)]
struct Pairs(Vec<Pair>);

impl Handback for Pairs {
    fn take(&mut self, conn: ConnId) -> Option<Pair> {
        let i = self.0.iter().position(|p| p.conns().contains(&conn))?;
        Some(self.0.swap_remove(i))
    }
}

struct Host {
    r: Core,
    now: Instant,
    /// Each open connection and the bytes it was offered but could not use yet.
    conns: Vec<(ConnId, Vec<u8>)>,
    buf: Vec<u8>,
    /// Instances handed out so far (each password login starts a new one).
    instances: u64,
}

fn enc(f: Frame) -> Vec<u8> {
    let mut b = [0u8; frame::MAX_CONTROL_FRAME];
    let n = f.encode(&mut b).unwrap();
    b[..n].to_vec()
}

fn login(u: &str, caps: u32) -> Vec<u8> {
    enc(Frame::Login(Login {
        hello: Hello::current(caps),
        user: UserId::new(u).unwrap(),
        credential: Credential::Password(Password::new("pw").unwrap()),
    }))
}

impl Host {
    /// Offers `chunk` on connection `k` the way a host must, then answers logins
    /// (password "pw" or any 8-byte token is good).
    fn drive(&mut self, k: usize, chunk: &[u8]) {
        let (c, pending) = &mut self.conns[k];
        let c = *c;
        pending.extend_from_slice(chunk);
        let mut pos = 0;
        while pos < pending.len() {
            let pairs = &mut self.r.handback_mut().0;
            if let Some(p) = pairs.iter_mut().find(|p| p.conns().contains(&c)) {
                match p.handle_input(self.now, c, &pending[pos..]) {
                    PairOffer::Consumed(n) => {
                        assert!(n > 0 && n <= pending.len() - pos);
                        pos += n;
                        continue;
                    }
                    PairOffer::Forward { to, n } => {
                        assert!(n > 0 && n <= pending.len() - pos);
                        assert!(p.conns().contains(&to), "forward out of the pair");
                        let _ = p.poll_transmit(to, &mut self.buf);
                        pos += n;
                        continue;
                    }
                    PairOffer::NeedMore => break,
                    PairOffer::Router => {}
                    // The session is over: the router ends it once it has the pair.
                    PairOffer::Finished(n) => {
                        assert!(n > 0 && n <= pending.len() - pos);
                        assert!(p.finished());
                        pos += n;
                        self.r.take_back(c);
                        assert!(!self.r.handback_mut().0.iter().any(|p| p.conns().contains(&c)));
                        continue;
                    }
                }
            }
            match self.r.handle_input(self.now, c, &pending[pos..]) {
                Offer::Consumed(n) => {
                    assert!(n > 0 && n <= pending.len() - pos);
                    pos += n;
                }
                Offer::Forward { to, n } => {
                    assert!(n > 0 && n <= pending.len() - pos);
                    assert!(self.r.conn_entry(to).is_some(), "forward to a dead connection");
                    let _ = self.r.poll_transmit(to, &mut self.buf);
                    pos += n;
                }
                Offer::NeedMore => {
                    assert!(pending.len() - pos < frame::MAX_CONTROL_FRAME);
                    break;
                }
                // Offered again with the next chunk, after the verdict below.
                Offer::Hold => break,
            }
        }
        pending.drain(..pos);
        self.answer_logins();
    }

    fn answer_logins(&mut self) {
        let mut auth = Vec::new();
        while let Some(e) = self.r.poll_event() {
            if let Event::Authenticate { conn, credential, .. } = e {
                auth.push((conn, credential));
            }
        }
        for (conn, cred) in auth {
            let verdict = match cred {
                Credential::Password(p) if p.as_str() == "pw" => {
                    self.instances += 1;
                    let instance = self.instances;
                    let token = ResumeToken::from_slice(&instance.to_be_bytes()).unwrap();
                    Verdict::Accept { instance, token }
                }
                Credential::Resume(t) if t.as_bytes().len() == 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(t.as_bytes());
                    Verdict::Accept { instance: u64::from_be_bytes(b), token: t }
                }
                _ => Verdict::Refuse(Refusal::BadCredential),
            };
            self.r.login_verdict(self.now, conn, verdict);
        }
    }

    fn accept(&mut self) {
        if let Ok(c) = self.r.accept(self.now) {
            self.conns.push((c, Vec::new()));
        }
    }

    fn flush(&mut self, k: usize) {
        let c = self.conns[k].0;
        let pairs = &mut self.r.handback_mut().0;
        if let Some(p) = pairs.iter_mut().find(|p| p.conns().contains(&c)) {
            let _ = p.poll_transmit(c, &mut self.buf);
            while p.poll_wake().is_some() {}
            return;
        }
        if let Ok(t) = self.r.poll_transmit(c, &mut self.buf) {
            if t.close {
                self.conns.swap_remove(k);
                self.r.closed(c);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Host {
        r: Relay::new(relay::Config::default(), AllowAll),
        now: Instant::from_secs(1),
        conns: Vec::new(),
        buf: vec![0u8; relay::MIN_TRANSMIT_BUF],
        instances: 0,
    };
    // Setup: b and c log in (b also as a requester), a logs in and demands b, b accepts
    // session 1.
    for _ in 0..4 {
        h.accept();
    }
    h.drive(1, &login("b", caps::ALL));
    h.drive(2, &login("c", caps::ALL));
    h.drive(3, &login("b", caps::ALL | caps::REQUESTER));
    let demand = Demand { target: UserId::new("b").unwrap(), service: ServiceName::default() };
    h.drive(0, &login("a", caps::ALL));
    h.drive(0, &enc(Frame::Demand(demand)));
    h.drive(1, &enc(Frame::Accept { session: 1 }));
    assert_eq!(h.r.stats().active_sessions, 1);
    assert_eq!(h.r.terminal_count(), 4, "b's requester instance did not replace b");

    let mut i = 0;
    let next = |i: &mut usize| {
        let b = data.get(*i).copied().unwrap_or(0);
        *i += 1;
        b
    };
    while i < data.len() {
        let op = next(&mut i);
        let k = usize::from(next(&mut i)) % h.conns.len().max(1);
        match op % 7 {
            0 => h.accept(),
            1 | 2 if !h.conns.is_empty() => {
                let len = usize::from(next(&mut i));
                let end = (i + len).min(data.len());
                let chunk = data[i.min(end)..end].to_vec();
                i = end;
                h.drive(k, &chunk);
            }
            3 => {
                h.now = h.now + Duration::from_millis(u64::from(op) * 1000);
                for (c, _) in &h.conns {
                    h.r.handle_timeout(h.now, *c);
                }
                h.answer_logins();
            }
            4 if !h.conns.is_empty() => {
                let (c, _) = h.conns.swap_remove(k);
                h.r.closed(c);
            }
            5 if !h.conns.is_empty() => h.flush(k),
            6 if !h.conns.is_empty() => {
                if let Some(p) = h.r.hand_out(h.conns[k].0) {
                    h.r.handback_mut().0.push(p);
                }
            }
            _ => {}
        }
        assert_eq!(h.r.connection_count(), h.conns.len());
        assert!(h.r.terminal_count() <= h.conns.len());
        while h.r.poll_event().is_some() {}
    }
});
