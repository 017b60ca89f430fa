//! Requester instances that logged out, so their tokens cannot start them again.
//!
//! A reachable instance is tracked as its account's current one (in the store, across
//! restarts). Requester instances are many per account and short-lived (one per `relay
//! connect` or `online`), so they are remembered here instead: in memory, for as long as
//! their tokens could live, at most [`MAX_RETIRED`] at once. When full, the oldest is
//! forgotten first (its token, at most 24 h old, may then start a requester instance
//! again until it expires); a relay restart forgets them all. docs/PROTOCOL.md §10.1 says so.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Retired instances remembered at most (about 40 bytes each).
pub const MAX_RETIRED: usize = 65_536;

/// Logged-out requester instances, oldest first.
#[derive(Debug)]
pub struct Retired {
    order: VecDeque<(Instant, u64)>,
    set: HashSet<u64>,
    /// How long a token can live: older entries are of no use.
    lifetime: Duration,
    max: usize,
}

impl Retired {
    pub fn new(lifetime: Duration, max: usize) -> Self {
        Retired {
            order: VecDeque::new(),
            set: HashSet::new(),
            lifetime,
            max: max.max(1),
        }
    }

    /// `instance` logged out at `now`.
    pub fn retire(&mut self, instance: u64, now: Instant) {
        if self.set.contains(&instance) {
            return;
        }
        while let Some(&(at, old)) = self.order.front()
            && (now.duration_since(at) >= self.lifetime || self.order.len() >= self.max)
        {
            self.order.pop_front();
            self.set.remove(&old);
        }
        self.set.insert(instance);
        self.order.push_back((now, instance));
    }

    pub fn contains(&self, instance: u64) -> bool {
        self.set.contains(&instance)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_retired_instance_is_remembered_for_a_token_lifetime() {
        let t0 = Instant::now();
        let mut r = Retired::new(DAY, 8);
        r.retire(1, t0);
        assert!(r.contains(1) && !r.contains(2));
        r.retire(2, t0 + DAY);
        assert!(!r.contains(1), "its tokens have expired: forgotten");
        assert!(r.contains(2));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_goes_first() {
        let t0 = Instant::now();
        let mut r = Retired::new(DAY, 3);
        for i in 0..10 {
            r.retire(i, t0);
        }
        assert_eq!(r.len(), 3);
        assert!(r.contains(9) && r.contains(7) && !r.contains(6));
        r.retire(9, t0);
        assert_eq!(r.len(), 3, "a repeat is not counted twice");
    }
}
