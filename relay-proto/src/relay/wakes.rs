//! The two lists of connections the core keeps between and within calls, threaded
//! through the connection table so that they can never be full: a list needs no room of
//! its own, and a connection is in each at most once.
//!
//! - The **wake list**: connections with output the host has not been told about yet.
//!   [`Relay::poll_event`] hands them out as [`Event::Wake`] after the queued events.
//!   Doubly linked, so that a connection the host closes leaves it at once.
//! - The **kick list**: connections that became idle during the current call while a
//!   demand may wait for their terminal; served (and emptied) at the end of every call.

use super::{ConnEntry, Event, Handback, NIL, Policy, Relay, Slab, Storage};

/// A connection's membership in the wake list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WakeLink {
    Out,
    In { prev: u32, next: u32 },
}

/// A connection's membership in the kick list (a stack; `next` is [`NIL`] at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KickLink {
    Out,
    In { next: u32 },
}

/// Heads of the lists.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lists {
    wake_head: u32,
    wake_tail: u32,
    kick_head: u32,
}

impl Default for Lists {
    fn default() -> Self {
        Lists {
            wake_head: NIL,
            wake_tail: NIL,
            kick_head: NIL,
        }
    }
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    /// `key` has output (or must close): the host learns it from [`Relay::poll_event`].
    pub(super) fn wake(&mut self, key: u32) {
        let tail = self.lists.wake_tail;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.wake != WakeLink::Out {
            return;
        }
        c.wake = WakeLink::In {
            prev: tail,
            next: NIL,
        };
        self.set_wake_next(tail, key);
        self.lists.wake_tail = key;
    }

    /// Takes `key` out of the wake list, wherever it is (it is going away, or handed
    /// out with its wakes). `true` if it was in.
    pub(super) fn unwake(&mut self, key: u32) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let WakeLink::In { prev, next } = core::mem::replace(&mut c.wake, WakeLink::Out) else {
            return false;
        };
        self.set_wake_next(prev, next);
        match self.conns.get_mut(next) {
            Some(ConnEntry {
                wake: WakeLink::In { prev: p, .. },
                ..
            }) => *p = prev,
            _ => self.lists.wake_tail = prev,
        }
        true
    }

    /// Links `key`'s successor (or the head, when `key` is [`NIL`]) to `next`.
    fn set_wake_next(&mut self, key: u32, next: u32) {
        match self.conns.get_mut(key) {
            Some(ConnEntry {
                wake: WakeLink::In { next: n, .. },
                ..
            }) => *n = next,
            _ => self.lists.wake_head = next,
        }
    }

    /// The oldest wake not handed out yet.
    pub(super) fn pop_wake(&mut self) -> Option<Event> {
        let key = self.lists.wake_head;
        self.conns.get(key)?;
        self.unwake(key);
        Some(Event::Wake(self.id(key)))
    }

    /// `key` is idle now: a demand waiting for its terminal may take it at the end of the
    /// call ([`Relay::serve_kicks`]), not on the spot, where the caller may still use it.
    pub(super) fn kick(&mut self, key: u32) {
        let head = self.lists.kick_head;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.kick == KickLink::Out {
            c.kick = KickLink::In { next: head };
            self.lists.kick_head = key;
        }
    }

    /// Takes the next connection off the kick list.
    pub(super) fn pop_kick(&mut self) -> Option<u32> {
        let key = self.lists.kick_head;
        let c = self.conns.get_mut(key)?;
        self.lists.kick_head = match core::mem::replace(&mut c.kick, KickLink::Out) {
            KickLink::In { next } => next,
            KickLink::Out => NIL,
        };
        Some(key)
    }
}
