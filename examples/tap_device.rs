//! A device behind NAT exposing two services through the relay, on smoltcp over TAP.
//!
//! This is what a board does, run on Linux: the device's TCP/IP is smoltcp on a TAP
//! interface (no kernel TCP on the device side); the kernel only forwards and
//! masquerades its packets (see `tests/embedded_nat.sh`). Through the relay it serves
//!
//! - `echo`: every byte back, byte-exact;
//! - `http`: a tiny HTTP/1.0 status page generated on the device itself.
//!
//! ```text
//! tap_device --tap tap0 --ip 10.77.1.2/24 --gw 10.77.1.1 --relay 10.77.2.2:7835 \
//!            --relay-key KEY --user cam-1 --password device-secret [--seconds 30]
//! ```
//! The device talks to the relay over the encrypted device channel (Noise NK), pinning
//! the relay's channel key (`KEY`, as `relay serve` prints it) on the relay's TLS port.
//! `--plain` instead of `--relay-key` speaks plain TCP, to a relay's `--allow-plain`
//! listener, for closed networks only.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant as StdInstant;

use relay_embedded::rand_core::OsRng;
use relay_embedded::relay_proto::ident::{Password, ServiceName, UserId};
use relay_embedded::relay_proto::terminal::{self, Event, Handle};
use relay_embedded::relay_proto::time::Duration;
use relay_embedded::relay_proto::time::Instant;
use relay_embedded::{Agent, Channel, Decision, Service, Session, SmolTcp, smol_instant};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Medium, TunTapInterface, wait};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpCidr, IpEndpoint, Ipv4Address};

/// The services this device offers, by name.
const SERVICES: [&str; 2] = ["echo", "http"];
/// Relay connections: 2 idle spares and room for 2 sessions at once.
const CONNS: usize = 4;
/// What a board with 64 KiB of RAM would give each relay connection.
const SOCK_RX: usize = 4096;
const SOCK_TX: usize = 4096;
/// Largest HTTP request head we read.
const REQ_MAX: usize = 512;

/// Per-session state of the device's services, indexed by the connection handle. (The
/// host example boxes the request buffer; a board keeps a fixed array per handle.)
#[derive(Debug, Default)]
enum Slot {
    #[default]
    None,
    Echo,
    /// Reading the request head, then writing `response` from `sent`.
    Http {
        req: Box<heapless_buf::Buf<REQ_MAX>>,
        response: Option<String>,
        sent: usize,
    },
}

mod heapless_buf {
    /// A fixed-capacity byte buffer (the device has no heap for request heads).
    #[derive(Debug)]
    pub struct Buf<const N: usize> {
        pub bytes: [u8; N],
        pub len: usize,
    }
    impl<const N: usize> Default for Buf<N> {
        fn default() -> Self {
            Buf {
                bytes: [0; N],
                len: 0,
            }
        }
    }
}

#[derive(Debug)]
struct Device {
    slots: [Slot; CONNS],
    started: StdInstant,
    sessions: u64,
    echoed: u64,
    up: bool,
}

impl Device {
    fn status_page(&self) -> String {
        let body = format!(
            "relay-embedded device\nuptime_s: {}\nlogged_in: {}\nsessions_served: {}\nbytes_echoed: {}\n",
            self.started.elapsed().as_secs(),
            self.up,
            self.sessions,
            self.echoed
        );
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        )
    }
}

impl Service for Device {
    fn on_notice(&mut self, _: Handle, from: &UserId, service: &ServiceName) -> Decision {
        log::info!("demand from {from} for {service:?}");
        // relay-proto's one admission rule, as relay-host's `expose` applies it: the same
        // reasons (and texts) for the requester, and a name is required with two services.
        match terminal::admit(from, service, &SERVICES, &[]) {
            Ok(_) => Decision::Accept,
            Err(reason) => Decision::Reject(reason),
        }
    }

    fn on_open(&mut self, s: &mut Session<'_>) {
        self.sessions += 1;
        let slot = match s.info().service.as_str() {
            "http" => Slot::Http {
                req: Default::default(),
                response: None,
                sent: 0,
            },
            _ => Slot::Echo,
        };
        if let Some(x) = self.slots.get_mut(usize::from(s.handle().0)) {
            *x = slot;
        }
    }

    fn on_data(&mut self, s: &mut Session<'_>, data: &[u8]) -> usize {
        let page = self.status_page();
        match self.slots.get_mut(usize::from(s.handle().0)) {
            Some(Slot::Echo) => {
                let n = s.write(data);
                self.echoed += n as u64;
                n
            }
            Some(Slot::Http { req, response, .. }) => {
                // Keep the head (bounded); once it is complete, the page is ready.
                let room = REQ_MAX - req.len;
                let take = data.len().min(room);
                req.bytes[req.len..req.len + take].copy_from_slice(&data[..take]);
                req.len += take;
                let head = &req.bytes[..req.len];
                if response.is_none()
                    && (head.windows(4).any(|w| w == b"\r\n\r\n") || req.len == REQ_MAX)
                {
                    *response = Some(page);
                }
                data.len()
            }
            _ => data.len(),
        }
    }

