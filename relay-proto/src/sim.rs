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
//! Applications are simple roles ([`Role`]); tests script clients through [`Sim`]'s
//! methods and check what each terminal received.

use std::collections::{BTreeMap, VecDeque};
use std::vec::Vec;

use crate::codes::RejectReason;
use crate::frame::Credential;
use crate::ident::{Password, ResumeToken, ServiceName, Text, UserId};
use crate::relay::{self, AllowAll, ConnId, Heap, Policy, Refusal, Relay, Verdict};
use crate::rng::Jitter;
use crate::terminal::{self, Event, Handle, Offer, Terminal};
use crate::time::{Duration, Instant};

/// Connections per simulated terminal.
pub const CONNS: usize = 4;
type Term = Terminal<CONNS, 16>;

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
    pub terminal: Term,
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

/// A relay, its terminals and the pipes between them.
pub struct Sim<P: Policy = AllowAll> {
    pub now: Instant,
    pub relay: Relay<Heap, P>,
    pub nodes: Vec<Node>,
    pub accounts: BTreeMap<UserId, Password>,
    /// Largest chunk one delivery carries.
    pub max_chunk: usize,
    links: Vec<Link>,
    rng: Jitter,
    instances: u64,
    /// Relay events seen, in order.
    pub relay_events: Vec<relay::Event>,
    /// Connections woken but not flushed yet: like a host whose writer task pulls
    /// output later, not at once.
    deferred: Vec<ConnId>,
}

impl<P: Policy> core::fmt::Debug for Sim<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now)
            .field("links", &self.links.len())
            .finish()
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

impl<P: Policy> Sim<P> {
    pub fn with(seed: u64, config: relay::Config, policy: P) -> Self {
        Sim {
            now: Instant::from_secs(1),
            relay: Relay::new(config, policy),
            nodes: Vec::new(),
            accounts: BTreeMap::new(),
            max_chunk: 64,
            links: Vec::new(),
            rng: Jitter::new(seed),
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
        let mut terminal = Term::new(config, user, password, seed);
        terminal.start(self.now);
        self.nodes.push(Node {
            terminal,
            role,
            paused: false,
            events: Vec::new(),
            received: BTreeMap::new(),
            outbox: BTreeMap::new(),
            sessions: BTreeMap::new(),
            at_peer_end: BTreeMap::new(),
        });
        let i = self.nodes.len() - 1;
        self.drain_node(i);
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
            .filter_map(|n| n.terminal.poll_timeout());
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
                    .terminal
                    .poll_timeout()
                    .is_some_and(|d| d <= now)
            {
                self.nodes[i].terminal.handle_timeout(now);
                self.drain_node(i);
            }
        }
        true
    }

