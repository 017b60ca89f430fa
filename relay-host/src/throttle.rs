//! Failed-login throttling that slows password guessing without giving anyone a lever to
//! lock a device out (docs/SECURITY.md, "Password guessing", has the policy and numbers).
//!
//! Failures are counted in three tables: per (account, source), per source network
//! (IPv4 /24, IPv6 /64) and per account. Each counter allows a number of free failures
//! and then backs off exponentially: after `n` failures past the free ones the key waits
//! [`BASE`]` · 2^n` (at most [`CAP`]) from its last failure. The one rule that keeps this
//! from being a lockout lever: **only a (account, source) pair that has failed is ever
//! refused.** The network and account counters only lengthen the wait of such pairs, so
//! a guesser behind the same NAT, or one spraying from a thousand addresses, cannot keep
//! a device that knows its password out. Resumption tokens are not throttled at all
//! (the host never asks: an HMAC cannot be guessed and costs no hash).
//!
//! Memory is bounded: each table holds at most `max_tracked` entries of 24 bytes (keys are
//! hashed with a per-process key, so no name is stored; times are milliseconds). When a table is full
//! it forgets, at most once a second, every key that is not backing off now; a key that
//! still finds no room is not tracked (fail open: refusing new sources would be the
//! lockout lever again). Counters are forgotten [`FORGET`] after their last failure.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The first back-off step.
pub const BASE: Duration = Duration::from_secs(1);

/// The longest back-off.
pub const CAP: Duration = Duration::from_secs(15 * 60);

/// A counter with no failure for this long starts again from zero.
pub const FORGET: Duration = Duration::from_secs(60 * 60);

/// Failures of one (account, source) pair before it backs off (typos are free).
pub const PAIR_FREE: u32 = 3;

/// Default cap on the keys each table tracks (well under 10 MiB for all three).
pub const DEFAULT_MAX_TRACKED: usize = 65_536;

/// Which counter set the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    /// This source's own failures for this account.
    Source,
    /// Failures from this source's network, for any account.
    Network,
    /// Failures for this account, from any source.
    Account,
}

/// A login refused without checking the password: this source failed for this account
/// and must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("too many failed logins {}; retry in {}s", match .scope {
    ThrottleScope::Source => "from this address for this account",
    ThrottleScope::Network => "from this network",
    ThrottleScope::Account => "for this account",
}, retry_secs(.retry_after))]
pub struct Throttled {
    /// Which counter set the wait.
    pub scope: ThrottleScope,
    /// How long until a login from this source for this account is checked again.
    pub retry_after: Duration,
}

