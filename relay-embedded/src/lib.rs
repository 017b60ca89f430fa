//! Relay terminal for microcontroller-class devices: `#![no_std]`, no allocator.
//!
//! [`Agent`] drives relay-proto's [`Terminal`](relay_proto::terminal::Terminal) (login,
//! spare connections, keep-alive, back-off, demands) over `N` TCP connections of any
//! [`Transport`]; [`SmolTcp`] is the smoltcp one, and [`Channel`] wraps any of them in
//! the relay's encrypted device channel (Noise NK, the relay's key pinned). Sessions that other terminals open to
//! the device are served by a [`Service`] the application implements, so a device can
//! expose an echo service or an HTTP status page without a kernel TCP stack.
//!
//! RAM is fixed and visible: the agent is `size_of::<Agent<N>>()` (no heap), plus the
//! socket buffers the application hands smoltcp. The superloop:
//!
//! ```ignore
//! loop {
//!     let now = clock.now();
//!     iface.poll(smol_instant(now), &mut device, &mut sockets);
//!     let next = agent.poll(now, &mut stack.bind(&mut iface, &mut sockets), &mut service);
//!     // sleep until min(next, iface.poll_at(..)) or the next packet
//! }
//! ```
#![no_std]
#![forbid(unsafe_code)]

mod agent;
#[cfg(feature = "embassy")]
mod embassy;
mod log;
mod noise;
mod service;
#[cfg(feature = "smoltcp")]
mod smol;
mod transport;

pub use agent::{Agent, MIN_SOCKET_RX, MIN_SOCKET_TX};
#[cfg(feature = "embassy")]
pub use embassy::{
    CARRY_CHANNEL, CARRY_PLAIN, EmbassyError, EmbassyIo, EmbassyTcp, embassy_instant, proto_now,
};
pub use noise::{
    Channel, ChannelError, Failure, MIN_CHANNEL_SOCKET_TX, OVERHEAD, PLAIN_BUF, PROLOGUE,
    RECEIVE_LIMIT, RECORD_MAX, SEAL_MAX, Sealed, Sealer,
};
pub use service::{Decision, Echo, Service, Session, SessionInfo};
#[cfg(feature = "smoltcp")]
pub use smol::{Bound, SmolError, SmolTcp, TcpIo, proto_instant, smol_instant};
pub use transport::{LinkState, Transport};

/// The RNG traits [`Channel::bind`] takes (rand_core 0.6, which most HALs implement for
/// their RNG peripheral).
pub use clatter::rand_core;
pub use relay_proto;
#[cfg(feature = "smoltcp")]
pub use smoltcp;
#[cfg(feature = "embassy")]
pub use {embassy_net, embassy_time};
