//! relay-embedded over smoltcp, end to end and in-process.
//!
//! Two smoltcp interfaces joined by an in-memory link (IP packets in two queues, with
//! smoltcp's `FaultInjector` on the device side for drops, corruption and size limits).
//! The device side runs two agents: "cam" (the NATed device serving `echo` and `hello`)
//! and "alice" (a client that demands sessions of cam). The relay side is a small host
//! adapter written here: relay-proto's relay core on listening smoltcp sockets, following
//! the forwarding contract of `relay_proto::relay`. The clock is simulated: it advances
//! 1 ms while packets are in flight and jumps to the next deadline otherwise, so every
//! run is the same and a minute of keep-alive costs nothing.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use relay_embedded::{Agent, Decision, Service, Session, SmolTcp, smol_instant};
use relay_proto::codes::{DemandError, ErrorCode, RejectReason};
use relay_proto::frame::Credential;
use relay_proto::ident::{Password, ResumeToken, ServiceName, UserId};
use relay_proto::relay::{self, ConnId, Heap, Offer, Refusal, Relay, Verdict};
use relay_proto::terminal::{self, Cause, Event, Handle};
use relay_proto::time::{Duration, Instant};

use smoltcp::iface::{Config as IfConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, FaultInjector, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

const RELAY_PORT: u16 = 7000;
const DEVICE_IP: Ipv4Address = Ipv4Address::new(192, 0, 2, 2);
const RELAY_IP: Ipv4Address = Ipv4Address::new(192, 0, 2, 1);
/// Socket buffers of the device's relay connections (what a small board would give).
const SOCK_RX: usize = 2048;
const SOCK_TX: usize = 2048;

// ---------------------------------------------------------------- the in-memory link

type Queues = Rc<RefCell<[VecDeque<Vec<u8>>; 2]>>;

/// One end of a point-to-point IP link. `cut` drops everything both ways.
struct LinkEnd {
    queues: Queues,
    side: usize,
    mtu: usize,
    cut: Rc<Cell<bool>>,
}

struct RxTok(Vec<u8>);
struct TxTok {
    queues: Queues,
    to: usize,
    cut: bool,
}

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        if !self.cut {
            self.queues.borrow_mut()[self.to].push_back(buf);
        }
        r
    }
}

impl Device for LinkEnd {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxTok, TxTok)> {
        let packet = self.queues.borrow_mut()[self.side].pop_front()?;
        if self.cut.get() {
            return None;
        }
        Some((RxTok(packet), self.tx()))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxTok> {
        Some(self.tx())
    }
}

impl LinkEnd {
    fn tx(&self) -> TxTok {
        TxTok {
            queues: self.queues.clone(),
            to: 1 - self.side,
            cut: self.cut.get(),
        }
    }
}

fn interface(dev: &mut impl Device, ip: Ipv4Address) -> Interface {
    let mut iface = Interface::new(
        IfConfig::new(HardwareAddress::Ip),
        dev,
        smoltcp::time::Instant::ZERO,
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 24));
    });
    iface
}

fn tcp_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx]),
        tcp::SocketBuffer::new(vec![0; tx]),
    )
}

// ---------------------------------------------------------------- the relay host adapter

enum Slot {
    Listening,
    Live(Conn),
    /// Closed by us; becomes Listening once smoltcp is done with it.
    Retired,
}

struct Conn {
    id: ConnId,
    rx: Vec<u8>,
    out: VecDeque<u8>,
    /// The core said close: close the socket once `out` is written.
    closing: bool,
}

/// The relay: the core on smoltcp sockets, with a simulated account store.
struct RelaySide {
    dev: LinkEnd,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<(SocketHandle, Slot)>,
    core: Relay<Heap>,
    config: relay::Config,
    accounts: HashMap<UserId, Password>,
    /// Instances this relay run handed out (a restart forgets them).
    instances: HashSet<u64>,
    next_instance: u64,
    events: Vec<relay::Event>,
}

impl RelaySide {
    fn new(mut dev: LinkEnd, config: relay::Config) -> Self {
        let iface = interface(&mut dev, RELAY_IP);
        let mut sockets = SocketSet::new(vec![]);
        let slots = (0..24)
            .map(|_| (sockets.add(tcp_socket(8192, 8192)), Slot::Retired))
            .collect();
        let mut accounts = HashMap::new();
        for (u, p) in [("cam", "cam-secret"), ("alice", "alice-secret")] {
            accounts.insert(uid(u), Password::new(p).unwrap());
        }
        let mut r = RelaySide {
            dev,
            iface,
            sockets,
            slots,
            core: Relay::new(config.clone(), relay::AllowAll),
            config,
            accounts,
            instances: HashSet::new(),
            next_instance: 100,
            events: Vec::new(),
        };
        r.listen();
        r
    }

