//! Failed-login throttling, per account and per source address, per minute.
//!
//! A login is checked with [`LoginThrottle::check`] before the password is hashed (so a
//! throttled guesser costs no argon2 run) and a failure is counted with
//! [`LoginThrottle::record_failure`]. A throttled login gets a clear [`Throttled`] answer
//! saying when to retry, not a silent hang.
//!
//! Each key has a fixed one-minute window that starts at its first failure. Memory is
//! bounded: each table holds at most `max_tracked` keys; expired windows are pruned when a
//! table fills (at most once a second, so a flood costs no quadratic work), and a key that
//! finds its table still full of live windows is not tracked (fail open: the other table
//! still bounds it, and refusing all new sources would let one attacker lock everyone out).
//! Callers count per-account failures only for accounts that exist, so a spray of made-up
//! names cannot fill the account table. IPv6 sources are keyed by their /64, the block one
//! host usually controls.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Default cap on the keys each table tracks (about 64 bytes each: a few MiB at most).
pub const DEFAULT_MAX_TRACKED: usize = 65_536;

/// What hit its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    /// Too many failures for this account.
    Account,
    /// Too many failures from this source address.
    Source,
}

/// A login refused without checking the password: too many recent failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("too many failed logins {}; retry in {}s", match .scope {
    ThrottleScope::Account => "for this account",
    ThrottleScope::Source => "from this address",
}, .retry_after.as_secs().max(1))]
pub struct Throttled {
    /// Which limit was hit.
    pub scope: ThrottleScope,
    /// When the window ends.
    pub retry_after: Duration,
}

/// The per-account and per-source failure counters.
#[derive(Debug)]
pub struct LoginThrottle {
    accounts: Table<String>,
    sources: Table<IpAddr>,
}

impl LoginThrottle {
    /// Allows `per_account` and `per_source` failures per minute, tracking at most
    /// `max_tracked` keys in each table.
    pub fn new(per_account: u32, per_source: u32, max_tracked: usize) -> Self {
        Self {
            accounts: Table::new(per_account, max_tracked),
            sources: Table::new(per_source, max_tracked),
        }
    }

    /// Whether a login for `account` from `source` may be attempted at `now`.
    pub fn check(&self, account: &str, source: IpAddr, now: Instant) -> Result<(), Throttled> {
        if let Some(retry_after) = self.sources.blocked(&source_key(source), now) {
            return Err(Throttled {
                scope: ThrottleScope::Source,
                retry_after,
            });
        }
        if let Some(retry_after) = self.accounts.blocked(account, now) {
            return Err(Throttled {
                scope: ThrottleScope::Account,
                retry_after,
            });
        }
        Ok(())
    }

    /// Counts a failed login from `source`; against `account` too when it names an existing
    /// account (`None` for unknown names).
    pub fn record_failure(&mut self, account: Option<&str>, source: IpAddr, now: Instant) {
        self.sources.record(source_key(source), now);
        if let Some(account) = account {
            self.accounts.record(account.to_owned(), now);
        }
    }

    /// Keys tracked now (accounts, sources); for tests and metrics.
    pub fn tracked(&self) -> (usize, usize) {
        (self.accounts.map.len(), self.sources.map.len())
    }
}

/// IPv4 as is (IPv4-mapped IPv6 too); IPv6 by its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    failures: u32,
}

#[derive(Debug)]
struct Table<K> {
    limit: u32,
    max_tracked: usize,
    map: HashMap<K, Window>,
    last_prune: Option<Instant>,
}

impl<K: Hash + Eq> Table<K> {
    fn new(limit: u32, max_tracked: usize) -> Self {
        Self {
            limit,
            max_tracked,
            map: HashMap::new(),
            last_prune: None,
        }
    }

    /// How long `key` stays blocked, if it is.
    fn blocked<Q>(&self, key: &Q, now: Instant) -> Option<Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let w = self.map.get(key)?;
        let left = WINDOW.checked_sub(now.saturating_duration_since(w.start))?;
        (w.failures >= self.limit && !left.is_zero()).then_some(left)
    }

    fn record(&mut self, key: K, now: Instant) {
        if let Some(w) = self.map.get_mut(&key) {
            if now.saturating_duration_since(w.start) >= WINDOW {
                *w = Window {
                    start: now,
                    failures: 1,
                };
            } else {
                w.failures = w.failures.saturating_add(1);
            }
            return;
        }
        if self.map.len() >= self.max_tracked {
            let due = self
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if due {
                self.last_prune = Some(now);
                self.map
                    .retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
            }
            if self.map.len() >= self.max_tracked {
                return;
            }
        }
        self.map.insert(
            key,
            Window {
                start: now,
                failures: 1,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn account_limit_then_window_reset() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(3, 100, 16);
        for i in 0..3 {
            assert_eq!(t.check("cam", A, t0), Ok(()), "attempt {i}");
            t.record_failure(Some("cam"), A, t0);
        }
        let err = t.check("cam", B, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(err.scope, ThrottleScope::Account);
        assert_eq!(err.retry_after, Duration::from_secs(50));
        assert_eq!(
            err.to_string(),
            "too many failed logins for this account; retry in 50s"
        );
        // Other accounts are unaffected.
        assert_eq!(t.check("other", A, t0), Ok(()));
        // The window ends a minute after the first failure.
        assert_eq!(t.check("cam", A, t0 + WINDOW), Ok(()));
        t.record_failure(Some("cam"), A, t0 + WINDOW);
        assert_eq!(t.check("cam", A, t0 + WINDOW), Ok(()));
    }

    #[test]
    fn source_limit_counts_unknown_names() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(100, 2, 16);
        t.record_failure(None, A, t0);
        t.record_failure(None, A, t0);
        let err = t.check("anyone", A, t0).unwrap_err();
        assert_eq!(err.scope, ThrottleScope::Source);
        assert_eq!(t.check("anyone", B, t0), Ok(()));
        assert_eq!(
            t.tracked(),
            (0, 1),
            "unknown names are not tracked per account"
        );
    }

    #[test]
    fn ipv6_is_keyed_by_its_64() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(100, 1, 16);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        t.record_failure(None, one, t0);
        assert!(t.check("x", same_64, t0).is_err());
        assert!(t.check("x", other_64, t0).is_ok());
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(t.check("x", mapped, t0).is_ok());
        t.record_failure(None, mapped, t0);
        assert!(t.check("x", A, t0).is_err(), "IPv4-mapped counts as IPv4");
        assert!(t.check("x", IpAddr::V6(Ipv6Addr::LOCALHOST), t0).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_expired_entries_are_pruned() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(1, 1, 4);
        for i in 0..10u8 {
            t.record_failure(None, IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), t0);
        }
        assert_eq!(t.tracked().1, 4, "never more than the cap");
        // The fifth source was not tracked: fail open.
        assert!(
            t.check("x", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), t0)
                .is_ok()
        );
        assert!(
            t.check("x", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), t0)
                .is_err()
        );
        // After the window, a new key prunes the expired ones and is tracked.
        let later = t0 + WINDOW + Duration::from_secs(1);
        t.record_failure(None, B, later);
        assert_eq!(t.tracked().1, 1);
        assert!(t.check("x", B, later).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_a_second_in_messages() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(1, 100, 4);
        t.record_failure(Some("a"), A, t0);
        let err = t
            .check("a", A, t0 + Duration::from_millis(59_900))
            .unwrap_err();
        assert!(err.to_string().ends_with("retry in 1s"), "{err}");
    }
}