/// `d` in whole seconds, rounded up, at least 1: what a terminal is told to wait.
pub fn retry_secs(d: &Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// The failure counters.
#[derive(Debug)]
pub struct LoginThrottle {
    keys: RandomState,
    /// Times are milliseconds since this instant.
    epoch: Instant,
    pairs: Table,
    networks: Table,
    accounts: Table,
}

impl LoginThrottle {
    /// Backs off an account after `account_free` failures from all sources and a source
    /// network after `network_free` failures for all accounts, tracking at most
    /// `max_tracked` keys in each table.
    pub fn new(account_free: u32, network_free: u32, max_tracked: usize) -> Self {
        Self {
            keys: RandomState::new(),
            epoch: Instant::now(),
            pairs: Table::new(PAIR_FREE, max_tracked),
            networks: Table::new(network_free, max_tracked),
            accounts: Table::new(account_free, max_tracked),
        }
    }

    /// Whether a password login for `account` from `source` may be checked at `now`.
    /// Always yes for a pair with no recent failure.
    pub fn check(&self, account: &str, source: IpAddr, now: Instant) -> Result<(), Throttled> {
        let (pair, network, name) = self.keys(account, source);
        let ms = self.ms(now);
        let Some(pair) = self.pairs.live(pair, ms) else {
            return Ok(());
        };
        let waits = [
            (ThrottleScope::Source, Some(pair)),
            (ThrottleScope::Network, self.networks.live(network, ms)),
            (ThrottleScope::Account, self.accounts.live(name, ms)),
        ];
        let (scope, until) = waits
            .into_iter()
            .filter_map(|(scope, r)| Some((scope, r?)))
            .map(|(scope, (r, free))| (scope, r.until(free)))
            .max_by_key(|&(_, until)| until)
            .expect("the pair is always there");
        match until.checked_sub(ms) {
            Some(left) if left > 0 => Err(Throttled {
                scope,
                retry_after: Duration::from_millis(left),
            }),
            _ => Ok(()),
        }
    }

    /// The keys of the pair, the source's network and the account.
    fn keys(&self, account: &str, source: IpAddr) -> (u64, u64, u64) {
        let name = self.keys.hash_one(account);
        (
            self.keys.hash_one((name, host_key(source))),
            self.keys.hash_one(network_key(source)),
            name,
        )
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Counts a failed password login for `account` (known or not: the throttle must not
    /// tell them apart) from `source`.
    pub fn record_failure(&mut self, account: &str, source: IpAddr, now: Instant) {
        let (pair, network, name) = self.keys(account, source);
        let ms = self.ms(now);
        self.pairs.record(pair, ms);
        self.networks.record(network, ms);
        self.accounts.record(name, ms);
    }

    /// A good password from `source` for `account`: its own failures are forgiven (the
    /// network's and the account's are not).
    pub fn record_success(&mut self, account: &str, source: IpAddr) {
        let (pair, _, _) = self.keys(account, source);
        self.pairs.map.remove(&pair);
    }

    /// Keys tracked now (pairs, networks, accounts); for tests and metrics.
    pub fn tracked(&self) -> (usize, usize, usize) {
        (
            self.pairs.map.len(),
            self.networks.map.len(),
            self.accounts.map.len(),
        )
    }
}

/// One host: an IPv4 address (IPv4-mapped IPv6 too), an IPv6 /64.
fn host_key(ip: IpAddr) -> u128 {
    match canonical(ip) {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6) & !((1 << 64) - 1),
    }
}

/// One network: an IPv4 /24, an IPv6 /64 (the block one host usually controls). IPv4 keys
/// keep a marker bit so they never equal an IPv6 key.
fn network_key(ip: IpAddr) -> u128 {
    match canonical(ip) {
        IpAddr::V4(v4) => (1 << 127) | u128::from(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => u128::from(v6) & !((1 << 64) - 1),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One key's recent failures.
#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    /// Milliseconds (see [`LoginThrottle::epoch`]).
    last: u64,
}

impl Record {
    /// When (ms) the key's back-off ends, given its free failures.
    fn until(&self, free: u32) -> u64 {
        let Some(over) = self.failures.checked_sub(free) else {
            return self.last;
        };
        let wait = BASE
            .checked_mul(1 << over.min(20))
            .map_or(CAP, |d| d.min(CAP));
        self.last + wait.as_millis() as u64
    }

    fn forgotten(&self, now: u64) -> bool {
        now.saturating_sub(self.last) >= FORGET.as_millis() as u64
    }
}

/// Keys are hashes ([`LoginThrottle::keys`]): fixed size, and nothing to read back.
#[derive(Debug)]
struct Table {
    free: u32,
    max_tracked: usize,
    map: HashMap<u64, Record>,
    last_prune: Option<u64>,
}

impl Table {
    fn new(free: u32, max_tracked: usize) -> Self {
        Self {
            free,
            max_tracked,
            map: HashMap::new(),
            last_prune: None,
        }
    }

    /// `key`'s record and free failures, unless it is forgotten.
    fn live(&self, key: u64, now: u64) -> Option<(Record, u32)> {
        let r = *self.map.get(&key)?;
        (!r.forgotten(now)).then_some((r, self.free))
    }

    fn record(&mut self, key: u64, now: u64) {
        if let Some(r) = self.map.get_mut(&key) {
            r.failures = if r.forgotten(now) {
                1
            } else {
                r.failures.saturating_add(1)
            };
            r.last = now;
            return;
        }
        if self.map.len() >= self.max_tracked {
            self.prune(now);
            if self.map.len() >= self.max_tracked {
                return;
            }
        }
        self.map.insert(
            key,
            Record {
                failures: 1,
                last: now,
            },
        );
    }

    /// Forgets every key that is not backing off at `now`; at most once a second, so a
    /// flood costs no quadratic work.
    fn prune(&mut self, now: u64) {
        let due = self
            .last_prune
            .is_none_or(|t| now.saturating_sub(t) >= 1000);
        if due {
            self.last_prune = Some(now);
            let free = self.free;
            self.map.retain(|_, r| r.until(free) > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));

    fn fail(t: &mut LoginThrottle, account: &str, ip: IpAddr, at: Instant, n: u32) {
        for _ in 0..n {
            t.record_failure(account, ip, at);
        }
    }

    #[test]
    fn a_pair_backs_off_exponentially_after_its_free_failures() {
        let mut t = LoginThrottle::new(100, 100, 16);
        let t0 = Instant::now();
        fail(&mut t, "cam", A, t0, PAIR_FREE - 1);
        assert_eq!(t.check("cam", A, t0), Ok(()), "typos are free");
        fail(&mut t, "cam", A, t0, 1);
        let err = t.check("cam", A, t0).unwrap_err();
        assert_eq!((err.scope, err.retry_after), (ThrottleScope::Source, BASE));
        fail(&mut t, "cam", A, t0, 3);
        assert_eq!(t.check("cam", A, t0).unwrap_err().retry_after, BASE * 8);
        assert_eq!(t.check("cam", A, t0 + BASE * 8), Ok(()));
        fail(&mut t, "cam", A, t0, 30);
        assert_eq!(t.check("cam", A, t0).unwrap_err().retry_after, CAP);
        assert_eq!(
            t.check("cam", A, t0 + Duration::from_millis(1500))
                .unwrap_err()
                .to_string(),
            format!(
                "too many failed logins from this address for this account; retry in {}s",
                CAP.as_secs() - 1
            )
        );
        // Forgotten an hour after the last failure; a success forgives at once.
        assert_eq!(t.check("cam", A, t0 + FORGET), Ok(()));
        t.record_success("cam", A);
        assert_eq!(t.check("cam", A, t0), Ok(()));
    }

    #[test]
    fn network_and_account_lengthen_only_failed_pairs() {
        let mut t = LoginThrottle::new(2, 4, 64);
        let t0 = Instant::now();
        let neighbour = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        // Four names, one failure each, from one /24: the network is at its free limit.
        for name in ["a", "b", "c", "d"] {
            t.record_failure(name, A, t0);
        }
        let err = t.check("a", neighbour, t0);
        assert_eq!(err, Ok(()), "a pair that never failed is never refused");
        let err = t.check("a", A, t0).unwrap_err();
        assert_eq!((err.scope, err.retry_after), (ThrottleScope::Network, BASE));
        // Account "z": two failures from two far networks; a third source that failed once
        // waits the account's back-off, a fresh one does not.
        t.record_failure("z", B, t0);
        t.record_failure("z", IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), t0);
        let err = t.check("z", B, t0).unwrap_err();
        assert_eq!((err.scope, err.retry_after), (ThrottleScope::Account, BASE));
        assert_eq!(
            t.check("z", IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), t0),
            Ok(())
        );
    }

    #[test]
    fn ipv6_hosts_and_networks_are_their_64() {
        let mut t = LoginThrottle::new(100, 100, 16);
        let t0 = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        fail(&mut t, "x", one, t0, PAIR_FREE);
        assert!(t.check("x", same_64, t0).is_err());
        assert!(t.check("x", other_64, t0).is_ok());
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        fail(&mut t, "x", mapped, t0, PAIR_FREE);
        assert!(t.check("x", A, t0).is_err(), "IPv4-mapped counts as IPv4");
        assert!(t.check("x", IpAddr::V6(Ipv6Addr::LOCALHOST), t0).is_ok());
        assert_ne!(network_key(A), network_key("::c000:200".parse().unwrap()));
    }

    #[test]
    fn full_tables_forget_keys_that_are_not_backing_off() {
        let mut t = LoginThrottle::new(100, 100, 4);
        let t0 = Instant::now();
        fail(&mut t, "x", A, t0, PAIR_FREE);
        for i in 0..10u8 {
            t.record_failure("x", IpAddr::V4(Ipv4Addr::new(10, 0, i, 1)), t0);
        }
        assert!(t.tracked().0 <= 4, "never more than the cap");
        assert!(
            t.check("x", A, t0).is_err(),
            "the guesser is still backing off"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_a_second() {
        assert_eq!(retry_secs(&Duration::from_millis(100)), 1);
        assert_eq!(retry_secs(&Duration::ZERO), 1);
        assert_eq!(retry_secs(&Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(&Duration::from_millis(2001)), 3);
    }
}
#[cfg(test)]
mod findings {
    use std::net::Ipv4Addr;

    use super::*;

    const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    const DEVICE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));

    /// Issue 11, finding 1: forty wrong passwords for a user ID from one address must not
    /// refuse the right password from another address.
    #[test]
    fn finding1_guessing_does_not_lock_the_account_out() {
        let mut t = LoginThrottle::new(10, 30, DEFAULT_MAX_TRACKED);
        let t0 = Instant::now();
        for _ in 0..40 {
            t.record_failure("cam", ATTACKER, t0);
        }
        assert_eq!(t.check("cam", DEVICE, t0), Ok(()));
        assert!(t.check("cam", ATTACKER, t0).is_err());
    }

    /// Issue 11, finding 2: forty failures from one address (any user IDs) must not refuse
    /// another account's login from that address (devices behind one NAT).
    #[test]
    fn finding2_a_nat_neighbour_is_not_locked_out() {
        let mut t = LoginThrottle::new(10, 30, DEFAULT_MAX_TRACKED);
        let t0 = Instant::now();
        for i in 0..40 {
            t.record_failure(&format!("guess{i}"), ATTACKER, t0);
        }
        assert_eq!(t.check("cam", ATTACKER, t0), Ok(()));
    }
}