    /// Every free socket listens (a relay listens before any device can connect).
    fn listen(&mut self) {
        for (h, slot) in &mut self.slots {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if matches!(slot, Slot::Retired) && s.state() == tcp::State::Closed {
                s.listen(RELAY_PORT).unwrap();
                s.set_nagle_enabled(false);
                *slot = Slot::Listening;
            }
        }
    }

    /// The relay process dies and starts again: every socket reset, all state gone.
    fn restart(&mut self) {
        for (h, slot) in &mut self.slots {
            self.sockets.get_mut::<tcp::Socket>(*h).abort();
            *slot = Slot::Retired;
        }
        self.core = Relay::new(self.config.clone(), relay::AllowAll);
        self.instances.clear();
        self.listen();
    }

    fn conn_index(&self, id: ConnId) -> Option<usize> {
        self.slots
            .iter()
            .position(|(_, s)| matches!(s, Slot::Live(c) if c.id == id))
    }

    fn live(&mut self, i: usize) -> Option<&mut Conn> {
        match &mut self.slots[i].1 {
            Slot::Live(c) => Some(c),
            _ => None,
        }
    }

    /// Appends `id`'s pending output to its queue (the forwarding contract: before any
    /// payload forwarded to it).
    fn flush(&mut self, id: ConnId) {
        let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
        let Ok(t) = self.core.poll_transmit(id, &mut buf) else {
            return;
        };
        let Some(i) = self.conn_index(id) else { return };
        let c = self.live(i).unwrap();
        c.out.extend(&buf[..t.len]);
        if t.close {
            c.closing = true;
            self.core.closed(id);
        }
    }

    fn drain(&mut self, now: Instant) {
        while let Some(e) = self.core.poll_event() {
            match &e {
                relay::Event::Wake(id) => self.flush(*id),
                relay::Event::Authenticate {
                    conn,
                    user,
                    credential,
                    ..
                } => {
                    let v = self.check(user, credential);
                    self.core.login_verdict(now, *conn, v);
                }
                _ => {}
            }
            self.events.push(e);
        }
    }

    fn check(&mut self, user: &UserId, credential: &Credential) -> Verdict {
        match credential {
            Credential::Password(p) if self.accounts.get(user) == Some(p) => {
                self.next_instance += 1;
                self.instances.insert(self.next_instance);
                Verdict::Accept {
                    instance: self.next_instance,
                    token: ResumeToken::from_slice(&self.next_instance.to_be_bytes()).unwrap(),
                }
            }
            Credential::Resume(t) => {
                let instance = <[u8; 8]>::try_from(t.as_bytes()).map(u64::from_be_bytes);
                match instance {
                    Ok(i) if self.instances.contains(&i) => Verdict::Accept {
                        instance: i,
                        token: t.clone(),
                    },
                    _ => Verdict::Refuse(Refusal::BadCredential),
                }
            }
            Credential::Password(_) => Verdict::Refuse(Refusal::BadCredential),
        }
    }

