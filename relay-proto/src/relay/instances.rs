//! The instances of a user ID: at most one *reachable* instance (a device that takes
//! demands; newest password login wins) and up to `max_requesters_per_account`
//! *requester* instances (processes that only demand or ask for the online list; they
//! never replace anything and are never a demand target). A LOGIN announcing
//! [`caps::REQUESTER`] starts a requester instance; one without it (every version-1
//! terminal) a reachable one, exactly as before.
//!
//! The user index maps a user ID to its first instance; the others follow through
//! [`TermEntry::sibling`], so a user's instances cost no table of their own.

use super::{
    Event, Handback, InstanceEnd, NIL, Phase, Policy, Relay, ReleaseReason, Slab, State, Storage,
    TermEntry, UserIndex,
};
use crate::codes::ErrorCode;
use crate::frame::caps;
use crate::ident::{ResumeToken, UserId};
use crate::time::Instant;

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Takes demands; one per user ID.
    Reachable,
    /// Only demands and lists; several per user ID.
    Requester,
}

impl Kind {
    /// The kind a LOGIN asks for with its capability bits.
    pub(super) fn announced(caps: u32) -> Kind {
        if caps & caps::REQUESTER != 0 {
            Kind::Requester
        } else {
            Kind::Reachable
        }
    }
}

/// The capabilities the relay supports: version 1's, [`caps::REQUESTER`] and
/// [`caps::REDIRECT`] (a relay with no other node simply never redirects).
pub(super) const RELAY_CAPS: u32 = caps::ALL | caps::REQUESTER | caps::REDIRECT;

