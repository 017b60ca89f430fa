//! Figures of redirects across a 3-node cluster (docs/CLUSTER.md part 5), measured by an
//! ignored test that prints them:
//!
//!     cargo test --release -p relay-tests --test host_cluster -- --ignored --nocapture redirect_figures
//!
//! Three `relay serve` nodes on one PostgreSQL; on each node two devices (protocol
//! clients in this process, plain TCP, 8 connections each, accepting every NOTICE and
//! terminating with their peer); 12 requesters, 4 homed on each node, each on one TLS
//! connection to its node logged in with the same token, demanding sessions one after
//! another: DEMAND, the result, TERMINATE, RELEASE. A demand for a device on another node
//! is redirected: the requester then does what relay-host's terminal does (a new TCP and
//! TLS connection to the named node, pinning its fingerprint; a token LOGIN as a
//! requester with the DEMAND right behind it), and the time from the first DEMAND to
//! `Accepted` includes all of it. Each mix (0 %, 50 %, 100 % of the demands for a device on another node) runs
//! [`ROUNDS`] rounds of [`ROUND`]; the figures are the median of the rounds' accepted
//! demands per second and the 50th/99th percentiles over every demand, same-node and
//! cross-node apart, beside the loopback round trip of a KEEPALIVE on an idle TLS
//! connection, measured in the same run.

use std::time::{Duration, Instant};