    /// One round of host work after `iface.poll`.
    fn process(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let h = self.slots[i].0;
            let state = self.sockets.get::<tcp::Socket>(h).state();
            match &self.slots[i].1 {
                Slot::Retired | Slot::Listening if state == tcp::State::Closed => {
                    let s = self.sockets.get_mut::<tcp::Socket>(h);
                    s.listen(RELAY_PORT).unwrap();
                    s.set_nagle_enabled(false);
                    self.slots[i].1 = Slot::Listening;
                }
                Slot::Retired if state == tcp::State::TimeWait => {
                    self.sockets.get_mut::<tcp::Socket>(h).abort();
                }
                Slot::Listening
                    if matches!(state, tcp::State::Established | tcp::State::CloseWait) =>
                {
                    let id = self.core.accept(now).unwrap();
                    self.slots[i].1 = Slot::Live(Conn {
                        id,
                        rx: Vec::new(),
                        out: VecDeque::new(),
                        closing: false,
                    });
                }
                _ => {}
            }
            self.receive(i, now);
        }
        let ids: Vec<ConnId> = self
            .slots
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Live(c) if !c.closing => Some(c.id),
                _ => None,
            })
            .collect();
        for id in ids {
            if self.core.poll_timeout(id).is_some_and(|t| t <= now) {
                self.core.handle_timeout(now, id);
                self.drain(now);
            }
        }
        for i in 0..self.slots.len() {
            self.send(i);
        }
    }

    fn receive(&mut self, i: usize, now: Instant) {
        let h = self.slots[i].0;
        let Slot::Live(c) = &mut self.slots[i].1 else {
            return;
        };
        if c.closing {
            return;
        }
        let id = c.id;
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.recv_slice(&mut buf) {
            if n == 0 {
                break;
            }
            c.rx.extend_from_slice(&buf[..n]);
        }
        let eof = !s.may_recv() && s.recv_queue() == 0;
        let mut rx = std::mem::take(&mut c.rx);
        let mut pos = 0;
        while pos < rx.len() {
            let offer = self.core.handle_input(now, id, &rx[pos..]);
            match offer {
                Offer::Consumed(n) => pos += n,
                Offer::Forward { to, n } => {
                    self.flush(to);
                    if let Some(j) = self.conn_index(to) {
                        self.live(j).unwrap().out.extend(&rx[pos..pos + n]);
                    }
                    pos += n;
                }
                // Held bytes (behind a LOGIN) go again at the next poll, after the verdict.
                Offer::NeedMore | Offer::Hold => break,
            }
            self.drain(now);
        }
        rx.drain(..pos);
        if let Some(c) = self.live(i) {
            c.rx = rx;
            if eof && !c.closing {
                // The terminal closed (or reset): the relay closes its side.
                c.closing = true;
                self.core.closed(id);
                self.drain(now);
            }
        }
    }

    fn send(&mut self, i: usize) {
        let h = self.slots[i].0;
        let Slot::Live(c) = &mut self.slots[i].1 else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        while !c.out.is_empty() && s.can_send() {
            let (a, _) = c.out.as_slices();
            match s.send_slice(a) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
            }
        }
        if c.closing && (c.out.is_empty() || !s.may_send()) {
            s.close();
            self.slots[i].1 = Slot::Retired;
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Live(c) if !c.closing => self.core.poll_timeout(c.id),
                _ => None,
            })
            .min()
    }
}

// ---------------------------------------------------------------- the device's services

/// cam's services: `echo` echoes, `hello` sends a banner of `hello_len` bytes and ends,
/// `secret` is refused, anything else is unknown.
#[derive(Default)]
struct Cam {
    events: Vec<Event>,
    hello: HashMap<u8, usize>,
    hello_len: usize,
    opened: usize,
    closed: usize,
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 7)) as u8
}

impl Service for Cam {
    fn on_notice(&mut self, _: Handle, _from: &UserId, service: &ServiceName) -> Decision {
        match service.as_str() {
            "echo" | "hello" => Decision::Accept,
            "secret" => Decision::Reject(RejectReason::NotAllowed),
            _ => Decision::Reject(RejectReason::UnknownService),
        }
    }
    fn on_open(&mut self, s: &mut Session<'_>) {
        self.opened += 1;
        if s.info().service.as_str() == "hello" {
            self.hello.insert(s.handle().0, 0);
        }
    }
    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        if s.info().service.as_str() == "echo" {
            s.write(data)
        } else {
            data.len()
        }
    }
    fn on_writable(&mut self, s: &mut Session<'_>) {
        if let Some(sent) = self.hello.get_mut(&s.handle().0) {
            let chunk: Vec<u8> = (*sent..self.hello_len).take(700).map(pattern).collect();
            *sent += s.write(&chunk);
            if *sent == self.hello_len {
                s.terminate();
            }
        }
    }
    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        // A banner still being written finishes first (on_writable terminates then).
        if !self.hello.contains_key(&s.handle().0) {
            s.terminate();
        }
    }
    fn on_close(&mut self, h: Handle) {
        self.closed += 1;
        self.hello.remove(&h.0);
    }
    fn on_event(&mut self, e: &Event) {
        self.events.push(e.clone());
    }
}

/// alice: sends `outbox` on the session she demanded, then terminates; keeps what comes.
#[derive(Default)]
struct Client {
    events: Vec<Event>,
    outbox: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    open: bool,
    ended: bool,
}

