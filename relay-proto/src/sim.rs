//! In-memory simulation: many terminals wired to one relay core through byte pipes, with
//! a simulated clock and a seeded scheduler. No sockets, no sleeping, fully reproducible.
//!
//! Every step the scheduler picks one pipe with bytes in flight and delivers a random
//! chunk of them (down to a single byte), so frames arrive split at every possible place
//! and connections progress in an arbitrary interleaving (TCP keeps order within one
//! connection, so the pipes do too). When nothing is in flight the clock jumps to the
//! earliest deadline. The relay side follows the forwarding contract exactly as a host
//! must: on `Forward { to, n }` it writes `poll_transmit(to)` first, then the payload.
//!
//! Each terminal runs the one terminal driver every binding runs ([`Driver`]), over the
//! pipes as its [`Link`](crate::driver::Link): bounded ([`Sim::pipe_capacity`]) and, if
//! asked, failing writes ([`Sim::write_errors_per_mille`]). Applications are simple roles
//! ([`Role`]) served through the driver's [`Service`]; tests script clients through
//! [`Sim`]'s methods and check what each terminal received.

use std::collections::{BTreeMap, VecDeque};
use std::vec::Vec;

use crate::codes::RejectReason;
use crate::driver::{self, Decision, Driver, LinkError, LinkState, Service, Session};
use crate::frame::Credential;
use crate::ident::{Password, ResumeToken, ServiceName, UserId};
use crate::relay::{
    self, AllowAll, ConnId, Handback, Heap, Pair, PairOffer, Policy, Refusal, Relay, Storage,
    Verdict,
};
use crate::rng::Jitter;
use crate::terminal::{self, Event, Handle, Terminal};
use crate::time::{Duration, Instant};

/// Connections per simulated terminal.
pub const CONNS: usize = 4;

/// What a terminal's application does with notices and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts every notice and echoes what it receives; terminates when the peer does.
    Echo,
    /// Rejects every notice with this reason.
    Reject(RejectReason),
    /// Never answers notices.
    Ignore,
    /// A client: rejects notices (busy), keeps what it receives, echoes nothing.
    Sink,
}

/// One direction of one TCP connection.
#[derive(Debug, Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    /// The writer closed: after the bytes, the reader sees end of stream.
    closed: bool,
}

/// A TCP connection between a terminal's handle and a relay connection.
#[derive(Debug)]
struct Link {
    node: usize,
    handle: Handle,
    conn: ConnId,
    up: Pipe,
    down: Pipe,
    /// Bytes a receiver was offered but could not use yet (`NeedMore`).
    relay_rx: Vec<u8>,
    term_rx: Vec<u8>,
    down_check: FrameCheck,
    /// Each end's socket is open; a link is dropped once both are closed.
    relay_open: bool,
    term_open: bool,
}

/// Follows a relay → terminal stream as it is written and checks that it is well framed:
/// payload goes only where a DATA header announced it, frames only between payloads.
#[derive(Debug, Default)]
struct FrameCheck {
    pending: Vec<u8>,
    payload_left: usize,
}

impl FrameCheck {
    fn push(&mut self, bytes: &[u8], is_payload: bool) -> Result<(), std::string::String> {
        if is_payload {
            if bytes.len() > self.payload_left {
                return Err(std::format!(
                    "{} payload bytes written where {} were announced",
                    bytes.len(),
                    self.payload_left
                ));
            }
            self.payload_left -= bytes.len();
            return Ok(());
        }
        if self.payload_left > 0 && !bytes.is_empty() {
            return Err(std::format!(
                "frames written inside a payload ({} bytes still due): {bytes:02x?}",
                self.payload_left
            ));
        }
        self.pending.extend_from_slice(bytes);
        let mut pos = 0;
        while pos < self.pending.len() {
            match crate::frame::parse(&self.pending[pos..]) {
                Ok(Some((crate::frame::Parsed::DataHeader { len }, n))) => {
                    pos += n;
                    if pos != self.pending.len() {
                        return Err("bytes after a DATA header in the same write".into());
                    }
                    self.payload_left = usize::from(len);
                }
                Ok(Some((_, n))) => pos += n,
                Ok(None) => return Err("a partial frame written".into()),
                Err(e) => return Err(std::format!("undecodable frame written: {e:?}")),
            }
        }
        self.pending.clear();
        Ok(())
    }
}

