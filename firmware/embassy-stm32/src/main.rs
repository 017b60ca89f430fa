//! The relay agent on embassy, for a real board: NUCLEO-F429ZI (STM32F429ZI, on-chip
//! Ethernet MAC and its LAN8742 PHY, DHCP), over the device channel with the relay's key
//! pinned.
//!
//! The device logs in as `cam-1` and serves `echo` to whoever the relay lets reach it;
//! the blue USER button asks the relay for a session with `alice`'s `echo` (what comes
//! back is echoed again, so the two devices ping-pong until one ends). One task runs the
//! agent: [`EmbassyTcp::step`] polls it and awaits the sockets and its deadline, inside a
//! `select` with the button, which is safe because `step` is cancel-safe (see
//! relay-embedded's embassy module).
//!
//! Build: `cargo build --release` here (target thumbv7em-none-eabihf); flash and run with
//! probe-rs (`cargo run --release`). Put the relay's address, its channel key (as
//! `relay serve` prints it, channel_key=…, base64-decoded) and the password below.
#![no_std]
#![no_main]

use core::panic::PanicInfo;

use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Ipv4Address, StackResources};
use embassy_stm32::eth::{Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::peripherals::{ETH, ETH_SMA};
use embassy_stm32::rng::Rng;
use embassy_stm32::time::Hertz;
use embassy_stm32::{Config, bind_interrupts, eth, peripherals, rng};
use static_cell::StaticCell;

#[cfg(not(feature = "no-terminal"))]
use {
    embassy_futures::select::{Either, select},
    embassy_stm32::exti::{self, ExtiInput},
    embassy_stm32::gpio::Pull,
    embassy_stm32::interrupt,
    embassy_stm32::mode::Async,
    relay_embedded::relay_proto::ident::{Password, ServiceName, UserId},
    relay_embedded::relay_proto::terminal::Config as TerminalConfig,
    relay_embedded::{Agent, EmbassyTcp, Echo, proto_now},
};
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
use relay_embedded::{Channel, relay_proto::time::Duration};

#[cfg(not(feature = "no-terminal"))]
bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    HASH_RNG => rng::InterruptHandler<peripherals::RNG>;
    EXTI15_10 => exti::InterruptHandler<interrupt::typelevel::EXTI15_10>;
});

#[cfg(feature = "no-terminal")]
bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    HASH_RNG => rng::InterruptHandler<peripherals::RNG>;
});

/// The relay (its address as the board reaches it, its device-channel port = its TLS
/// port).
const RELAY: (Ipv4Address, u16) = (Ipv4Address::new(203, 0, 113, 10), 7835);
/// The relay's channel public key: `relay serve` prints it (channel_key=…, base64).
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
const RELAY_KEY: [u8; 32] = [0x42; 32];
/// Relay connections: one logged-in spare plus one for a session.
const CONNS: usize = 2;
/// Socket buffers per connection: the transmit side must hold a control frame and its
/// channel record (`MIN_CHANNEL_SOCKET_TX`, 357 bytes) free; the receive side at least
/// twice `CARRY` (a frame that straddles the end of the ring).
const SOCK_RX: usize = 1024;
const SOCK_TX: usize = 1024;

/// Footprint probe read by `size.sh` (target sizes, not the host's): `[size_of
/// Agent<CONNS>, size_of EmbassyTcp<CONNS>, size_of Channel<1>, size_of Channel<2>]`.
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
#[used]
#[unsafe(no_mangle)]
static RELAY_FOOTPRINT: [u32; 4] = [
    core::mem::size_of::<Agent<CONNS>>() as u32,
    core::mem::size_of::<Tcp>() as u32,
    core::mem::size_of::<Channel<1>>() as u32,
    core::mem::size_of::<Channel<2>>() as u32,
];

/// The relay connections: a carry of one channel record per connection under the
/// channel, of one control frame on plain TCP.
#[cfg(not(any(feature = "no-terminal", feature = "plain-terminal")))]
type Tcp = EmbassyTcp<'static, CONNS, { relay_embedded::CARRY_CHANNEL }>;
#[cfg(feature = "plain-terminal")]
type Tcp = EmbassyTcp<'static, CONNS>;

type Device = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Device>) -> ! {
    runner.run().await
}