impl Service for Client {
    fn on_notice(&mut self, _: Handle, _: &UserId, _: &ServiceName) -> Decision {
        Decision::Reject(RejectReason::Busy)
    }
    fn on_open(&mut self, _: &mut Session<'_>) {
        self.open = true;
    }
    fn on_data(&mut self, _: &mut Session<'_>, data: &[u8]) -> usize {
        self.received.extend_from_slice(data);
        data.len()
    }
    fn on_writable(&mut self, s: &mut Session<'_>) {
        if self.sent < self.outbox.len() {
            self.sent += s.write(&self.outbox[self.sent..]);
        }
        if self.sent == self.outbox.len() {
            s.terminate();
        }
    }
    fn on_peer_end(&mut self, _: &mut Session<'_>) {}
    fn on_close(&mut self, _: Handle) {
        self.ended = true;
    }
    fn on_event(&mut self, e: &Event) {
        self.events.push(e.clone());
    }
}

// ---------------------------------------------------------------- the world

struct DeviceSide {
    dev: FaultInjector<LinkEnd>,
    iface: Interface,
    sockets: SocketSet<'static>,
    cam: Agent<3>,
    cam_net: SmolTcp<3>,
    cam_svc: Cam,
    alice: Agent<2>,
    alice_net: SmolTcp<2>,
    alice_svc: Client,
}

struct World {
    now: Instant,
    queues: Queues,
    cut: Rc<Cell<bool>>,
    device: DeviceSide,
    relay: RelaySide,
}

fn uid(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn term_config(spare: u8) -> terminal::Config {
    terminal::Config {
        spare,
        ..terminal::Config::default()
    }
}

fn relay_config() -> relay::Config {
    relay::Config {
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(30),
        ..relay::Config::default()
    }
}

impl World {
    fn new(mtu: usize, cam_password: &str) -> World {
        let queues: Queues = Rc::new(RefCell::new([VecDeque::new(), VecDeque::new()]));
        let cut = Rc::new(Cell::new(false));
        let end = |side| LinkEnd {
            queues: queues.clone(),
            side,
            mtu,
            cut: cut.clone(),
        };
        let mut dev = FaultInjector::new(end(0), 0x5eed);
        let iface = interface(&mut dev, DEVICE_IP);
        let mut sockets = SocketSet::new(vec![]);
        let relay_ep = IpEndpoint::new(IpAddress::Ipv4(RELAY_IP), RELAY_PORT);
        let cam_socks = std::array::from_fn(|_| sockets.add(tcp_socket(SOCK_RX, SOCK_TX)));
        let alice_socks = std::array::from_fn(|_| sockets.add(tcp_socket(SOCK_RX, SOCK_TX)));
        let now = Instant::from_secs(1);
        let mut cam = Agent::new(
            term_config(2),
            uid("cam"),
            Password::new(cam_password).unwrap(),
            7,
        );
        cam.start(now);
        let mut alice = Agent::new(
            term_config(1),
            uid("alice"),
            Password::new("alice-secret").unwrap(),
            8,
        );
        alice.start(now);
        World {
            now,
            relay: RelaySide::new(end(1), relay_config()),
            queues,
            cut,
            device: DeviceSide {
                dev,
                iface,
                sockets,
                cam,
                cam_net: SmolTcp::new(cam_socks, relay_ep, 1000),
                cam_svc: Cam {
                    hello_len: 10_000,
                    ..Cam::default()
                },
                alice,
                alice_net: SmolTcp::new(alice_socks, relay_ep, 2000),
                alice_svc: Client::default(),
            },
        }
    }

    /// One round: both stacks, both agents, the relay host. Returns the next deadline.
    fn step(&mut self) -> Instant {
        let now = self.now;
        let t = smol_instant(now);
        let d = &mut self.device;
        d.iface.poll(t, &mut d.dev, &mut d.sockets);
        let a = d.cam.poll(
            now,
            &mut d.cam_net.bind(&mut d.iface, &mut d.sockets),
            &mut d.cam_svc,
        );
        let b = d.alice.poll(
            now,
            &mut d.alice_net.bind(&mut d.iface, &mut d.sockets),
            &mut d.alice_svc,
        );
        d.iface.poll(t, &mut d.dev, &mut d.sockets);
        let r = &mut self.relay;
        r.iface.poll(t, &mut r.dev, &mut r.sockets);
        r.process(now);
        r.iface.poll(t, &mut r.dev, &mut r.sockets);
        let smol = |x: Option<smoltcp::time::Instant>| {
            x.map(|i| Instant::from_millis(i.total_millis().max(0) as u64))
        };
        let di = smol(d.iface.poll_at(t, &d.sockets));
        let ri = smol(r.iface.poll_at(t, &r.sockets));
        [a, b, di, ri, r.deadline()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(1))
    }

    fn in_flight(&self) -> bool {
        self.queues.borrow().iter().any(|q| !q.is_empty())
    }

    /// Runs until `done` holds or `limit` of simulated time passed. Returns whether
    /// `done` held.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            let next = self.step();
            if done(self) {
                return true;
            }
            let step = if self.in_flight() {
                self.now + Duration::from_millis(1)
            } else {
                next.clamp(
                    self.now + Duration::from_millis(1),
                    self.now + Duration::from_secs(1),
                )
            };
            self.now = step;
        }
        false
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    fn ready(&mut self) {
        let ok = self.run_until(Duration::from_secs(20), |w| {
            w.device.cam.is_up()
                && w.device.alice.is_up()
                && w.device.cam.terminal().idle_connections() == 2
        });
        assert!(ok, "cam and alice log in with cam's 2 spares");
    }

    /// alice demands `service` of cam and sends `outbox`. Returns the demand's handle.
    fn alice_demands(&mut self, service: &str, outbox: Vec<u8>) -> Handle {
        let c = &mut self.device.alice_svc;
        c.outbox = outbox;
        c.sent = 0;
        c.received.clear();
        c.open = false;
        c.ended = false;
        self.device
            .alice
            .demand(uid("cam"), svc(service), self.now)
            .unwrap()
    }
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------- the tests

#[test]
fn embedded_login_and_spares() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    let cam = &w.device.cam_svc.events;
    assert_eq!(count(cam, |e| matches!(e, Event::LoggedIn)), 1);
    assert!(w.relay.core.is_online(&uid("cam")));
    assert!(w.relay.core.is_online(&uid("alice")));
    // Keep-alives hold the connections for minutes with no traffic.
    w.run_for(Duration::from_secs(180));
    let cam = &w.device.cam_svc.events;
    assert_eq!(
        count(cam, |e| matches!(e, Event::Closed { .. })),
        0,
        "{cam:?}"
    );
    assert_eq!(w.device.cam.terminal().idle_connections(), 2);
    assert_eq!(w.relay.core.connection_count(), 3);
}

#[test]
fn embedded_wrong_password_stops() {
    let mut w = World::new(1500, "not-the-password");
    w.run_for(Duration::from_secs(30));
    let cam = &w.device.cam_svc.events;
    assert!(
        cam.iter().any(|e| matches!(
            e,
            Event::LoginRefused {
                code: ErrorCode::AuthFailed,
                ..
            }
        )),
        "{cam:?}"
    );
    // One attempt, no reconnect storm.
    assert_eq!(count(cam, |e| matches!(e, Event::Open(_))), 1);
    assert!(!w.device.cam.is_up());
}

#[test]
fn embedded_echo_byte_exact_both_ways() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    let data = payload(100_000, 42);
    let h = w.alice_demands("echo", data.clone());
    let ok = w.run_until(Duration::from_secs(60), |w| w.device.alice_svc.ended);
    assert!(ok, "session ends: {:?}", w.device.alice_svc.events);
    let a = &w.device.alice_svc;
    assert!(
        a.events
            .iter()
            .any(|e| matches!(e, Event::Accepted { handle, .. } if *handle == h))
    );
    assert_eq!(a.received.len(), data.len());
    assert!(a.received == data, "echo is byte-exact");
    assert_eq!(w.device.cam_svc.opened, 1);
    assert_eq!(w.device.cam_svc.closed, 1);
    // cam refilled its spares while the session ran, and has them back after.
    w.run_for(Duration::from_secs(5));
    assert!(w.device.cam.terminal().idle_connections() >= 2);
    assert!(w.relay.events.iter().any(|e| matches!(
        e,
        relay::Event::SessionEnded {
            up: 100_000,
            down: 100_000,
            ..
        }
    )));
}

