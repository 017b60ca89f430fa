//! Where the relay core keeps its tables. The core is generic over [`Storage`] so that a
//! small no_std relay uses fixed arrays ([`Fixed`]) while `relay-host` grows heap tables
//! to 100,000+ terminals ([`Heap`], feature `std`). No allocation happens in the core.

use crate::ident::UserId;

/// A table of values addressed by small integer keys, reused after removal.
pub trait Slab<T> {
    /// Stores `value` and returns its key, or gives it back when the table is full.
    fn insert(&mut self, value: T) -> Result<u32, T>;
    fn remove(&mut self, key: u32) -> Option<T>;
    fn get(&self, key: u32) -> Option<&T>;
    fn get_mut(&mut self, key: u32) -> Option<&mut T>;
    /// The smallest occupied key that is `>= from`: for paging and full scans.
    fn next_key(&self, from: u32) -> Option<u32>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// User ID → terminal key.
pub trait UserIndex {
    fn get(&self, user: &UserId) -> Option<u32>;
    /// Returns `false` when the index is full.
    fn insert(&mut self, user: UserId, key: u32) -> bool;
    /// Points `user`, which is in the index, at `key` (needs no room).
    fn retarget(&mut self, user: &UserId, key: u32);
    fn remove(&mut self, user: &UserId);
}

/// A FIFO of events. Its capacity must be at least
/// [`max_events_per_call`](super::max_events_per_call) of the connection table's.
pub trait Queue<T> {
    /// Returns `false` (and drops `value`) when full: the core never lets that happen.
    fn push(&mut self, value: T) -> bool;
    fn pop(&mut self) -> Option<T>;
}

/// The four tables a relay core needs.
pub trait Storage {
    type Conns: Slab<super::ConnEntry>;
    type Terms: Slab<super::TermEntry>;
    type Users: UserIndex;
    type Events: Queue<super::Event>;
    fn build() -> (Self::Conns, Self::Terms, Self::Users, Self::Events);
}

/// A fixed-capacity slab: an array of optional slots.
#[derive(Debug)]
pub struct FixedSlab<T, const N: usize> {
    slots: [Option<T>; N],
    len: usize,
}

impl<T, const N: usize> Default for FixedSlab<T, N> {
    fn default() -> Self {
        FixedSlab {
            slots: core::array::from_fn(|_| None),
            len: 0,
        }
    }
}

impl<T, const N: usize> Slab<T> for FixedSlab<T, N> {
    fn insert(&mut self, value: T) -> Result<u32, T> {
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(value);
                self.len += 1;
                Ok(i as u32)
            }
            None => Err(value),
        }
    }
    fn remove(&mut self, key: u32) -> Option<T> {
        let v = self.slots.get_mut(key as usize)?.take();
        if v.is_some() {
            self.len -= 1;
        }
        v
    }
    fn get(&self, key: u32) -> Option<&T> {
        self.slots.get(key as usize)?.as_ref()
    }
    fn get_mut(&mut self, key: u32) -> Option<&mut T> {
        self.slots.get_mut(key as usize)?.as_mut()
    }
    fn next_key(&self, from: u32) -> Option<u32> {
        let start = (from as usize).min(N);
        self.slots[start..]
            .iter()
            .position(Option::is_some)
            .map(|i| (start + i) as u32)
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A fixed-capacity user index, searched linearly: fine for the tens of terminals a
/// microcontroller relay serves.
#[derive(Debug)]
pub struct FixedIndex<const N: usize> {
    entries: heapless::Vec<(UserId, u32), N>,
}

impl<const N: usize> Default for FixedIndex<N> {
    fn default() -> Self {
        FixedIndex {
            entries: heapless::Vec::new(),
        }
    }
}

impl<const N: usize> UserIndex for FixedIndex<N> {
    fn get(&self, user: &UserId) -> Option<u32> {
        self.entries
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, k)| *k)
    }
    fn insert(&mut self, user: UserId, key: u32) -> bool {
        self.remove(&user);
        self.entries.push((user, key)).is_ok()
    }
    fn retarget(&mut self, user: &UserId, key: u32) {
        if let Some(e) = self.entries.iter_mut().find(|(u, _)| u == user) {
            e.1 = key;
        }
    }
    fn remove(&mut self, user: &UserId) {
        if let Some(i) = self.entries.iter().position(|(u, _)| u == user) {
            self.entries.swap_remove(i);
        }
    }
}