use relay_host::cli::ServerAddr;
use relay_host::tls::{Fingerprint, ServerTrust};
use relay_proto::frame::{
    self, Credential, Demand, DemandResult, Frame, Hello, Login, Parsed, Redirect, caps,
};
use relay_proto::{Password, ResumeToken, ServiceName, UserId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const ROUND: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;
const DEVICES_PER_NODE: usize = 2;
const DEVICE_CONNECTIONS: usize = 8;
const REQUESTERS_PER_NODE: usize = 4;
const NODES: usize = 3;

/// A framed protocol connection over any stream.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S) -> Self {
        Conn {
            io,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut out = Vec::new();
        for f in frames {
            let mut b = [0u8; frame::MAX_CONTROL_FRAME];
            let n = f.encode(&mut b).unwrap();
            out.extend_from_slice(&b[..n]);
        }
        self.io.write_all(&out).await.expect("write to the relay");
        self.io.flush().await.expect("flush to the relay");
    }

    /// The next control frame (these clients never receive DATA).
    async fn next(&mut self) -> Frame {
        loop {
            if let Some((parsed, n)) = frame::parse(&self.buf).expect("a valid frame") {
                self.buf.drain(..n);
                match parsed {
                    Parsed::Control(f) => return f,
                    Parsed::DataHeader { .. } => panic!("DATA in a figures run"),
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await.expect("read from the relay");
            assert!(n > 0, "the relay closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// LOGIN; the token of LOGIN_OK.
    async fn login(&mut self, user: &str, caps: u32, credential: Credential) -> Vec<u8> {
        self.send(&[Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).unwrap(),
            credential,
        })])
        .await;
        match self.next().await {
            Frame::LoginOk(ok) => ok.token.as_bytes().to_vec(),
            other => panic!("{user}: login answered {other:?}"),
        }
    }

    /// Ends the session this connection is in, as requester: TERMINATE, then the
    /// device's TERMINATE and RELEASE.
    async fn finish(&mut self) {
        self.send(&[Frame::Terminate]).await;
        loop {
            if let Frame::Release { .. } = self.next().await {
                return;
            }
        }
    }
}

/// A device connection: accepts every NOTICE and terminates when its peer does.
async fn device(mut c: Conn<TcpStream>) {
    loop {
        let reply = match c.next().await {
            Frame::Notice(n) => Frame::Accept { session: n.session },
            Frame::Terminate => Frame::Terminate,
            _ => continue,
        };
        c.send(&[reply]).await;
    }
}

async fn plain(node: &Relay) -> Conn<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", node.plain_port))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    Conn::new(tcp)
}

/// TLS to `address`, pinning `fingerprint`: what the terminal does to any node.
async fn tls(
    address: &str,
    fingerprint: [u8; 32],
) -> Conn<impl AsyncRead + AsyncWrite + Unpin + use<>> {
    let addr: ServerAddr = address.parse().unwrap();
    let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let config =
        relay_host::tls::client_config(&ServerTrust::Pinned(Fingerprint(fingerprint))).unwrap();
    let name = "relay"
        .parse::<ServerAddr>()
        .unwrap()
        .server_name()
        .unwrap();
    Conn::new(relay_host::tls::connect(config, name, tcp).await.unwrap())
}

fn fingerprint_of(node: &Relay) -> [u8; 32] {
    node.fingerprint.parse::<Fingerprint>().unwrap().0
}

fn demand(target: &str) -> Frame {
    Frame::Demand(Demand {
        target: UserId::new(target).unwrap(),
        service: ServiceName::default(),
    })
}

/// A redirected demand's time, step by step: DEMAND to `Redirect`, TCP and TLS to the
/// other node, LOGIN and DEMAND there to `Accepted`.
type Steps = [Duration; 3];

/// One demand to `target` from `home`, followed if redirected, and its session ended:
/// the time from DEMAND to `Accepted`, and its steps if it was redirected.
async fn one_demand<S: AsyncRead + AsyncWrite + Unpin>(
    home: &mut Conn<S>,
    token: &[u8],
    target: &str,
) -> (Duration, Option<Steps>) {
    let t0 = Instant::now();
    home.send(&[demand(target)]).await;
    let to: Redirect = match home.next().await {
        Frame::DemandResult(DemandResult::Accepted { .. }) => {
            let took = t0.elapsed();
            home.finish().await;
            return (took, None);
        }
        Frame::DemandResult(DemandResult::Redirect(to)) => to,
        other => panic!("demand for {target}: {other:?}"),
    };
    let redirected = Instant::now();
    let mut there = tls(to.address.as_str(), to.fingerprint).await;
    let connected = Instant::now();
    let resume = Credential::Resume(ResumeToken::from_slice(token).unwrap());
    // As the terminal does: the DEMAND right behind the token LOGIN, in one write.
    let login = Frame::Login(Login {
        hello: Hello::current(caps::ALL | caps::REQUESTER),
        user: UserId::new("req").unwrap(),
        credential: resume,
    });
    there.send(&[login, demand(target)]).await;
    assert!(matches!(there.next().await, Frame::LoginOk(_)));
    match there.next().await {
        Frame::DemandResult(DemandResult::Accepted { .. }) => {}
        other => panic!("redirected demand for {target}: {other:?}"),
    }
    let took = t0.elapsed();
    let steps = [redirected - t0, connected - redirected, connected.elapsed()];
    there.finish().await;
    (took, Some(steps))
}

/// One requester homed on `node` for a round: demands until `until`, each for the next
/// of `targets`. The latencies of its same-node and cross-node demands.
async fn requester(
    address: String,
    fingerprint: [u8; 32],
    token: Vec<u8>,
    targets: Vec<String>,
    until: Instant,
) -> (Vec<Duration>, Vec<Duration>, Vec<Steps>) {
    let mut home = tls(&address, fingerprint).await;
    let resume = Credential::Resume(ResumeToken::from_slice(&token).unwrap());
    home.login("req", caps::ALL | caps::REQUESTER | caps::REDIRECT, resume)
        .await;
    let (mut same, mut cross, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for target in targets.iter().cycle() {
        if Instant::now() >= until {
            break;
        }
        match one_demand(&mut home, &token, target).await {
            (took, Some(s)) => {
                cross.push(took);
                steps.push(s);
            }
            (took, None) => same.push(took),
        }
    }
    (same, cross, steps)
}

fn device_name(node: usize, i: usize) -> String {
    format!("dev{node}x{i}")
}

/// The targets of a requester homed on `node` when `cross_percent` of its demands are
/// for devices on other nodes (0, 50 or 100).
fn targets(node: usize, cross_percent: u32) -> Vec<String> {
    let here = (0..DEVICES_PER_NODE).map(|i| device_name(node, i));
    let there = (1..NODES)
        .flat_map(|d| (0..DEVICES_PER_NODE).map(move |i| device_name((node + d) % NODES, i)));
    match cross_percent {
        0 => here.collect(),
        100 => there.collect(),
        _ => here.cycle().zip(there).flat_map(|(a, b)| [a, b]).collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The median of 200 KEEPALIVE round trips on an idle TLS connection to `node`.
async fn keepalive_rtt(c: &Cluster, token: &[u8]) -> Duration {
    let node = c.node(0);
    let address = format!("127.0.0.1:{}", node.tls_port);
    let mut conn = tls(&address, fingerprint_of(node)).await;
    let resume = Credential::Resume(ResumeToken::from_slice(token).unwrap());
    conn.login("req", caps::ALL | caps::REQUESTER, resume).await;
    let mut rtts: Vec<Duration> = Vec::new();
    for seq in 0..200 {
        let t0 = Instant::now();
        conn.send(&[Frame::KeepAlive { seq }]).await;
        while !matches!(conn.next().await, Frame::KeepAliveAck { .. }) {}
        rtts.push(t0.elapsed());
    }
    rtts.sort();
    percentile(&rtts, 0.5)
}

#[test]
#[ignore = "a measurement: run explicitly, see the module docs"]
fn redirect_figures() {
    let c = Cluster::start(NODES);
    c.add(0, "req");
    for node in 0..NODES {
        for i in 0..DEVICES_PER_NODE {
            c.add(0, &device_name(node, i));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Devices: a password login, then the token for the other connections.
        for node in 0..NODES {
            for i in 0..DEVICES_PER_NODE {
                let name = device_name(node, i);
                let mut first = plain(c.node(node)).await;
                let pw = Credential::Password(Password::new(PASSWORD).unwrap());
                let token = first.login(&name, caps::ALL, pw).await;
                tokio::spawn(device(first));
                for _ in 1..DEVICE_CONNECTIONS {
                    let mut more = plain(c.node(node)).await;
                    let resume = Credential::Resume(ResumeToken::from_slice(&token).unwrap());
                    more.login(&name, caps::ALL, resume).await;
                    tokio::spawn(device(more));
                }
            }
        }
        let pw = Credential::Password(Password::new(PASSWORD).unwrap());
        let token = plain(c.node(0))
            .await
            .login("req", caps::ALL | caps::REQUESTER, pw)
            .await;
        // Every node knows where every device is before the clock starts.
        for node in 0..NODES {
            for target in targets(node, 100) {
                let mut probe = plain(c.node(node)).await;
                let resume = Credential::Resume(ResumeToken::from_slice(&token).unwrap());
                let follows = caps::ALL | caps::REQUESTER | caps::REDIRECT;
                probe.login("req", follows, resume).await;
                let start = Instant::now();
                loop {
                    probe.send(&[demand(&target)]).await;
                    if let Frame::DemandResult(DemandResult::Redirect(_)) = probe.next().await {
                        break;
                    }
                    assert!(start.elapsed() < Duration::from_secs(10), "{target}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let rtt = keepalive_rtt(&c, &token).await;
        eprintln!(
            "redirect figures: {NODES} nodes, {} devices x {DEVICE_CONNECTIONS} connections, \
             {} requesters, {ROUNDS} rounds of {ROUND:?} per mix; loopback KEEPALIVE round \
             trip on TLS (median): {}",
            NODES * DEVICES_PER_NODE,
            NODES * REQUESTERS_PER_NODE,
            ms(rtt)
        );
        let mut same_p99 = None;
        for cross_percent in [0, 50, 100] {
            let mut rates = Vec::new();
            let (mut same, mut cross, mut steps) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let until = Instant::now() + ROUND;
                let started = Instant::now();
                let mut workers = Vec::new();
                for node in 0..NODES {
                    for _ in 0..REQUESTERS_PER_NODE {
                        workers.push(tokio::spawn(requester(
                            format!("127.0.0.1:{}", c.node(node).tls_port),
                            fingerprint_of(c.node(node)),
                            token.clone(),
                            targets(node, cross_percent),
                            until,
                        )));
                    }
                }
                let mut accepted = 0;
                for w in workers {
                    let (s, x, st) = w.await.unwrap();
                    accepted += s.len() + x.len();
                    same.extend(s);
                    cross.extend(x);
                    steps.extend(st);
                }
                rates.push(accepted as f64 / started.elapsed().as_secs_f64());
            }
            same.sort();
            cross.sort();
            let line = |what: &str, v: &[Duration]| {
                if v.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {what} DEMAND->Accepted p50 {} p99 {} (n={})",
                        ms(percentile(v, 0.5)),
                        ms(percentile(v, 0.99)),
                        v.len()
                    )
                }
            };
            eprintln!(
                "redirect figures: {cross_percent:>3} % cross-node: {:.0} accepted demands/s \
                 (median of {ROUNDS}){}{}",
                median(rates),
                line("same-node", &same),
                line("cross-node", &cross),
            );
            if cross_percent == 0 {
                same_p99 = Some(percentile(&same, 0.99));
            }
            if !steps.is_empty() {
                let step = |i: usize| {
                    let mut v: Vec<Duration> = steps.iter().map(|s: &Steps| s[i]).collect();
                    v.sort();
                    ms(percentile(&v, 0.5))
                };
                eprintln!(
                    "redirect figures: {cross_percent:>3} % cross-node, a redirected demand's \
                     steps (p50): DEMAND to Redirect {}, TCP+TLS to the node {}, LOGIN+DEMAND \
                     there to Accepted {}",
                    step(0),
                    step(1),
                    step(2)
                );
            }
            if let (100, Some(base)) = (cross_percent, same_p99) {
                let extra = percentile(&cross, 0.99).saturating_sub(base);
                eprintln!(
                    "redirect figures: a redirect adds {} to the p99 (cross-node 100 % vs \
                     same-node 0 %), {:.1} loopback KEEPALIVE round trips",
                    ms(extra),
                    extra.as_secs_f64() / rtt.as_secs_f64()
                );
            }
        }
    });
    rt.shutdown_background();
}