#[test]
fn embedded_device_writes_first() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    w.alice_demands("hello", Vec::new());
    let ok = w.run_until(Duration::from_secs(60), |w| w.device.alice_svc.ended);
    assert!(ok);
    let expect: Vec<u8> = (0..10_000).map(pattern).collect();
    assert_eq!(w.device.alice_svc.received.len(), expect.len());
    assert!(w.device.alice_svc.received == expect);
}

#[test]
fn embedded_demand_rejected() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    let h = w.alice_demands("secret", Vec::new());
    let failed = |w: &World, want: DemandError| {
        w.device.alice_svc.events.iter().any(|e| {
            matches!(e, Event::DemandFailed { handle, error, .. } if *handle == h && *error == want)
        })
    };
    assert!(w.run_until(Duration::from_secs(10), |w| failed(
        w,
        DemandError::Rejected(RejectReason::NotAllowed)
    )));
    let h = w.alice_demands("ftp", Vec::new());
    let _ = h;
    assert!(w.run_until(Duration::from_secs(10), |w| {
        w.device.alice_svc.events.iter().any(|e| {
            matches!(
                e,
                Event::DemandFailed {
                    error: DemandError::Rejected(RejectReason::UnknownService),
                    ..
                }
            )
        })
    }));
    w.device.alice_svc.events.clear();
    w.device
        .alice
        .demand(uid("nobody"), svc("echo"), w.now)
        .unwrap();
    assert!(w.run_until(Duration::from_secs(10), |w| {
        w.device.alice_svc.events.iter().any(|e| {
            matches!(
                e,
                Event::DemandFailed {
                    error: DemandError::TargetOffline,
                    ..
                }
            )
        })
    }));
    assert_eq!(w.device.cam_svc.opened, 0);
    // Rejected notices leave cam's connections idle (the terminal opened a spare while
    // the notice was pending, so there may be one more than configured).
    w.run_for(Duration::from_secs(2));
    assert!(w.device.cam.terminal().idle_connections() >= 2);
}