impl Link {
    /// Appends relay output (or forwarded payload) to the terminal's pipe, checking that
    /// the stream stays well framed: the forwarding contract's invariant.
    fn append_down(&mut self, bytes: &[u8], is_payload: bool) {
        if let Err(e) = self.down_check.push(bytes, is_payload) {
            panic!("relay output to {:?} broke framing: {e}", self.conn);
        }
        self.down.bytes.extend(bytes);
    }

    fn up_ready(&self) -> bool {
        self.relay_open && (!self.up.bytes.is_empty() || self.up.closed)
    }
    fn down_ready(&self) -> bool {
        self.term_open && (!self.down.bytes.is_empty() || self.down.closed)
    }
}

/// A simulated device.
#[derive(Debug)]
pub struct Node {
    driver: Driver<CONNS>,
    pub role: Role,
    /// A paused node does nothing at all: it reads nothing, sends nothing, runs no timer.
    pub paused: bool,
    /// Events seen, in order (for assertions).
    pub events: Vec<Event>,
    /// Payload received per session handle since its session started.
    pub received: BTreeMap<u8, Vec<u8>>,
    /// Payload waiting to be sent per handle, and whether to terminate once it is out.
    outbox: BTreeMap<u8, (VecDeque<u8>, bool)>,
    /// Session id on each handle that carries one.
    pub sessions: BTreeMap<u8, u32>,
    /// What had arrived in each session when the peer's TERMINATE came, by session id.
    pub at_peer_end: BTreeMap<u32, Vec<u8>>,
}

/// A relay, its terminals and the pipes between them. The relay keeps its tables in
/// `S`: growing ones, or the fixed ones of a no_std relay.
pub struct Sim<P: Policy = AllowAll, S: Storage = Heap> {
    pub now: Instant,
    pub relay: Relay<S, P, Pairs>,
    pub nodes: Vec<Node>,
    pub accounts: BTreeMap<UserId, Password>,
    /// Largest chunk one delivery carries.
    pub max_chunk: usize,
    /// Bytes a terminal → relay pipe holds; a terminal writes only what fits.
    pub pipe_capacity: usize,
    /// Chance, per thousand, that a terminal's write fails (its connection then closes).
    pub write_errors_per_mille: u32,
    links: Vec<Link>,
    rng: Jitter,
    /// When the host hands a running session out ([`Pairs`]): a stream of its own, so
    /// that the other choices of a seed stay what they were.
    hand_outs: Jitter,
    /// Sessions handed out so far (each may be taken back and handed out again).
    pub pairs_handed: u64,
    /// Sessions whose two TERMINATEs both went through their pair
    /// ([`PairOffer::Finished`]): the router ended them when it got the pair back.
    pub pairs_finished: u64,
    instances: u64,
    /// Relay events seen, in order.
    pub relay_events: Vec<relay::Event>,
    /// Connections woken but not flushed yet: like a host whose writer task pulls
    /// output later, not at once.
    deferred: Vec<ConnId>,
}

impl<P: Policy, S: Storage> core::fmt::Debug for Sim<P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now)
            .field("links", &self.links.len())
            .finish()
    }
}

/// The pairs the simulated host took out of the router ([`Relay::hand_out`]), kept where
/// the router asks for them back, as relay-host keeps its links. The host hands a running
/// session out at random moments, so every run mixes both data paths.
#[derive(Debug, Default)]
pub struct Pairs(Vec<Pair>);

impl Handback for Pairs {
    fn take(&mut self, conn: ConnId) -> Option<Pair> {
        let i = self.0.iter().position(|p| p.conns().contains(&conn))?;
        Some(self.0.swap_remove(i))
    }
}

/// A token the simulated host accepts: the instance number, readable.
fn token_for(instance: u64) -> ResumeToken {
    ResumeToken::from_slice(&instance.to_be_bytes()).unwrap_or_default()
}

impl Sim<AllowAll> {
    pub fn new(seed: u64) -> Self {
        Sim::with(seed, relay::Config::default(), AllowAll)
    }
}

impl<P: Policy, S: Storage> Sim<P, S> {
    pub fn with(seed: u64, config: relay::Config, policy: P) -> Self {
        Sim {
            now: Instant::from_secs(1),
            relay: Relay::new(config, policy),
            nodes: Vec::new(),
            accounts: BTreeMap::new(),
            max_chunk: 64,
            pipe_capacity: usize::MAX,
            write_errors_per_mille: 0,
            links: Vec::new(),
            rng: Jitter::new(seed),
            hand_outs: Jitter::new(!seed),
            pairs_handed: 0,
            pairs_finished: 0,
            instances: 0,
            relay_events: Vec::new(),
            deferred: Vec::new(),
        }
    }