    fn on_writable(&mut self, s: &mut Session<'_>) {
        if let Some(Slot::Http {
            response: Some(r),
            sent,
            ..
        }) = self.slots.get_mut(usize::from(s.handle().0))
        {
            *sent += s.write(&r.as_bytes()[*sent..]);
            if *sent == r.len() {
                s.terminate();
            }
        }
    }

    fn on_peer_end(&mut self, s: &mut Session<'_>) {
        // An HTTP response still being written ends in on_writable.
        if !matches!(
            self.slots.get(usize::from(s.handle().0)),
            Some(Slot::Http { .. })
        ) {
            s.terminate();
        }
    }

    fn on_close(&mut self, h: Handle) {
        if let Some(x) = self.slots.get_mut(usize::from(h.0)) {
            *x = Slot::None;
        }
    }

    fn on_event(&mut self, e: &Event) {
        match e {
            Event::LoggedIn => {
                self.up = true;
                log::info!("logged in: reachable through the relay");
            }
            Event::Down => {
                self.up = false;
                log::warn!("relay unreachable; reconnecting with back-off");
            }
            Event::LoginRefused { code, text } => log::error!("login refused: {code:?} {text}"),
            other => log::debug!("{other:?}"),
        }
    }
}

/// How the device reaches the relay.
enum Link {
    /// The device channel, pinning this key.
    Channel(Box<Channel<CONNS>>),
    /// Plain TCP (`--plain`).
    Plain,
}

type DeviceAgent = Agent<CONNS>;

/// One agent poll over the device's link; returns the next deadline (the agent's or the
/// channel's handshake deadline) and logs each channel failure once.
fn poll_agent(
    agent: &mut DeviceAgent,
    link: &mut Link,
    mut tcp: relay_embedded::Bound<'_, '_, CONNS>,
    device: &mut Device,
    now: Instant,
) -> Option<Instant> {
    match link {
        Link::Plain => agent.poll(now, &mut tcp, device),
        Link::Channel(ch) => {
            let next = agent.poll(now, &mut ch.bind(now, &mut tcp, &mut OsRng), device);
            while let Some((slot, why)) = ch.take_failure() {
                log::error!("relay channel (connection {slot}): {why}");
            }
            [next, ch.poll_at()].into_iter().flatten().min()
        }
    }
}

/// A 32-byte key from base64 (as `relay serve` prints it) or hex.
fn parse_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let bytes = if s.len() == 64 {
        (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| "bad --relay-key hex")?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| "bad --relay-key base64")?
    };
    bytes
        .try_into()
        .map_err(|_| "--relay-key is 32 bytes".to_string())
}

struct Args {
    tap: String,
    ip: IpCidr,
    gw: Ipv4Address,
    relay: IpEndpoint,
    /// `None`: `--plain`.
    relay_key: Option<[u8; 32]>,
    user: UserId,
    password: Password,
    seconds: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut tap = "tap0".to_string();
    let mut ip = None;
    let mut gw = None;
    let mut relay = None;
    let mut user = None;
    let mut password = std::env::var("RELAY_PASSWORD").ok();
    let mut seconds = None;
    let mut relay_key = None;
    let mut plain = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--tap" => tap = val()?,
            "--ip" => ip = Some(val()?.parse::<IpCidr>().map_err(|_| "bad --ip")?),
            "--gw" => gw = Some(val()?.parse::<Ipv4Address>().map_err(|_| "bad --gw")?),
            "--relay" => {
                let v = val()?;
                let (a, p) = v.rsplit_once(':').ok_or("--relay wants ADDR:PORT")?;
                let a = a.parse::<Ipv4Address>().map_err(|_| "bad relay address")?;
                let p = p.parse::<u16>().map_err(|_| "bad relay port")?;
                relay = Some(IpEndpoint::new(a.into(), p));
            }
            "--relay-key" => relay_key = Some(parse_key(&val()?)?),
            "--plain" => plain = true,
            "--user" => user = Some(val()?),
            "--password" => password = Some(val()?),
            "--seconds" => seconds = Some(val()?.parse().map_err(|_| "bad --seconds")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if plain == relay_key.is_some() {
        return Err("one of --relay-key KEY (the encrypted channel) or --plain is required".into());
    }
    Ok(Args {
        relay_key,
        tap,
        ip: ip.ok_or("--ip is required")?,
        gw: gw.ok_or("--gw is required")?,
        relay: relay.ok_or("--relay is required")?,
        user: UserId::new(&user.ok_or("--user is required")?).map_err(|e| e.to_string())?,
        password: Password::new(&password.ok_or("--password or RELAY_PASSWORD is required")?)
            .map_err(|e| e.to_string())?,
        seconds,
    })
}

const USAGE: &str = "usage: tap_device --tap TAP --ip ADDR/LEN --gw ADDR --relay ADDR:PORT \
(--relay-key KEY | --plain) --user ID --password PW [--seconds N]";

fn main() -> ExitCode {
    // Info by default; RUST_LOG=debug shows every terminal event.
    let level = match std::env::var("RUST_LOG").as_deref() {
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("tap_device: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tap_device: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let mut tap = TunTapInterface::new(&args.tap, Medium::Ethernet).map_err(|e| {
        format!(
            "open TAP {}: {e} (run inside the namespace, as root)",
            args.tap
        )
    })?;
    let started = StdInstant::now();
    let clock = || Instant::from_millis(started.elapsed().as_millis() as u64);
    // A board takes these from its RNG peripheral; the host from its clock and pid.
    let seed = u64::from(std::process::id())
        ^ started.elapsed().as_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);

