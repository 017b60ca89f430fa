//! A firmware-shaped binary: what a Cortex-M4F board running the relay agent links.
//!
//! smoltcp over an Ethernet `Device`, an [`Agent`] with 2 connections serving [`Echo`]
//! over the encrypted device channel ([`Channel`], the relay's key pinned), polled
//! forever from a superloop. The device and the clock are stand-ins (a real board
//! has an Ethernet MAC driver and SysTick); `black_box` keeps the optimizer from
//! proving that no packet ever arrives, so every code path stays in the binary and the
//! size figures are honest. Built with feature `no-terminal`, the same loop drives
//! plain smoltcp TCP sockets instead, so the difference between the two builds is the
//! flash the relay costs on top of smoltcp (`size.sh` prints both). Built with feature
//! `plain-terminal`, the agent speaks plain TCP: the difference to the full build is the
//! channel's flash.
//!
//! Never meant to run: it exists to be measured and to prove that relay-embedded builds
//! for a `no_std`, no-allocator target.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::mem::MaybeUninit;
use core::panic::PanicInfo;

use cortex_m_rt::entry;
use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

#[cfg(not(feature = "no-terminal"))]
use relay_embedded::relay_proto::{self, ident::Password, ident::UserId};
#[cfg(not(feature = "no-terminal"))]
use relay_embedded::{Agent, Echo, SmolTcp, smol_instant};
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
use relay_embedded::{Channel, rand_core};

/// Relay connections (one logged-in spare plus one for a session).
const CONNS: usize = 2;
/// Socket buffers per connection. The transmit buffer must hold at least
/// `relay_embedded::MIN_SOCKET_TX` (339 bytes) free for a control frame, the receive
/// buffer a whole control frame (`MIN_SOCKET_RX`, 323 bytes): the agent keeps received
/// bytes in the socket until they are used.
const SOCK_RX: usize = 1024;
const SOCK_TX: usize = 1024;
const MTU: usize = 1514;

#[cfg(not(feature = "no-terminal"))]
type DeviceAgent = Agent<CONNS>;

/// Footprint probe read by `size.sh` (target sizes, not the host's):
/// `[size_of Terminal<2>, size_of Agent<2>, socket rx, socket tx, size_of Channel<1>,
/// size_of Channel<2>]` (the two channel sizes split it into per-connection and shared).
#[used]
#[unsafe(no_mangle)]
static RELAY_FOOTPRINT: [u32; 6] = [
    core::mem::size_of::<relay_embedded::relay_proto::terminal::Terminal<CONNS>>() as u32,
    core::mem::size_of::<relay_embedded::Agent<CONNS>>() as u32,
    SOCK_RX as u32,
    SOCK_TX as u32,
    core::mem::size_of::<relay_embedded::Channel<1>>() as u32,
    core::mem::size_of::<relay_embedded::Channel<2>>() as u32,
];

/// The relay's channel public key, as `relay serve` prints it (base64), decoded.
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
const RELAY_KEY: [u8; 32] = [0x42; 32];