    /// Adds an account and a terminal for it, started. Returns the node index.
    pub fn add(&mut self, user: &str, role: Role, config: terminal::Config) -> usize {
        let user = UserId::new(user).expect("valid test user");
        let password = Password::new("secret").expect("valid");
        self.accounts.insert(user.clone(), password.clone());
        let seed = u64::from(self.rng.next_u32());
        let mut driver = Driver::new(config, user, password, seed);
        driver.start(self.now);
        self.nodes.push(Node {
            driver,
            role,
            paused: false,
            events: Vec::new(),
            received: BTreeMap::new(),
            outbox: BTreeMap::new(),
            sessions: BTreeMap::new(),
            at_peer_end: BTreeMap::new(),
        });
        let i = self.nodes.len() - 1;
        self.poll_node(i);
        i
    }

    fn random(&mut self, below: usize) -> usize {
        (self.rng.next_u32() as usize) % below.max(1)
    }

    /// Delivers one chunk on one pipe, or advances the clock. Returns false when nothing
    /// at all is left to do (no bytes in flight and no deadline).
    pub fn step(&mut self) -> bool {
        for conn in core::mem::take(&mut self.deferred) {
            self.flush_relay(conn);
            self.drain_relay();
        }
        let busy: Vec<(usize, bool)> = self
            .links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let paused = self.nodes[l.node].paused;
                [
                    (i, true, l.up_ready() && !paused),
                    (i, false, l.down_ready() && !paused),
                ]
            })
            .filter(|&(_, _, ready)| ready)
            .map(|(i, up, _)| (i, up))
            .collect();
        if busy.is_empty() {
            // Deferred flushes first: the clock only moves when nothing else can.
            return !self.deferred.is_empty() || self.advance_clock();
        }
        let (i, up) = busy[self.random(busy.len())];
        if up {
            self.deliver_up(i);
        } else {
            self.deliver_down(i);
        }
        true
    }

    /// Runs until nothing is in flight and the clock has reached `until`, or `max_steps`.
    /// Returns the steps taken.
    pub fn run_until(&mut self, until: Instant, max_steps: usize) -> usize {
        for n in 0..max_steps {
            if !self.in_flight() && self.next_deadline().is_none_or(|d| d > until) {
                self.now = self.now.max(until);
                return n;
            }
            self.step();
        }
        max_steps
    }

    /// Runs until no bytes are in flight (timers are not advanced past what that needs).
    pub fn settle(&mut self, max_steps: usize) -> usize {
        self.run_until(self.now, max_steps)
    }

    pub fn in_flight(&self) -> bool {
        !self.deferred.is_empty()
            || self
                .links
                .iter()
                .any(|l| !self.nodes[l.node].paused && (l.up_ready() || l.down_ready()))
    }

    fn next_deadline(&self) -> Option<Instant> {
        let relay = self
            .links
            .iter()
            .filter(|l| l.relay_open)
            .filter_map(|l| self.relay.poll_timeout(l.conn));
        let nodes = self
            .nodes
            .iter()
            .filter(|n| !n.paused)
            .filter_map(|n| n.terminal().poll_timeout());
        relay.chain(nodes).min()
    }

    fn advance_clock(&mut self) -> bool {
        let Some(t) = self.next_deadline() else {
            return false;
        };
        self.now = self.now.max(t);
        let now = self.now;
        let conns: Vec<ConnId> = self
            .links
            .iter()
            .filter(|l| l.relay_open)
            .map(|l| l.conn)
            .collect();
        for c in conns {
            if self.relay.poll_timeout(c).is_some_and(|d| d <= now) {
                self.relay.handle_timeout(now, c);
                self.drain_relay();
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].paused
                && self.nodes[i]
                    .terminal()
                    .poll_timeout()
                    .is_some_and(|d| d <= now)
            {
                self.poll_node(i);
            }
        }
        true
    }

    fn link_of_conn(&self, conn: ConnId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| l.relay_open && l.conn == conn)
    }

    fn gc_links(&mut self) {
        self.links.retain(|l| l.relay_open || l.term_open);
    }

    /// Terminal → relay.
    fn deliver_up(&mut self, i: usize) {
        let chunk = 1 + self.random(self.max_chunk);
        let l = &mut self.links[i];
        let n = chunk.min(l.up.bytes.len());
        l.relay_rx.extend(l.up.bytes.drain(..n));
        let (conn, node) = (l.conn, l.node);
        let eof = l.up.bytes.is_empty() && l.up.closed;
        let mut rx = core::mem::take(&mut self.links[i].relay_rx);
        let mut pos = 0;
        while pos < rx.len() {
            // Hosts may flush the receiver before offering payload (to reserve room
            // there first) or after `Forward`: both orders are part of the contract.
            let flush_first = self.rng.next_u32() & 1 == 0;
            if self.hand_outs.next_u32() & 1 == 0
                && let Some(pair) = self.relay.hand_out(conn)
            {
                self.pairs_handed += 1;
                self.relay.handback_mut().0.push(pair);
            }
            if let Some(n) = self.offer_pair(conn, &rx[pos..], flush_first) {
                match n {
                    Some(n) => pos += n,
                    None => break,
                }
                continue;
            }
            if flush_first && let Some((to, _)) = self.relay.forward_target(conn) {
                self.flush_relay(to);
            }
            match self.relay.handle_input(self.now, conn, &rx[pos..]) {
                Offer_::Consumed(n) => pos += n,
                Offer_::Forward { to, n } => {
                    if !flush_first {
                        self.flush_relay(to);
                    }
                    if let Some(j) = self.link_of_conn(to) {
                        self.links[j].append_down(&rx[pos..pos + n], true);
                    }
                    pos += n;
                }
                // Held bytes (behind a LOGIN) wait for the next delivery, as a host
                // offers them again at the verdict's wake (the sim answers at once).
                Offer_::NeedMore | Offer_::Hold => break,
            }
            self.drain_relay();
        }
        rx.drain(..pos);
        if let Some(i) = self.link_of_conn(conn) {
            self.links[i].relay_rx = rx;
            if eof {
                // End of stream from the terminal: the relay closes its side.
                let l = &mut self.links[i];
                l.relay_open = false;
                l.down.closed = true;
                self.relay.closed(conn);
                self.drain_relay();
                self.gc_links();
            }
        }
        if self.pipe_capacity != usize::MAX && n > 0 {
            // Room in a bounded pipe: the terminal may write what waited for it.
            self.poll_node(node);
        }
    }

    fn pair_of(&mut self, conn: ConnId) -> Option<&mut Pair> {
        let pairs = &mut self.relay.handback_mut().0;
        pairs.iter_mut().find(|p| p.conns().contains(&conn))
    }

    /// Offers `rx` to `conn`'s handed-out pair, if it has one and the pair takes the
    /// frame: `Some(Some(n))` bytes handled, `Some(None)` a partial frame; `None`: the
    /// router's (no pair, or a frame the pair leaves to it).
    fn offer_pair(&mut self, conn: ConnId, rx: &[u8], flush_first: bool) -> Option<Option<usize>> {
        let target = self.pair_of(conn)?.forward_target(conn);
        if flush_first && let Some((to, _)) = target {
            self.flush_relay(to);
        }
        let now = self.now;
        let offer = self.pair_of(conn)?.handle_input(now, conn, rx);
        let done = match offer {
            PairOffer::Consumed(n) => Some(Some(n)),
            PairOffer::Forward { to, n } => {
                if !flush_first {
                    self.flush_relay(to);
                }
                if let Some(j) = self.link_of_conn(to) {
                    self.links[j].append_down(&rx[..n], true);
                }
                Some(Some(n))
            }
            PairOffer::NeedMore => Some(None),
            PairOffer::Router => None,
            PairOffer::Finished(n) => {
                self.pairs_finished += 1;
                self.pair_wakes();
                self.give_back(conn);
                return Some(Some(n));
            }
        };
        self.pair_wakes();
        done
    }

    /// `conn`'s pair is finished: back to the router, which ends the session. Either
    /// way a host may do it: handing the pair over, or having the router take it back.
    fn give_back(&mut self, conn: ConnId) {
        if self.hand_outs.next_u32() & 1 == 0 {
            if let Some(pair) = self.relay.handback_mut().take(conn) {
                self.relay.give_back(pair);
            }
        } else {
            self.relay.take_back(conn);
        }
        self.drain_relay();
    }

    /// The pairs' wakes, handled as the router's [`relay::Event::Wake`]s are.
    fn pair_wakes(&mut self) {
        let mut woken = Vec::new();
        for p in &mut self.relay.handback_mut().0 {
            while let Some(c) = p.poll_wake() {
                woken.push(c);
            }
        }
        for c in woken {
            if self.rng.next_u32() & 1 == 0 {
                self.flush_relay(c);
            } else {
                self.deferred.push(c);
            }
        }
    }

    /// Writes the relay's pending output for `conn` into its down pipe.
    fn flush_relay(&mut self, conn: ConnId) {
        let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
        if let Some(pair) = self.pair_of(conn) {
            let n = pair.poll_transmit(conn, &mut buf).unwrap_or(0);
            if let Some(j) = self.link_of_conn(conn) {
                self.links[j].append_down(&buf[..n], false);
            }
            return self.pair_wakes();
        }
        let Ok(t) = self.relay.poll_transmit(conn, &mut buf) else {
            return;
        };
        let Some(j) = self.link_of_conn(conn) else {
            return;
        };
        self.links[j].append_down(&buf[..t.len], false);
        if t.close {
            let l = &mut self.links[j];
            l.down.closed = true;
            // The relay's socket is gone: bytes still in the up pipe are lost.
            l.up.bytes.clear();
            l.relay_open = false;
            self.relay.closed(conn);
        }
    }

    fn drain_relay(&mut self) {
        while let Some(e) = self.relay.poll_event() {
            match &e {
                relay::Event::Wake(c) => {
                    if self.rng.next_u32() & 1 == 0 {
                        self.flush_relay(*c);
                    } else {
                        self.deferred.push(*c);
                    }
                }
                relay::Event::Authenticate {
                    conn,
                    user,
                    credential,
                    ..
                } => {
                    let verdict = self.check(user, credential);
                    self.relay.login_verdict(self.now, *conn, verdict);
                }
                _ => {}
            }
            self.relay_events.push(e);
        }
    }

    /// The simulated account store: passwords, and tokens that carry the instance.
    fn check(&mut self, user: &UserId, credential: &Credential) -> Verdict {
        match credential {
            Credential::Password(p) if self.accounts.get(user) == Some(p) => {
                self.instances += 1;
                Verdict::Accept {
                    instance: self.instances,
                    token: token_for(self.instances),
                }
            }
            Credential::Resume(t)
                if self.accounts.contains_key(user) && t.as_bytes().len() == 8 =>
            {
                let mut b = [0u8; 8];
                b.copy_from_slice(t.as_bytes());
                let instance = u64::from_be_bytes(b);
                Verdict::Accept {
                    instance,
                    token: t.clone(),
                }
            }
            Credential::Password(_) | Credential::Resume(_) => {
                Verdict::Refuse(Refusal::BadCredential)
            }
        }
    }

    /// Relay → terminal: a chunk reaches the terminal's socket, and its driver runs.
    fn deliver_down(&mut self, i: usize) {
        let chunk = 1 + self.random(self.max_chunk);
        let l = &mut self.links[i];
        let n = chunk.min(l.down.bytes.len());
        l.term_rx.extend(l.down.bytes.drain(..n));
        let node = l.node;
        self.poll_node(node);
    }

    /// Runs node `i`'s driver once: events, received bytes, timers, output.
    fn poll_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut app = App {
            role: node.role,
            events: &mut node.events,
            received: &mut node.received,
            outbox: &mut node.outbox,
            sessions: &mut node.sessions,
            at_peer_end: &mut node.at_peer_end,
        };
        let mut pipes = Pipes {
            node: i,
            now: self.now,
            links: &mut self.links,
            relay: &mut self.relay,
            rng: &mut self.rng,
            capacity: self.pipe_capacity,
            write_errors_per_mille: self.write_errors_per_mille,
        };
        node.driver.poll(self.now, &mut pipes, &mut app);
        self.gc_links();
    }

    /// Node `i` asks for a session with `target`. Returns the handle carrying it.
    pub fn demand(
        &mut self,
        i: usize,
        target: &str,
        service: &str,
    ) -> Result<Handle, terminal::SendError> {
        let target = UserId::new(target).expect("valid target");
        let service = ServiceName::new(service).expect("valid service");
        let h = self.nodes[i].driver.demand(target, service, self.now)?;
        self.poll_node(i);
        Ok(h)
    }

    /// Queues payload on node `i`'s session `h`; `end`: terminate once it is out.
    pub fn send(&mut self, i: usize, h: Handle, bytes: &[u8], end: bool) {
        let entry = self.nodes[i].outbox.entry(h.0).or_default();
        entry.0.extend(bytes);
        entry.1 |= end;
        self.poll_node(i);
    }

    pub fn logout(&mut self, i: usize) {
        self.nodes[i].driver.logout(self.now);
        self.poll_node(i);
    }

    pub fn request_online(&mut self, i: usize, cursor: u32) -> Result<Handle, terminal::SendError> {
        let h = self.nodes[i].driver.terminal_mut().request_online(cursor)?;
        self.poll_node(i);
        Ok(h)
    }

    /// Kills node `i` abruptly: no FIN, no RST, it just goes silent (a hung device or a
    /// cut cable). Its pipes keep what was in flight.
    pub fn pause(&mut self, i: usize) {
        self.nodes[i].paused = true;
    }

    /// Restarts the relay: every connection drops (terminals see end of stream) and the
    /// core comes back empty.
    pub fn restart_relay(&mut self, config: relay::Config, policy: P) {
        self.relay = Relay::new(config, policy);
        for l in &mut self.links {
            l.down.bytes.clear();
            l.down.closed = true;
            l.up.bytes.clear();
            l.relay_open = false;
        }
        self.gc_links();
    }

    /// Connections open between node `i` and the relay.
    pub fn links_of(&self, i: usize) -> usize {
        self.links
            .iter()
            .filter(|l| l.node == i && l.term_open)
            .count()
    }

    /// A line per link of node `i`, for failure messages.
    pub fn describe_links(&self, i: usize) -> std::string::String {
        use core::fmt::Write;
        let mut out = std::string::String::new();
        for l in self.links.iter().filter(|l| l.node == i) {
            let _ = writeln!(
                out,
                "{:?} {:?} relay_open={} term_open={} up={}{} down={}{} deadline={:?} now={:?} {:?}",
                l.handle,
                l.conn,
                l.relay_open,
                l.term_open,
                l.up.bytes.len(),
                if l.up.closed { "+eof" } else { "" },
                l.down.bytes.len(),
                if l.down.closed { "+eof" } else { "" },
                self.relay.poll_timeout(l.conn),
                self.now,
                self.relay.conn_entry(l.conn)
            );
        }
        out
    }

    /// Connections the relay still holds open for node `i`.
    pub fn relay_links_of(&self, i: usize) -> usize {
        self.links
            .iter()
            .filter(|l| l.node == i && l.relay_open)
            .count()
    }

    /// Advances the clock by `d`, running everything that falls due.
    pub fn sleep(&mut self, d: Duration, max_steps: usize) -> usize {
        let until = self.now + d;
        self.run_until(until, max_steps)
    }
}