impl<T, const N: usize> Queue<T> for heapless::Deque<T, N> {
    fn push(&mut self, value: T) -> bool {
        self.push_back(value).is_ok()
    }
    fn pop(&mut self) -> Option<T> {
        self.pop_front()
    }
}

/// Fixed tables: `C` connections, `T` terminals, `E` queued events. `E` must be at
/// least [`max_events_per_call`](super::max_events_per_call)`(C)`: a smaller one does
/// not build.
#[derive(Debug)]
pub struct Fixed<const C: usize, const T: usize, const E: usize>;

impl<const C: usize, const T: usize, const E: usize> Fixed<C, T, E> {
    const ROOM_FOR_ONE_CALL: () = assert!(
        E >= super::max_events_per_call(C),
        "Fixed<C, T, E>: E must be at least max_events_per_call(C) = C + 3"
    );
}

impl<const C: usize, const T: usize, const E: usize> Storage for Fixed<C, T, E> {
    type Conns = FixedSlab<super::ConnEntry, C>;
    type Terms = FixedSlab<super::TermEntry, T>;
    type Users = FixedIndex<T>;
    type Events = heapless::Deque<super::Event, E>;
    fn build() -> (Self::Conns, Self::Terms, Self::Users, Self::Events) {
        let () = Self::ROOM_FOR_ONE_CALL;
        Default::default()
    }
}

#[cfg(feature = "std")]
mod heap {
    use super::*;
    use std::collections::{HashMap, VecDeque};
    use std::vec::Vec;

    /// A growable slab with a free list.
    #[derive(Debug)]
    pub struct HeapSlab<T> {
        slots: Vec<Option<T>>,
        free: Vec<u32>,
        len: usize,
    }

    impl<T> Default for HeapSlab<T> {
        fn default() -> Self {
            HeapSlab {
                slots: Vec::new(),
                free: Vec::new(),
                len: 0,
            }
        }
    }

    impl<T> Slab<T> for HeapSlab<T> {
        fn insert(&mut self, value: T) -> Result<u32, T> {
            self.len += 1;
            if let Some(k) = self.free.pop() {
                self.slots[k as usize] = Some(value);
                return Ok(k);
            }
            self.slots.push(Some(value));
            Ok((self.slots.len() - 1) as u32)
        }
        fn remove(&mut self, key: u32) -> Option<T> {
            let v = self.slots.get_mut(key as usize)?.take();
            if v.is_some() {
                self.len -= 1;
                self.free.push(key);
            }
            v
        }
        fn get(&self, key: u32) -> Option<&T> {
            self.slots.get(key as usize)?.as_ref()
        }
        fn get_mut(&mut self, key: u32) -> Option<&mut T> {
            self.slots.get_mut(key as usize)?.as_mut()
        }
        fn next_key(&self, from: u32) -> Option<u32> {
            let start = (from as usize).min(self.slots.len());
            self.slots[start..]
                .iter()
                .position(Option::is_some)
                .map(|i| (start + i) as u32)
        }
        fn len(&self) -> usize {
            self.len
        }
    }

    impl UserIndex for HashMap<UserId, u32> {
        fn get(&self, user: &UserId) -> Option<u32> {
            HashMap::get(self, user).copied()
        }
        fn insert(&mut self, user: UserId, key: u32) -> bool {
            HashMap::insert(self, user, key);
            true
        }
        fn retarget(&mut self, user: &UserId, key: u32) {
            if let Some(k) = HashMap::get_mut(self, user) {
                *k = key;
            }
        }
        fn remove(&mut self, user: &UserId) {
            HashMap::remove(self, user);
        }
    }

    impl<T> Queue<T> for VecDeque<T> {
        fn push(&mut self, value: T) -> bool {
            self.push_back(value);
            true
        }
        fn pop(&mut self) -> Option<T> {
            self.pop_front()
        }
    }

    /// Heap tables that grow with the load (the Linux relay).
    #[derive(Debug)]
    pub struct Heap;

    impl Storage for Heap {
        type Conns = HeapSlab<crate::relay::ConnEntry>;
        type Terms = HeapSlab<crate::relay::TermEntry>;
        type Users = HashMap<UserId, u32>;
        type Events = VecDeque<crate::relay::Event>;
        fn build() -> (Self::Conns, Self::Terms, Self::Users, Self::Events) {
            Default::default()
        }
    }
}

#[cfg(feature = "std")]
pub use heap::{Heap, HeapSlab};