/// A login the host accepted, on its way into the tables.
pub(super) struct Admitted {
    pub user: UserId,
    pub password: bool,
    pub caps: u32,
    pub instance: u64,
    pub token: ResumeToken,
    /// A connection of the relay's own ([`Relay::demand_local`]): it has no terminal to
    /// greet, so no LOGIN_OK and no `LoggedIn` event.
    pub local: bool,
}

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    /// The keys of `user`'s instances.
    pub(super) fn instances(&self, user: &UserId) -> impl Iterator<Item = u32> + '_ {
        let mut next = self.users.get(user).unwrap_or(NIL);
        core::iter::from_fn(move || {
            let key = next;
            next = self.terms.get(key)?.sibling;
            Some(key)
        })
    }

    /// `user`'s reachable instance: the one demands go to.
    pub(super) fn reachable(&self, user: &UserId) -> Option<u32> {
        self.instances(user)
            .find(|&k| self.terms.get(k).is_some_and(|t| t.kind == Kind::Reachable))
    }

    /// Puts accepted login `a` on connection `key` into its instance: a resumption joins
    /// its own; a reachable password login replaces the reachable one; a requester
    /// password login starts one more, within the account's bound.
    pub(super) fn admit(&mut self, now: Instant, key: u32, a: Admitted) {
        let own = self
            .instances(&a.user)
            .find(|&k| self.terms.get(k).is_some_and(|t| t.instance == a.instance));
        let kind = Kind::announced(a.caps);
        let term = match own {
            Some(tk) if !a.password => tk,
            _ => {
                if let Err(code) = self.make_room(&a, kind) {
                    return self.fail(key, code);
                }
                match self.new_instance(&a, kind) {
                    Some(tk) => tk,
                    // A full table: refused like a wrong login (the terminal backs off
                    // and retries), the connection back to its handshake.
                    None => return self.refuse_login(key, a.user, ErrorCode::Busy),
                }
            }
        };
        let Some(t) = self.terms.get_mut(term) else {
            return;
        };
        if t.conns >= self.config.max_connections_per_account {
            return self.fail(key, ErrorCode::TooManyConnections);
        }
        t.token = a.token;
        // LOGIN_OK confirms the kind of the instance joined, whatever this LOGIN said.
        let t_kind = t.kind;
        let caps = match t.kind {
            Kind::Reachable => a.caps & !caps::REQUESTER,
            Kind::Requester => a.caps | caps::REQUESTER,
        };
        self.link(term, key);
        if a.local {
            if let Some(c) = self.conns.get_mut(key) {
                c.state = State::In {
                    term,
                    phase: Phase::Idle,
                };
                c.wire.last_rx = now;
            }
            return;
        }
        if t_kind == Kind::Reachable && (a.password || own.is_none()) {
            let (user, instance) = (a.user.clone(), a.instance);
            self.emit(match a.password {
                true => Event::InstanceStarted { user, instance },
                false => Event::InstanceArrived { user, instance },
            });
        }
        if let Some(c) = self.conns.get_mut(key) {
            c.state = State::In {
                term,
                phase: Phase::Idle,
            };
            c.wire.last_rx = now;
            c.out.login_ok = Some(caps);
            c.redirect = caps & caps::REDIRECT != 0;
        }
        self.emit(Event::LoggedIn {
            conn: self.id(key),
            user: a.user,
            resumed: !a.password,
        });
        self.wake(key);
        self.kick(key);
    }

    /// Before a new instance of `kind` starts: the reachable one it replaces is dropped
    /// (newest wins), or the login is refused with the code its connection gets.
    fn make_room(&mut self, a: &Admitted, kind: Kind) -> Result<(), ErrorCode> {
        match kind {
            Kind::Requester => {
                let requesters = self
                    .instances(&a.user)
                    .filter(|&k| self.terms.get(k).is_some_and(|t| t.kind == kind))
                    .count();
                if requesters >= usize::from(self.config.max_requesters_per_account) {
                    return Err(ErrorCode::TooManyConnections);
                }
            }
            Kind::Reachable => {
                if let Some(tk) = self.reachable(&a.user) {
                    if !a.password {
                        // A genuine credential of an instance that a newer login
                        // replaced: that instance must stop (its ERROR Replaced may
                        // never have arrived, e.g. on a connection closed mid-payload),
                        // not fall back to its password and replace the newer one.
                        return Err(ErrorCode::Replaced);
                    }
                    // Newest wins: a rebooted device is reachable at once.
                    self.replace(tk, &a.user);
                }
            }
        }
        Ok(())
    }

    /// Ends reachable instance `tk` of `user` because a newer one took its place: its
    /// connections get ERROR `Replaced` (the terminal stops), its sessions' peers RELEASE
    /// `PeerLoggedOut`.
    fn replace(&mut self, tk: u32, user: &UserId) {
        let old = self.terms.get(tk).map(|t| t.instance);
        self.drop_terminal(tk, Some(ErrorCode::Replaced), ReleaseReason::PeerLoggedOut);
        self.emit(Event::Replaced { user: user.clone() });
        if let Some(instance) = old {
            self.emit(Event::InstanceEnded {
                user: user.clone(),
                instance,
                how: InstanceEnd::Replaced,
                kind: Kind::Reachable,
            });
        }
    }

    /// Instance `instance` of `user` is now reachable on another relay (relays sharing
    /// one database, docs/CLUSTER.md), by a newer login there or because it moved there:
    /// the reachable instance here ends, so a user ID is reachable on one relay. Another
    /// instance ends exactly as a local replacement ends it (ERROR `Replaced`, the same
    /// events); the same instance's connections here are left over from before it moved
    /// and close without a frame (its terminal is elsewhere). Requester instances stay.
    /// Whether one ended.
    pub fn replace_user(&mut self, user: &UserId, instance: u64) -> bool {
        let Some(tk) = self.reachable(user) else {
            return false;
        };
        if self.terms.get(tk).is_some_and(|t| t.instance == instance) {
            self.drop_terminal(tk, None, ReleaseReason::PeerLost);
        } else {
            self.replace(tk, user);
        }
        self.serve_kicks();
        true
    }

    /// A new instance entry, first of its user's chain.
    fn new_instance(&mut self, a: &Admitted, kind: Kind) -> Option<u32> {
        let first = self.users.get(&a.user).unwrap_or(NIL);
        let entry = TermEntry {
            user: a.user.clone(),
            instance: a.instance,
            kind,
            sibling: first,
            first: NIL,
            conns: 0,
            sessions: 0,
            wait_head: NIL,
            wait_tail: NIL,
            token: a.token.clone(),
        };
        let tk = self.terms.insert(entry).ok()?;
        if !self.users.insert(a.user.clone(), tk) {
            self.terms.remove(tk);
            return None;
        }
        Some(tk)
    }

    /// Takes instance `tk` out of its user's chain (the index follows the first one).
    pub(super) fn unchain(&mut self, tk: u32) {
        let Some(t) = self.terms.get(tk) else { return };
        let (user, after) = (t.user.clone(), t.sibling);
        let before = self
            .instances(&user)
            .find(|&k| self.terms.get(k).is_some_and(|t| t.sibling == tk));
        match before.and_then(|k| self.terms.get_mut(k)) {
            Some(b) => b.sibling = after,
            None if after == NIL => self.users.remove(&user),
            None => self.users.retarget(&user, after),
        }
    }
}