impl Node {
    pub fn terminal(&self) -> &Terminal<CONNS> {
        self.driver.terminal()
    }
}

/// A node's application as the driver's [`Service`]: the role's answers, and the
/// records tests check.
struct App<'a> {
    role: Role,
    events: &'a mut Vec<Event>,
    received: &'a mut BTreeMap<u8, Vec<u8>>,
    outbox: &'a mut BTreeMap<u8, (VecDeque<u8>, bool)>,
    sessions: &'a mut BTreeMap<u8, u32>,
    at_peer_end: &'a mut BTreeMap<u32, Vec<u8>>,
}

impl Service for App<'_> {
    fn on_notice(&mut self, _: Handle, _: &UserId, _: &ServiceName) -> Decision {
        match self.role {
            Role::Echo => Decision::Accept,
            Role::Reject(reason) => Decision::Reject(reason),
            Role::Sink => Decision::Reject(RejectReason::Busy),
            Role::Ignore => Decision::Ignore,
        }
    }

    fn on_open(&mut self, s: &mut Session<'_>) {
        let h = s.handle().0;
        self.received.insert(h, Vec::new());
        if let Some(id) = s.id() {
            self.sessions.insert(h, id);
        }
    }

    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        let h = s.handle().0;
        self.received.entry(h).or_default().extend_from_slice(data);
        if self.role == Role::Echo {
            self.outbox.entry(h).or_default().0.extend(data);
        }
        data.len()
    }

    /// Writes queued payload as far as the pipe takes it; terminates once it is out.
    fn on_writable(&mut self, s: &mut Session<'_>) {
        let h = s.handle().0;
        let Some((queue, end)) = self.outbox.get_mut(&h) else {
            return;
        };
        while !queue.is_empty() {
            let n = s.write(queue.as_slices().0);
            if n == 0 {
                return;
            }
            queue.drain(..n);
        }
        if *end {
            self.outbox.remove(&h);
            s.terminate();
        }
    }

    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        let h = s.handle().0;
        if let Some(id) = self.sessions.get(&h) {
            let got = self.received.get(&h).cloned().unwrap_or_default();
            self.at_peer_end.insert(*id, got);
        }
        if self.role == Role::Echo {
            self.outbox.entry(h).or_default().1 = true;
        }
    }

    fn on_event(&mut self, e: &Event) {
        // No session: payload queued for it has nowhere to go.
        if let Event::Closed { handle, .. }
        | Event::DemandFailed { handle, .. }
        | Event::SessionEnded { handle, .. } = e
        {
            self.outbox.remove(&handle.0);
        }
        self.events.push(e.clone());
    }
}