    fn link_of_conn(&self, conn: ConnId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| l.relay_open && l.conn == conn)
    }

    fn link_of_handle(&self, node: usize, h: Handle) -> Option<usize> {
        self.links
            .iter()
            .position(|l| l.term_open && l.node == node && l.handle == h)
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
        let conn = l.conn;
        let eof = l.up.bytes.is_empty() && l.up.closed;
        let mut rx = core::mem::take(&mut self.links[i].relay_rx);
        let mut pos = 0;
        while pos < rx.len() {
            // Hosts may flush the receiver before offering payload (to reserve room
            // there first) or after `Forward`: both orders are part of the contract.
            let flush_first = self.rng.next_u32() & 1 == 0;
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
                Offer_::NeedMore => break,
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
    }

    /// Writes the relay's pending output for `conn` into its down pipe.
    fn flush_relay(&mut self, conn: ConnId) {
        let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
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

    /// Relay → terminal.
    fn deliver_down(&mut self, i: usize) {
        let chunk = 1 + self.random(self.max_chunk);
        let l = &mut self.links[i];
        let n = chunk.min(l.down.bytes.len());
        l.term_rx.extend(l.down.bytes.drain(..n));
        let (node, h) = (l.node, l.handle);
        let eof = l.down.bytes.is_empty() && l.down.closed;
        let mut rx = core::mem::take(&mut self.links[i].term_rx);
        let mut pos = 0;
        while pos < rx.len() {
            let offer = self.nodes[node]
                .terminal
                .handle_input(h, self.now, &rx[pos..]);
            match offer {
                Offer::Consumed(n) => pos += n,
                Offer::Payload(n) => {
                    self.on_payload(node, h, &rx[pos..pos + n]);
                    pos += n;
                }
                Offer::NeedMore => break,
            }
            self.drain_node(node);
        }
        rx.drain(..pos);
        if let Some(i) = self.link_of_handle(node, h) {
            self.links[i].term_rx = rx;
            if eof {
                self.links[i].term_open = false;
                self.links[i].up.closed = true;
                self.nodes[node].terminal.transport_closed(h, self.now);
                self.drain_node(node);
                self.gc_links();
            }
        }
    }

    fn on_payload(&mut self, node: usize, h: Handle, bytes: &[u8]) {
        let n = &mut self.nodes[node];
        n.received.entry(h.0).or_default().extend_from_slice(bytes);
        if n.role == Role::Echo {
            n.outbox.entry(h.0).or_default().0.extend(bytes);
        }
    }

    /// Handles a node's events and writes its output (control first, then payload).
    fn drain_node(&mut self, i: usize) {
        while let Some(e) = self.nodes[i].terminal.poll_event() {
            let now = self.now;
            let node = &mut self.nodes[i];
            match &e {
                Event::Open(h) => {
                    if let Ok(conn) = self.relay.accept(now) {
                        self.links.push(Link {
                            node: i,
                            handle: *h,
                            conn,
                            up: Pipe::default(),
                            down: Pipe::default(),
                            relay_rx: Vec::new(),
                            term_rx: Vec::new(),
                            down_check: FrameCheck::default(),
                            relay_open: true,
                            term_open: true,
                        });
                        node.terminal.connected(*h, now);
                    } else {
                        node.terminal.connect_failed(*h, now);
                    }
                }
                Event::Closed { handle, .. } => {
                    node.outbox.remove(&handle.0);
                    if let Some(j) = self.link_of_handle(i, *handle) {
                        // The terminal's socket is gone: the link now only carries EOF up.
                        let l = &mut self.links[j];
                        l.up.closed = true;
                        l.down.bytes.clear();
                        l.term_open = false;
                    }
                }
                Event::Notice {
                    handle, session, ..
                } => match node.role {
                    Role::Echo => {
                        node.received.insert(handle.0, Vec::new());
                        node.sessions.insert(handle.0, *session);
                        let _ = node.terminal.accept(*handle, now);
                    }
                    Role::Reject(reason) => {
                        let _ = node.terminal.reject(*handle, reason, Text::lossy("no"));
                    }
                    Role::Sink => {
                        let _ =
                            node.terminal
                                .reject(*handle, RejectReason::Busy, Text::lossy("busy"));
                    }
                    Role::Ignore => {}
                },
                Event::Accepted {
                    handle, session, ..
                } => {
                    node.received.insert(handle.0, Vec::new());
                    node.sessions.insert(handle.0, *session);
                }
                // No session: payload queued for it has nowhere to go.
                Event::DemandFailed { handle, .. } | Event::SessionEnded { handle, .. } => {
                    node.outbox.remove(&handle.0);
                }
                Event::PeerTerminated { handle } => {
                    if let Some(s) = node.sessions.get(&handle.0) {
                        let got = node.received.get(&handle.0).cloned().unwrap_or_default();
                        node.at_peer_end.insert(*s, got);
                    }
                    if node.role == Role::Echo {
                        node.outbox.entry(handle.0).or_default().1 = true;
                    }
                }
                _ => {}
            }
            self.nodes[i].events.push(e);
        }
        self.flush_node(i);
    }

    /// Writes node `i`'s control output and queued payload into its up pipes.
    fn flush_node(&mut self, i: usize) {
        let mut buf = [0u8; terminal::MIN_TRANSMIT_BUF];
        for j in 0..self.links.len() {
            if self.links[j].node != i || !self.links[j].term_open || self.links[j].up.closed {
                continue;
            }
            let h = self.links[j].handle;
            let node = &mut self.nodes[i];
            if let Ok(n) = node.terminal.poll_transmit(h, self.now, &mut buf) {
                self.links[j].up.bytes.extend(&buf[..n]);
            }
            let max = node
                .terminal
                .max_payload()
                .min(1 + self.rng.next_u32() as usize % 3000);
            let Some((queue, end)) = node.outbox.get_mut(&h.0) else {
                continue;
            };
            while !queue.is_empty() {
                let len = queue.len().min(max);
                let Ok(header) = node.terminal.send_data(h, len) else {
                    break;
                };
                let up = &mut self.links[j].up.bytes;
                up.extend(header);
                up.extend(queue.drain(..len));
            }
            if queue.is_empty() && *end {
                node.outbox.remove(&h.0);
                if node.terminal.terminate(h).is_ok()
                    && let Ok(n) = node.terminal.poll_transmit(h, self.now, &mut buf)
                {
                    self.links[j].up.bytes.extend(&buf[..n]);
                }
            }
        }
        // poll_transmit may have finished a connection (LOGOUT written).
        while self.nodes[i].terminal.poll_event().is_some_and(|e| {
            self.nodes[i].events.push(e);
            true
        }) {}
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
        let h = self.nodes[i].terminal.demand(target, service)?;
        self.drain_node(i);
        Ok(h)
    }

    /// Queues payload on node `i`'s session `h`; `end`: terminate once it is out.
    pub fn send(&mut self, i: usize, h: Handle, bytes: &[u8], end: bool) {
        let entry = self.nodes[i].outbox.entry(h.0).or_default();
        entry.0.extend(bytes);
        entry.1 |= end;
        self.drain_node(i);
    }

    pub fn logout(&mut self, i: usize) {
        self.nodes[i].terminal.logout(self.now);
        self.drain_node(i);
    }

    pub fn request_online(&mut self, i: usize, cursor: u32) -> Result<Handle, terminal::SendError> {
        let h = self.nodes[i].terminal.request_online(cursor)?;
        self.drain_node(i);
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

use crate::relay::Offer as Offer_;