#[test]
fn embedded_keepalive_loss_detected_and_recovered() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    w.cut.set(true);
    let lost = w.run_until(Duration::from_secs(60), |w| {
        w.device.cam_svc.events.iter().any(|e| {
            matches!(
                e,
                Event::Closed {
                    cause: Cause::KeepAliveTimeout,
                    ..
                }
            )
        })
    });
    assert!(
        lost,
        "cam notices the silent relay: {:?}",
        w.device.cam_svc.events
    );
    assert!(w.run_until(Duration::from_secs(30), |w| !w.device.cam.is_up()));
    w.cut.set(false);
    w.device.cam_svc.events.clear();
    let back = w.run_until(Duration::from_secs(120), |w| {
        w.device.cam.is_up() && w.device.cam.terminal().idle_connections() == 2
    });
    assert!(back, "{:?}", w.device.cam_svc.events);
    // The relay still holds cam's dead connections until its own keep-alive deadline
    // (it cannot know they are dead); a demand routed to one of them fails with
    // TargetGone. Wait that out, as a real requester's retry would.
    w.run_for(Duration::from_secs(40));
    // And it works again.
    let data = payload(5_000, 9);
    w.alice_demands("echo", data.clone());
    let ok = w.run_until(Duration::from_secs(60), |w| w.device.alice_svc.ended);
    if !ok {
        for (h, slot) in &w.relay.slots {
            let st = w.relay.sockets.get::<tcp::Socket>(*h).state();
            let k = match slot {
                Slot::Listening => "listen".to_string(),
                Slot::Retired => "retired".into(),
                Slot::Live(c) => format!("live {:?} closing {}", c.id, c.closing),
            };
            eprintln!(
                "relay {h:?} {st} {k} {:?}",
                w.relay.sockets.get::<tcp::Socket>(*h).remote_endpoint()
            );
        }
        for (h, s) in w.device.sockets.iter() {
            let _ = (h, s);
        }
        for i in 0..3 {
            let h = w.device.cam_net.socket(i).unwrap();
            let s = w.device.sockets.get::<tcp::Socket>(h);
            eprintln!("cam {i} {} {:?}", s.state(), s.local_endpoint());
        }
        for i in 0..2 {
            let h = w.device.alice_net.socket(i).unwrap();
            let s = w.device.sockets.get::<tcp::Socket>(h);
            eprintln!("alice {i} {} {:?}", s.state(), s.local_endpoint());
        }
        for e in w
            .relay
            .events
            .iter()
            .filter(|e| !matches!(e, relay::Event::Wake(_)))
        {
            eprintln!("{e:?}");
        }
    }
    assert!(
        ok,
        "{:?}\n{:?}",
        w.device.alice_svc.events, w.device.cam_svc.events
    );
    assert!(w.device.alice_svc.received == data);
}

