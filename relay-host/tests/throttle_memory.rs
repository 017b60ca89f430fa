//! The login throttle's memory under a flood of distinct sources (issue 11): 100,000
//! sources, each failing once for one account and once for a name of its own, every one
//! in its own IPv4 /24 (the worst case: one key per source in every table). Counts the
//! heap bytes the throttle holds with a counting allocator and prints them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use relay_host::throttle::{DEFAULT_MAX_TRACKED, LoginThrottle};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SOURCES: u32 = 100_000;

#[test]
fn throttle_memory_at_100000_distinct_sources() {
    let before = LIVE.load(Ordering::Relaxed);
    let mut t = LoginThrottle::new(10, 30, DEFAULT_MAX_TRACKED);
    let t0 = Instant::now();
    let mut name = String::new();
    for i in 0..SOURCES {
        // 10.x.y.1 with x.y = i: a distinct /24 per source.
        let ip = IpAddr::V4(Ipv4Addr::from((10 << 24) | (i << 8) | 1));
        let now = t0 + Duration::from_millis(u64::from(i));
        t.record_failure("cam", ip, now);
        name.clear();
        name.push_str(&format!("user{i}"));
        t.record_failure(&name, ip, now);
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let (pairs, networks, accounts) = t.tracked();
    println!(
        "throttle after {SOURCES} distinct sources: {pairs} pairs, {networks} networks, \
         {accounts} accounts tracked; {:.1} MiB of heap ({} bytes)",
        bytes as f64 / (1024.0 * 1024.0),
        bytes
    );
    for n in [pairs, networks, accounts] {
        assert!(n <= DEFAULT_MAX_TRACKED);
    }
    assert!(bytes < 32 << 20, "{bytes} bytes");
    // The flood did not push out a guesser that is backing off.
    let guesser = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let later = t0 + Duration::from_secs(200);
    for _ in 0..5 {
        t.record_failure("cam", guesser, later);
    }
    assert!(t.check("cam", guesser, later).is_err());
}