static mut SOCKET_BUFS: [[u8; SOCK_RX]; 2 * CONNS] = [[0; SOCK_RX]; 2 * CONNS];
static mut SOCKET_STORAGE: [SocketStorage<'static>; CONNS] = [SocketStorage::EMPTY; CONNS];
#[cfg(not(feature = "no-terminal"))]
static mut AGENT: MaybeUninit<DeviceAgent> = MaybeUninit::uninit();
#[cfg(feature = "no-terminal")]
static mut AGENT: MaybeUninit<()> = MaybeUninit::uninit();
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
static mut CHANNEL: MaybeUninit<Channel<CONNS>> = MaybeUninit::uninit();

/// Stand-in for the RNG peripheral (a TRNG): the channel draws each handshake's
/// ephemeral key from it. xorshift over an opaque seed is NOT a secure RNG: it only
/// keeps the optimizer honest here.
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
struct BoardRng(u64);

#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
impl rand_core::RngCore for BoardRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        black_box(self.0)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u64() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
impl rand_core::CryptoRng for BoardRng {}

/// Stand-in for an Ethernet MAC driver: frames come from and go to buffers the
/// optimizer cannot see through.
struct Mac {
    rx: [u8; MTU],
    tx: [u8; MTU],
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a>(&'a mut [u8]);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(black_box(self.0))
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let buf = &mut self.0[..len.min(MTU)];
        let r = f(buf);
        black_box(&*buf);
        r
    }
}

impl Device for Mac {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx<'_>, Tx<'_>)> {
        let len = black_box(0usize).min(MTU);
        if len == 0 {
            return None;
        }
        Some((Rx(&self.rx[..len]), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
}

/// Milliseconds since boot. A board reads SysTick or an RTC here.
fn millis(tick: &mut u64) -> u64 {
    *tick = black_box(*tick + 1);
    *tick
}

#[entry]
fn main() -> ! {
    // SAFETY: `main` runs once and is the only code that touches these statics; each is
    // borrowed exactly once here, for the rest of the program.
    let (bufs, storage, agent_mem) = unsafe {
        (
            &mut *(&raw mut SOCKET_BUFS),
            &mut *(&raw mut SOCKET_STORAGE),
            &mut *(&raw mut AGENT),
        )
    };
    let mut mac = Mac {
        rx: [0; MTU],
        tx: [0; MTU],
    };
    let mut tick = 0u64;
    let mac_addr = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
    let mut iface = Interface::new(Config::new(mac_addr.into()), &mut mac, SmolInstant::ZERO);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::v4(192, 0, 2, 50), 24));
    });
    let _ = iface
        .routes_mut()
        .add_default_ipv4_route(Ipv4Address::new(192, 0, 2, 1));
    let relay = IpEndpoint::new(IpAddress::v4(203, 0, 113, 10), 7000);

    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut handles = [None; CONNS];
    let mut it = bufs.iter_mut();
    for h in handles.iter_mut() {
        if let (Some(rx), Some(tx)) = (it.next(), it.next()) {
            let s = tcp::Socket::new(
                tcp::SocketBuffer::new(&mut rx[..]),
                tcp::SocketBuffer::new(&mut tx[..]),
            );
            *h = Some(sockets.add(s));
        }
    }
    let [Some(h0), Some(h1)] = handles else {
        loop {}
    };

    #[cfg(not(feature = "no-terminal"))]
    {
        let (Ok(user), Ok(password)) = (UserId::new("cam-1"), Password::new("device-secret"))
        else {
            loop {}
        };
        // A board seeds jitter and the first ephemeral port from its RNG peripheral.
        let seed = black_box(0x5eed_u64);
        let agent = agent_mem.write(DeviceAgent::new(
            relay_proto::terminal::Config::default(),
            user,
            password,
            seed,
        ));
        let mut net = SmolTcp::new([h0, h1], relay, seed as u16);
        let mut echo = Echo;
        #[cfg(not(feature = "plain-terminal"))]
        let (channel, mut rng) = {
            // SAFETY: as above, borrowed once, here.
            let mem = unsafe { &mut *(&raw mut CHANNEL) };
            let timeout = relay_proto::Duration::from_secs(10);
            (
                mem.write(Channel::new(black_box(RELAY_KEY), timeout)),
                BoardRng(seed | 1),
            )
        };
        agent.start(relay_proto::Instant::from_millis(millis(&mut tick)));
        loop {
            let now = relay_proto::Instant::from_millis(millis(&mut tick));
            iface.poll(smol_instant(now), &mut mac, &mut sockets);
            let mut tcp = net.bind(&mut iface, &mut sockets);
            #[cfg(not(feature = "plain-terminal"))]
            let next = agent.poll(now, &mut channel.bind(now, &mut tcp, &mut rng), &mut echo);
            #[cfg(feature = "plain-terminal")]
            let next = agent.poll(now, &mut tcp, &mut echo);
            // A board sleeps (WFI) until the earliest of `next`, the channel's
            // `poll_at`, iface.poll_at or the next frame.
            black_box(next);
        }
    }

    #[cfg(feature = "no-terminal")]
    {
        // The same superloop with smoltcp alone: connect both sockets, echo bytes.
        let _ = agent_mem;
        let mut port = 49152u16;
        loop {
            let now = millis(&mut tick);
            let t = SmolInstant::from_millis(now as i64);
            iface.poll(t, &mut mac, &mut sockets);
            for h in [h0, h1] {
                let s = sockets.get_mut::<tcp::Socket>(h);
                if !s.is_open() {
                    port = port.wrapping_add(1).max(49152);
                    let _ = s.connect(iface.context(), relay, port);
                    continue;
                }
                let mut buf = [0u8; 256];
                if let Ok(n) = s.recv_slice(&mut buf) {
                    let _ = s.send_slice(&buf[..n]);
                }
            }
        }
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {}
}