#[test]
fn embedded_relay_restart_relogin() {
    let mut w = World::new(1500, "cam-secret");
    w.ready();
    w.relay.restart();
    w.relay.events.clear();
    assert!(w.run_until(Duration::from_secs(10), |w| !w.device.cam.is_up()));
    let back = w.run_until(Duration::from_secs(120), |w| {
        w.device.cam.is_up()
            && w.device.alice.is_up()
            && w.device.cam.terminal().idle_connections() == 2
    });
    assert!(back, "{:?}", w.device.cam_svc.events);
    let cam = &w.device.cam_svc.events;
    assert_eq!(count(cam, |e| matches!(e, Event::LoggedIn)), 2);
    assert_eq!(count(cam, |e| matches!(e, Event::Down)), 1);
    // The new relay run did not know the old resumption credential: password again.
    assert!(w.relay.events.iter().any(|e| matches!(
        e,
        relay::Event::Authenticate { user, credential: Credential::Password(_), .. } if *user == uid("cam")
    )));
    let data = payload(20_000, 3);
    w.alice_demands("echo", data.clone());
    assert!(w.run_until(Duration::from_secs(60), |w| w.device.alice_svc.ended));
    assert!(w.device.alice_svc.received == data);
}

#[test]
fn embedded_lossy_link() {
    // Small packets (frames split across many segments), 10% loss, some corruption.
    let mut w = World::new(296, "cam-secret");
    w.device.dev.set_max_packet_size(296);
    w.device.dev.set_drop_chance(10);
    w.device.dev.set_corrupt_chance(2);
    let ok = w.run_until(Duration::from_secs(120), |w| {
        w.device.cam.is_up()
            && w.device.alice.is_up()
            && w.device.cam.terminal().idle_connections() == 2
    });
    assert!(
        ok,
        "logs in over a lossy link: {:?}",
        w.device.cam_svc.events
    );
    let data = payload(30_000, 77);
    w.alice_demands("echo", data.clone());
    let ok = w.run_until(Duration::from_secs(300), |w| w.device.alice_svc.ended);
    assert!(ok, "{:?}", w.device.alice_svc.events);
    assert_eq!(w.device.alice_svc.received.len(), data.len());
    assert!(
        w.device.alice_svc.received == data,
        "byte-exact despite loss"
    );
}

/// relay-embedded's channel (clatter) against relay-host's (snow) over loopback TCP: the
/// device side over a host socket (`peek` is `MSG_PEEK`), the relay side the real
/// `relay_host::channel::accept` and its stream, echoing what it decrypts.
mod channel_interop {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::Instant as StdInstant;

    use relay_embedded::rand_core::{CryptoRng, RngCore};
    use relay_embedded::{Channel, Failure, LinkState, Transport};
    use relay_host::channel::{ChannelKeys, accept};
    use relay_proto::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A host socket error, as embedded-io wants it.
    #[derive(Debug)]
    struct HostErr(ErrorKind);
    impl std::fmt::Display for HostErr {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for HostErr {}
    impl embedded_io::Error for HostErr {
        fn kind(&self) -> embedded_io::ErrorKind {
            embedded_io::ErrorKind::Other
        }
    }
    impl From<std::io::Error> for HostErr {
        fn from(e: std::io::Error) -> Self {
            HostErr(e.kind())
        }
    }