    let mac = EthernetAddress([
        0x02,
        0x52,
        0x4c,
        (seed >> 16) as u8,
        (seed >> 8) as u8,
        seed as u8,
    ]);
    let mut config = Config::new(mac.into());
    config.random_seed = seed;
    let mut iface = Interface::new(config, &mut tap, smol_instant(clock()));
    iface.update_ip_addrs(|a| {
        let _ = a.push(args.ip);
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(args.gw)
        .map_err(|e| format!("route: {e:?}"))?;

    let mut sockets = SocketSet::new(vec![]);
    let handles = std::array::from_fn(|_| {
        sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCK_RX]),
            tcp::SocketBuffer::new(vec![0; SOCK_TX]),
        ))
    });
    let mut net = SmolTcp::<CONNS>::new(handles, args.relay, seed as u16);
    let cfg = terminal::Config {
        spare: 2,
        ..terminal::Config::default()
    };
    let mut agent: DeviceAgent = Agent::new(cfg, args.user, args.password, seed);
    let mut link = match args.relay_key {
        Some(key) => Link::Channel(Box::new(Channel::new(key, Duration::from_secs(10)))),
        None => Link::Plain,
    };
    let mut device = Device {
        slots: Default::default(),
        started,
        sessions: 0,
        echoed: 0,
        up: false,
    };
    log::info!(
        "device {} on {} via {}, relay {} ({}), {} connections x {} B socket buffers",
        args.ip,
        args.tap,
        args.gw,
        args.relay,
        match link {
            Link::Channel(_) => "encrypted channel, relay key pinned",
            Link::Plain => "PLAIN TCP: password and data in clear",
        },
        CONNS,
        SOCK_RX + SOCK_TX
    );
    agent.start(clock());
    loop {
        let now = clock();
        if args.seconds.is_some_and(|s| now.as_millis() >= s * 1000) {
            agent.logout(now);
            // Let LOGOUT go out, then stop.
            for _ in 0..50 {
                let now = clock();
                iface.poll(smol_instant(now), &mut tap, &mut sockets);
                let tcp = net.bind(&mut iface, &mut sockets);
                poll_agent(&mut agent, &mut link, tcp, &mut device, now);
                iface.poll(smol_instant(now), &mut tap, &mut sockets);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            log::info!(
                "done: {} sessions, {} bytes echoed",
                device.sessions,
                device.echoed
            );
            return Ok(());
        }
        iface.poll(smol_instant(now), &mut tap, &mut sockets);
        let tcp = net.bind(&mut iface, &mut sockets);
        let next = poll_agent(&mut agent, &mut link, tcp, &mut device, now);
        iface.poll(smol_instant(now), &mut tap, &mut sockets);
        // Sleep until a frame arrives, smoltcp has work, or the agent's deadline.
        let mut delay = iface
            .poll_delay(smol_instant(now), &sockets)
            .map_or(1000, |d| d.total_millis());
        if let Some(next) = next {
            delay = delay.min(next.as_millis().saturating_sub(now.as_millis()));
        }
        // Sessions may be waiting for socket space that an ACK frees: poll soon.
        delay = delay.clamp(0, 100);
        let _ = wait(
            tap.as_raw_fd(),
            Some(smoltcp::time::Duration::from_millis(delay)),
        );
    }
}

/// Minimal stderr logger (the example stays dependency-light, like firmware).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) && !r.target().starts_with("smoltcp") {
            eprintln!("{:5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}
