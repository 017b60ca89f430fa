//! relay-embedded's embassy binding against the real `relay` binary.
//!
//! The device is an embassy-net stack (smoltcp 0.13 inside) whose packets travel over an
//! in-memory IP link (a pair of `embassy_net_driver::Driver`s written here) to a second
//! embassy-net stack, the "gateway": it accepts the device's TCP connections and carries
//! their bytes to `relay serve` on 127.0.0.1 over kernel sockets (a user-space NAT), and
//! keeps every byte the device sent, as a packet capture would. The device runs the
//! agent with `EmbassyTcp::step` in one async task on embassy-time's std clock; a host
//! `relay connect` opens sessions to it, and the bytes come back byte-exact.

#[path = "host_support.rs"]
mod support;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use embassy_futures::select::{Either, select};
use embassy_net::driver::{self, Capabilities, HardwareAddress, LinkState};
use embassy_net::tcp::TcpSocket;
use embassy_net::{Config as NetConfig, Ipv4Address, Ipv4Cidr, StackResources, StaticConfigV4};
use embassy_time::Timer;
use relay_embedded::rand_core::{CryptoRng, RngCore};
use relay_embedded::{
    Agent, CARRY_CHANNEL, Channel, EmbassyTcp, Failure, MIN_CHANNEL_SOCKET_TX, Service, Session,
};
use relay_host::channel::RelayKey;
use relay_proto::ident::{Password, UserId};
use relay_proto::terminal::{Config, Event};
use relay_proto::time::Duration as ProtoDuration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::spawn_local;

use support::*;

const FAST: &str = "keepalive_interval = \"2s\"\nkeepalive_timeout = \"6s\"\nhandshake_timeout = \"3s\"\ndemand_timeout = \"5s\"";
const T: Duration = Duration::from_secs(30);
const DEVICE_IP: Ipv4Address = Ipv4Address::new(192, 0, 2, 2);
const GATEWAY_IP: Ipv4Address = Ipv4Address::new(192, 0, 2, 1);
const RELAY_PORT: u16 = 7000;
/// The device's relay connections and their socket buffers, each way (what a small
/// board gives).
const CONNS: usize = 3;
const SOCK_BUF: usize = 2048;
const _: () = assert!(SOCK_BUF >= MIN_CHANNEL_SOCKET_TX);
/// The gateway's listening sockets: the device's connections, plus room for those that
/// are still closing.
const GATEWAY_SOCKETS: usize = 6;

// ---------------------------------------------------------------- the in-memory IP link

/// Packets in flight each way, and the stack runner waiting on each side.
#[derive(Default)]
struct Wire {
    queues: [VecDeque<Vec<u8>>; 2],
    wakers: [Option<Waker>; 2],
}

/// One end of the link: an embassy-net driver.
struct End {
    wire: Rc<RefCell<Wire>>,
    side: usize,
}

struct Rx(Vec<u8>);
struct Tx {
    wire: Rc<RefCell<Wire>>,
    to: usize,
}

impl driver::RxToken for Rx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, f: F) -> R {
        f(&mut self.0)
    }
}

impl driver::TxToken for Tx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        let mut wire = self.wire.borrow_mut();
        wire.queues[self.to].push_back(packet);
        if let Some(w) = wire.wakers[self.to].take() {
            w.wake();
        }
        r
    }
}

impl driver::Driver for End {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx;

    fn receive(&mut self, cx: &mut Context) -> Option<(Rx, Tx)> {
        let mut wire = self.wire.borrow_mut();
        match wire.queues[self.side].pop_front() {
            Some(packet) => Some((Rx(packet), self.tx())),
            None => {
                wire.wakers[self.side] = Some(cx.waker().clone());
                None
            }
        }
    }

    fn transmit(&mut self, _: &mut Context) -> Option<Tx> {
        Some(self.tx())
    }

    fn link_state(&mut self, _: &mut Context) -> LinkState {
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = 1500;
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ip
    }
}