/// One node's ends of the pipes, as its driver's link. Opening a slot is accepting a
/// relay connection at once.
struct Pipes<'a, P: Policy, S: Storage> {
    node: usize,
    now: Instant,
    links: &'a mut Vec<Link>,
    relay: &'a mut Relay<S, P, Pairs>,
    rng: &'a mut Jitter,
    capacity: usize,
    write_errors_per_mille: u32,
}

impl<P: Policy, S: Storage> Pipes<'_, P, S> {
    fn link(&mut self, slot: usize) -> Option<&mut Link> {
        let node = self.node;
        self.links
            .iter_mut()
            .find(|l| l.term_open && l.node == node && usize::from(l.handle.0) == slot)
    }
}

impl<P: Policy, S: Storage> driver::Link for Pipes<'_, P, S> {
    fn open(&mut self, slot: usize) -> Result<(), LinkError> {
        // Whatever the slot held before is dropped, as a socket's `connect` would.
        self.close(slot, false);
        let conn = self.relay.accept(self.now).map_err(|_| LinkError)?;
        self.links.push(Link {
            node: self.node,
            handle: Handle(slot as u8),
            conn,
            up: Pipe::default(),
            down: Pipe::default(),
            relay_rx: Vec::new(),
            term_rx: Vec::new(),
            down_check: FrameCheck::default(),
            relay_open: true,
            term_open: true,
        });
        Ok(())
    }

    fn state(&mut self, slot: usize) -> LinkState {
        match self.link(slot) {
            Some(l) if !(l.down.closed && l.down.bytes.is_empty()) => LinkState::Open,
            _ => LinkState::Closed,
        }
    }

    fn peek(&mut self, slot: usize, buf: &mut [u8]) -> Result<usize, LinkError> {
        let l = self.link(slot).ok_or(LinkError)?;
        if l.term_rx.is_empty() && l.down.closed && l.down.bytes.is_empty() {
            return Err(LinkError);
        }
        let n = l.term_rx.len().min(buf.len());
        buf[..n].copy_from_slice(&l.term_rx[..n]);
        Ok(n)
    }

    fn consume(&mut self, slot: usize, n: usize) {
        if let Some(l) = self.link(slot) {
            l.term_rx.drain(..n.min(l.term_rx.len()));
        }
    }

    fn write(&mut self, slot: usize, bytes: &[u8]) -> Result<(), LinkError> {
        let fail = self.write_errors_per_mille > 0
            && self.rng.next_u32() % 1000 < self.write_errors_per_mille;
        let capacity = self.capacity;
        let l = self.link(slot).ok_or(LinkError)?;
        if fail || l.up.closed || l.up.bytes.len() + bytes.len() > capacity {
            return Err(LinkError);
        }
        l.up.bytes.extend(bytes);
        Ok(())
    }

    fn send_space(&mut self, slot: usize) -> usize {
        let capacity = self.capacity;
        match self.link(slot) {
            Some(l) if !l.up.closed => capacity.saturating_sub(l.up.bytes.len()),
            _ => 0,
        }
    }

    /// The terminal's socket is gone: the link now only carries EOF up.
    fn close(&mut self, slot: usize, _graceful: bool) {
        if let Some(l) = self.link(slot) {
            l.up.closed = true;
            l.down.bytes.clear();
            l.term_open = false;
        }
    }
}

use crate::relay::Offer as Offer_;
