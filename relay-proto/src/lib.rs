//! The Relay protocol: frames, the terminal's state machines and the relay's core.
//!
//! Sans-IO: nothing here reads a socket or a clock. Callers hand in received bytes and the
//! current [`Instant`]; the machines hand back bytes to send, events and their next
//! deadline. The same code runs in the Linux relay (`relay-host`), on microcontrollers
//! (`relay-embedded`) and in deterministic simulations (feature `sim`).
//!
//! `#![no_std]` and no allocator: every buffer and table is bounded and owned by the
//! caller or sized by a const generic. See `docs/PROTOCOL.md` for the wire format.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

pub mod codes;
pub mod frame;
pub mod ident;
pub mod time;

pub use codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
pub use frame::{Frame, Parsed};
pub use ident::{NodeAddress, Password, ResumeToken, ServiceName, Text, UserId};
pub use time::{Duration, Instant};
pub mod driver;
pub mod relay;
pub mod rng;
#[cfg(feature = "sim")]
pub mod sim;
pub mod terminal;