impl End {
    fn tx(&self) -> Tx {
        Tx {
            wire: self.wire.clone(),
            to: 1 - self.side,
        }
    }
}

fn net_config(ip: Ipv4Address) -> NetConfig {
    NetConfig::ipv4_static(StaticConfigV4 {
        address: Ipv4Cidr::new(ip, 24),
        gateway: None,
        dns_servers: Default::default(),
    })
}

// ---------------------------------------------------------------- what the device saw

/// What the test thread reads of the device's world.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    failures: Vec<Failure>,
    /// Every byte the device sent towards the relay (the gateway's capture).
    sent: Vec<u8>,
    /// Steps a `select` cancelled.
    cancelled: usize,
    /// Agent polls so far.
    polls: usize,
}

type Shared = Arc<Mutex<Seen>>;

/// The device's service: echoes every byte, records every terminal event.
struct Recorder(Shared);

impl Service for Recorder {
    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        s.write(data)
    }
    fn on_event(&mut self, event: &Event) {
        self.0.lock().unwrap().events.push(event.clone());
    }
}

/// A test RNG (xorshift): the channel draws handshake keys from it.
struct TestRng(u64);
impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.iter_mut().for_each(|b| *b = self.next_u64() as u8);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), relay_embedded::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for TestRng {}

// ---------------------------------------------------------------- the world

/// The device's link to the relay.
#[derive(Clone, Copy)]
enum Link {
    /// Plain TCP to the relay's `--allow-plain` listener.
    Plain,
    /// The same, each step raced in a `select` against a 2 ms timer polled first, so
    /// steps are cancelled mid-wait again and again.
    PlainCancelled,
    /// The device channel on the relay's TLS port, pinning this key.
    Channel([u8; 32]),
}