    /// A host socket's send side as an embedded-io writer.
    struct HostIo<'a>(&'a TcpStream);
    impl embedded_io::ErrorType for HostIo<'_> {
        type Error = HostErr;
    }
    impl embedded_io::Write for HostIo<'_> {
        fn write(&mut self, buf: &[u8]) -> Result<usize, HostErr> {
            Ok(Write::write(&mut self.0, buf)?)
        }
        fn flush(&mut self) -> Result<(), HostErr> {
            Ok(())
        }
    }

    /// One host socket as a one-slot transport, non-blocking.
    struct HostTcp(Option<TcpStream>, std::net::SocketAddr);

    impl Transport for HostTcp {
        type Error = HostErr;
        type Io<'a> = HostIo<'a>;
        fn open(&mut self, _: usize) -> Result<(), HostErr> {
            let s = TcpStream::connect(self.1)?;
            s.set_nonblocking(true)?;
            self.0 = Some(s);
            Ok(())
        }
        fn state(&mut self, _: usize) -> LinkState {
            match &self.0 {
                Some(s) => match s.peek(&mut [0u8; 1]) {
                    Ok(0) => LinkState::Closed,
                    Err(e) if e.kind() != ErrorKind::WouldBlock => LinkState::Closed,
                    _ => LinkState::Open,
                },
                None => LinkState::Closed,
            }
        }
        fn peek(&mut self, _: usize, buf: &mut [u8]) -> Result<usize, HostErr> {
            let s = self.0.as_ref().ok_or(HostErr(ErrorKind::NotConnected))?;
            match s.peek(buf) {
                Ok(0) if !buf.is_empty() => Err(HostErr(ErrorKind::UnexpectedEof)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                other => Ok(other?),
            }
        }
        fn consume(&mut self, _: usize, n: usize) {
            if let Some(mut s) = self.0.as_ref() {
                s.read_exact(&mut vec![0u8; n]).unwrap();
            }
        }
        fn io(&mut self, _: usize) -> HostIo<'_> {
            HostIo(self.0.as_ref().expect("open"))
        }
        fn send_space(&mut self, _: usize) -> usize {
            // Loopback with small writes: the kernel buffer always has room here.
            4096
        }
        fn close(&mut self, _: usize, _: bool) {
            if let Some(s) = self.0.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    struct TestRng(u64);
    impl RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
            self.0 >> 11
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            dest.iter_mut().for_each(|b| *b = self.next_u64() as u8);
        }
        fn try_fill_bytes(
            &mut self,
            dest: &mut [u8],
        ) -> Result<(), relay_embedded::rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for TestRng {}

    /// A relay-host channel endpoint on loopback that echoes; returns its address and
    /// the keys' public halves.
    fn echo_relay(dir: &std::path::Path) -> (std::net::SocketAddr, [u8; 32], [u8; 32]) {
        let keys = ChannelKeys::load_or_generate(&dir.join("relay.db")).unwrap();
        let (current, next) = (keys.current().0, keys.next().0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    let Ok(mut s) = accept(tcp, &keys).await else {
                        continue;
                    };
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = s.flush().await;
                    }
                }
            });
        });
        (addr, current, next)
    }

    /// Polls the device side until `done` or 10 s.
    fn until(mut step: impl FnMut() -> bool) {
        let start = StdInstant::now();
        while !step() {
            assert!(start.elapsed().as_secs() < 10, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn now() -> Instant {
        Instant::from_millis(1_000)
    }

    #[test]
    fn the_device_channel_interoperates_with_the_relay_side() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, current, next) = echo_relay(dir.path());
        for pinned in [current, next] {
            let mut ch: Channel<1> = Channel::new(pinned, Duration::from_secs(5));
            let (mut tcp, mut rng) = (HostTcp(None, addr), TestRng(7));
            ch.bind(now(), &mut tcp, &mut rng).open(0).unwrap();
            until(|| ch.bind(now(), &mut tcp, &mut rng).state(0) == LinkState::Open);
            let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
            let mut got = Vec::new();
            for chunk in data.chunks(500) {
                let mut t = ch.bind(now(), &mut tcp, &mut rng);
                assert!(t.send_space(0) >= chunk.len());
                embedded_io::Write::write_all(&mut t.io(0), chunk).unwrap();
            }
            until(|| {
                let mut t = ch.bind(now(), &mut tcp, &mut rng);
                let mut buf = [0u8; 200];
                let n = t.peek(0, &mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                t.consume(0, n);
                got.len() == data.len()
            });
            assert!(got == data, "echoed byte-exact through snow and back");
        }
    }

    #[test]
    fn a_device_pinning_another_key_is_refused_by_the_relay_side() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _, _) = echo_relay(dir.path());
        let mut ch: Channel<1> = Channel::new([0x42; 32], Duration::from_secs(5));
        let (mut tcp, mut rng) = (HostTcp(None, addr), TestRng(7));
        ch.bind(now(), &mut tcp, &mut rng).open(0).unwrap();
        until(|| ch.bind(now(), &mut tcp, &mut rng).state(0) == LinkState::Closed);
        assert_eq!(ch.failure(0), Some(Failure::Refused));
    }
}
