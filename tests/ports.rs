//! Loopback ports for the servers tests start (relays, metrics endpoints, PostgreSQL).
//!
//! Binding port 0 and releasing it is not enough: the kernel hands the same port out
//! again to the next `bind(0)` or to an outgoing connection, and CI saw a relay's plain
//! listener and its metrics endpoint given one port. So ports come from below the
//! kernel's ephemeral range (32768–60999 by default), where neither `bind(0)` nor an
//! outgoing connection takes them, and a counter hands each out once per process. Each
//! user of this file takes its own [`Lane`], so two copies of the module in one test
//! binary (host_support and postgres_support) cannot hand out the same port either.
//! A port some other program holds is skipped: every candidate is bound once first.

#![allow(dead_code)] // each user takes one lane

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A disjoint range of ports, one per copy of this module in a process.
#[derive(Clone, Copy)]
pub enum Lane {
    /// Relays and the services tests put behind them (tests/host_support.rs).
    Services,
    /// PostgreSQL servers (tests/postgres_support.rs).
    Postgres,
}

impl Lane {
    /// First port and number of ports: both lanes end below 32768.
    fn range(self) -> (u32, u32) {
        match self {
            Lane::Services => (20_000, 9_000),
            Lane::Postgres => (29_000, 3_000),
        }
    }
}

/// A loopback port in `lane` that nothing listens on and that this process has not
/// handed out before. Processes start at different points of the lane (by pid), so two
/// test binaries running at once rarely try the same ports.
pub fn free_port(lane: Lane) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (first, len) = lane.range();
    let start = std::process::id().wrapping_mul(7_919) % len;
    for _ in 0..len {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (first + (start + n) % len) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port left in {first}..{}", first + len)
}