/// The device and the gateway, running on their own thread until dropped.
struct World {
    seen: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl World {
    fn start(user: &str, link: Link, relay_port: u16) -> World {
        let seen = Shared::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (shared, user) = (seen.clone(), user.to_owned());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Dropping the LocalSet when the test drops the world ends every task.
            tokio::task::LocalSet::new().block_on(&rt, async move {
                select(world(user, link, relay_port, shared), stopped).await;
            });
        });
        World {
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Waits until `done` holds for what the device saw; fails after `T`.
    fn until(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let start = StdInstant::now();
        while !done(&self.seen.lock().unwrap()) {
            let seen = self.seen.lock().unwrap();
            assert!(
                start.elapsed() < T,
                "{what}: not within {T:?}; events {:?}, failures {:?}",
                seen.events,
                seen.failures
            );
            drop(seen);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sent_contains(&self, needle: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap()
            .sent
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Both stacks, the device and the gateway, each in tasks of their own (a stack's runner
/// must not share a task with code that uses its sockets: every socket call wakes the
/// runner), until the test drops the world.
async fn world(user: String, link: Link, relay_port: u16, seen: Shared) {
    let wire = Rc::new(RefCell::new(Wire::default()));
    let (dev_stack, mut dev_runner) = embassy_net::new(
        End {
            wire: wire.clone(),
            side: 0,
        },
        net_config(DEVICE_IP),
        Box::leak(Box::new(StackResources::<CONNS>::new())),
        0x5eed_0001,
    );
    let (gw_stack, mut gw_runner) = embassy_net::new(
        End { wire, side: 1 },
        net_config(GATEWAY_IP),
        Box::leak(Box::new(StackResources::<GATEWAY_SOCKETS>::new())),
        0x5eed_0002,
    );
    spawn_local(async move { dev_runner.run().await });
    spawn_local(async move { gw_runner.run().await });
    for _ in 0..GATEWAY_SOCKETS {
        spawn_local(forward(gw_stack, relay_port, seen.clone()));
    }
    let [a, b, c, d, e, f] = Box::leak(Box::new([[0u8; SOCK_BUF]; 2 * CONNS]));
    let sockets = [
        TcpSocket::new(dev_stack, a, b),
        TcpSocket::new(dev_stack, c, d),
        TcpSocket::new(dev_stack, e, f),
    ];
    let relay = (GATEWAY_IP, RELAY_PORT).into();
    let _ = spawn_local(async move {
        match link {
            Link::Plain | Link::PlainCancelled => {
                let cancel = matches!(link, Link::PlainCancelled);
                plain_device(&user, EmbassyTcp::new(sockets, relay), cancel, &seen).await
            }
            // The carry of one channel record, as a device under the channel uses.
            Link::Channel(key) => {
                let tcp = EmbassyTcp::<CONNS, CARRY_CHANNEL>::new(sockets, relay);
                channel_device(&user, key, tcp, &seen).await
            }
        }
    })
    .await;
}

fn agent(user: &str) -> Agent<CONNS> {
    let mut agent = Agent::new(
        Config::default(),
        UserId::new(user).unwrap(),
        Password::new(PASSWORD).unwrap(),
        7,
    );
    agent.start(relay_embedded::proto_now());
    agent
}

/// The device on plain TCP: the agent on `EmbassyTcp::step`, raced against a short
/// timer when `cancel`.
async fn plain_device(user: &str, mut tcp: EmbassyTcp<'_, CONNS>, cancel: bool, seen: &Shared) {
    let mut agent = agent(user);
    let mut service = Recorder(seen.clone());
    loop {
        let step = tcp.step(|now, t| {
            seen.lock().unwrap().polls += 1;
            agent.poll(now, t, &mut service)
        });
        if !cancel {
            step.await;
        } else if let Either::First(()) = select(Timer::after_millis(2), step).await {
            // The timer is polled first: when it fires, the step is dropped mid-wait.
            seen.lock().unwrap().cancelled += 1;
        }
    }
}

/// The device over the channel, pinning `key`: failures recorded as they come.
async fn channel_device(
    user: &str,
    key: [u8; 32],
    mut tcp: EmbassyTcp<'_, CONNS, CARRY_CHANNEL>,
    seen: &Shared,
) {
    let mut agent = agent(user);
    let mut service = Recorder(seen.clone());
    let mut channel: Channel<CONNS> = Channel::new(key, ProtoDuration::from_secs(5));
    let mut rng = TestRng(0x1234_5678_9abc_def1);
    loop {
        tcp.step(|now, t| {
            seen.lock().unwrap().polls += 1;
            let next = agent.poll(now, &mut channel.bind(now, t, &mut rng), &mut service);
            while let Some((_, why)) = channel.take_failure() {
                seen.lock().unwrap().failures.push(why);
            }
            next.into_iter().chain(channel.poll_at()).min()
        })
        .await;
    }
}

/// One gateway socket: accepts a device connection, carries it to the relay on
/// 127.0.0.1 and back, records what the device sent; again and again.
async fn forward(stack: embassy_net::Stack<'static>, relay_port: u16, seen: Shared) {
    let (mut rx, mut tx) = ([0u8; 4096], [0u8; 4096]);
    let mut s = TcpSocket::new(stack, &mut rx, &mut tx);
    loop {
        if s.accept(RELAY_PORT).await.is_err() {
            s.abort();
            continue;
        }
        if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", relay_port)).await {
            let (mut up_r, mut up_w) = up.split();
            let (mut r, mut w) = s.split();
            let to_relay = async {
                let mut buf = [0u8; 2048];
                while let Ok(n @ 1..) = r.read(&mut buf).await {
                    seen.lock().unwrap().sent.extend_from_slice(&buf[..n]);
                    if up_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let to_device = async {
                let mut buf = [0u8; 2048];
                while let Ok(n @ 1..) = up_r.read(&mut buf).await {
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        match w.write(rest).await {
                            Ok(k) => rest = &rest[k..],
                            Err(_) => return,
                        }
                    }
                }
            };
            select(to_relay, to_device).await;
        }
        // What the relay sent goes out before the FIN; then the socket listens again.
        s.close();
        let _ = s.flush().await;
        s.abort();
    }
}

fn pinned(key: &str) -> [u8; 32] {
    RelayKey::from_str(key).expect("channel key").0
}

/// A device logs in through `link`, a host `relay connect` opens a session to it, and
/// 200 KB come back byte-exact. Returns the world (for its capture) and how many steps
/// were cancelled during the transfer.
fn echo_session(relay: &Relay, link: Link, port: u16) -> (World, usize) {
    relay.add_user("cam");
    relay.add_user("alice");
    let world = World::start("cam", link, port);
    world.until("logged in", |s| {
        s.events.iter().any(|e| matches!(e, Event::LoggedIn))
    });
    let (_alice, local) = relay.forward("alice", "cam");
    let mut data = vec![0u8; 200_000];
    fill(&mut data, &mut 11);
    let cancelled = world.seen.lock().unwrap().cancelled;
    let back = round_trip(local, &data);
    let cancelled = world.seen.lock().unwrap().cancelled - cancelled;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed byte-exact through the embassy device");
    (world, cancelled)
}

/// Agent polls while the device is idle for 2 s (keep-alive every 2 s): the task sleeps
/// between socket events and deadlines instead of spinning.
fn idle_polls(world: &World) -> usize {
    let before = world.seen.lock().unwrap().polls;
    std::thread::sleep(Duration::from_secs(2));
    let polls = world.seen.lock().unwrap().polls - before;
    eprintln!("{polls} agent polls in 2 s of idle");
    polls
}

#[test]
fn an_embassy_device_serves_a_session_over_the_channel() {
    let relay = Relay::start(FAST);
    let key = pinned(&relay.channel_keys[0]);
    let (world, _) = echo_session(&relay, Link::Channel(key), relay.tls_port);
    assert!(
        !world.sent_contains(PASSWORD.as_bytes()),
        "the password never crossed the link in clear"
    );
    assert!(world.seen.lock().unwrap().failures.is_empty());
    let polls = idle_polls(&world);
    assert!(polls < 100, "{polls} agent polls in 2 s of idle");
}

#[test]
fn an_embassy_device_serves_a_session_over_plain_tcp() {
    let relay = Relay::start(FAST);
    let (world, _) = echo_session(&relay, Link::Plain, relay.plain_port);
    let polls = idle_polls(&world);
    assert!(polls < 100, "{polls} agent polls in 2 s of idle");
    // The capture is real: over plain TCP the password is in it.
    assert!(world.sent_contains(PASSWORD.as_bytes()));
}

#[test]
fn an_embassy_device_loses_nothing_when_its_steps_are_cancelled_in_select() {
    let relay = Relay::start(FAST);
    let (_world, cancelled) = echo_session(&relay, Link::PlainCancelled, relay.plain_port);
    assert!(cancelled > 0, "no step was cancelled during the transfer");
    eprintln!("{cancelled} steps cancelled during the transfer");
}

#[test]
fn an_embassy_device_pinning_a_wrong_key_fails_clearly_and_keeps_its_password() {
    let relay = Relay::start(FAST);
    relay.add_user("cam");
    let world = World::start("cam", Link::Channel([0x42; 32]), relay.tls_port);
    world.until("a channel failure", |s| !s.failures.is_empty());
    let seen = world.seen.lock().unwrap();
    assert!(
        seen.failures.iter().all(|f| *f == Failure::Refused),
        "{:?}",
        seen.failures
    );
    assert_eq!(
        Failure::Refused.to_string(),
        "the relay closed the handshake: it does not hold the pinned key"
    );
    assert!(!seen.events.iter().any(|e| matches!(e, Event::LoggedIn)));
    assert!(!seen.sent.is_empty(), "the device did reach the relay");
    assert!(
        !seen
            .sent
            .windows(PASSWORD.len())
            .any(|w| w == PASSWORD.as_bytes()),
        "the password never left the device"
    );
}