#[embassy_executor::main]
async fn main(spawner: Spawner) -> ! {
    let p = embassy_stm32::init(clocks());
    let mut rng = Rng::new(p.RNG, Irqs);
    let mut seed = [0; 8];
    rng.async_fill_bytes(&mut seed).await.ok();
    let seed = u64::from_le_bytes(seed);

    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
    let device = Ethernet::new(
        PACKETS.init(PacketQueue::new()),
        p.ETH,
        Irqs,
        p.PA1,
        p.PA7,
        p.PC4,
        p.PC5,
        p.PG13,
        p.PB13,
        p.PG11,
        [0x02, 0x00, 0x00, 0x5e, 0x1a, 0x01],
        p.ETH_SMA,
        p.PA2,
        p.PC1,
    );
    static RESOURCES: StaticCell<StackResources<{ CONNS + 1 }>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    match net_task(runner) {
        Ok(task) => spawner.spawn(task),
        Err(_) => halt(),
    }
    stack.wait_config_up().await;

    static BUFFERS: StaticCell<[[u8; SOCK_RX]; 2 * CONNS]> = StaticCell::new();
    let [a, b, c, d] = BUFFERS.init([[0; SOCK_RX]; 2 * CONNS]);
    let sockets = [
        TcpSocket::new(stack, a, &mut b[..SOCK_TX]),
        TcpSocket::new(stack, c, &mut d[..SOCK_TX]),
    ];

    #[cfg(not(feature = "no-terminal"))]
    {
        let button = ExtiInput::new(p.PC13, p.EXTI13, Pull::Down, Irqs);
        relay(Tcp::new(sockets, RELAY.into()), rng, button, seed).await
    }
    #[cfg(feature = "no-terminal")]
    plain_echo(sockets).await
}

/// The baseline: the same sockets as plain TCP echo clients of the relay's address, so
/// the flash difference to the full build is the relay's alone (embassy-net's TCP is
/// linked in both).
#[cfg(feature = "no-terminal")]
async fn plain_echo(mut sockets: [TcpSocket<'static>; CONNS]) -> ! {
    let [s, ..] = &mut sockets;
    loop {
        if s.connect(RELAY).await.is_ok() {
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                if embedded_io_async::Write::write_all(s, &buf[..n]).await.is_err() {
                    break;
                }
            }
        }
        s.abort();
    }
}

/// The agent's task: log in, serve `echo`, demand a session on each button press.
#[cfg(not(feature = "no-terminal"))]
async fn relay(
    mut tcp: Tcp,
    mut rng: Rng<'static, peripherals::RNG>,
    mut button: ExtiInput<'static, Async>,
    seed: u64,
) -> ! {
    let (Ok(user), Ok(password), Ok(peer), Ok(echo)) = (
        UserId::new("cam-1"),
        Password::new("device password from provisioning"),
        UserId::new("alice"),
        ServiceName::new("echo"),
    ) else {
        halt()
    };
    let mut agent: Agent<CONNS> = Agent::new(TerminalConfig::default(), user, password, seed);
    let mut service = Echo;
    agent.start(proto_now());
    #[cfg(feature = "plain-terminal")]
    let _ = &mut rng;
    #[cfg(not(feature = "plain-terminal"))]
    let mut channel: Channel<CONNS> = Channel::new(RELAY_KEY, Duration::from_secs(10));
    loop {
        #[cfg(feature = "plain-terminal")]
        let step = tcp.step(|now, t| agent.poll(now, t, &mut service));
        #[cfg(not(feature = "plain-terminal"))]
        let step = tcp.step(|now, t| {
            let next = agent.poll(now, &mut channel.bind(now, t, &mut rng), &mut service);
            // A wrong pinned key shows here (`Failure::Refused`/`BadAnswer`) at every
            // retry; a board would blink an LED or log it.
            while channel.take_failure().is_some() {}
            match (next, channel.poll_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        if let Either::Second(()) = select(step, button.wait_for_rising_edge()).await {
            // Fails when no connection is idle yet: press again.
            let _ = agent.demand(peer.clone(), echo.clone(), proto_now());
        }
    }
}

/// 180 MHz from the NUCLEO's 8 MHz clock (the ST-LINK's MCO, HSE bypass); Ethernet
/// needs at least 25 MHz on AHB.
fn clocks() -> Config {
    use embassy_stm32::rcc::{
        AHBPrescaler, APBPrescaler, Hse, HseMode, Pll, PllMul, PllPDiv, PllPreDiv, PllSource,
        Sysclk,
    };
    let mut config = Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz(8_000_000),
        mode: HseMode::Bypass,
    });
    config.rcc.pll_src = PllSource::HSE;
    config.rcc.pll = Some(Pll {
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL180,
        divp: Some(PllPDiv::DIV2),
        divq: None,
        divr: None,
    });
    config.rcc.ahb_pre = AHBPrescaler::DIV1;
    config.rcc.apb1_pre = APBPrescaler::DIV4;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.sys = Sysclk::PLL1_P;
    config
}

fn halt() -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}

/// No unwinding, no formatting: park the core (a watchdog resets the board).
#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    halt()
}
