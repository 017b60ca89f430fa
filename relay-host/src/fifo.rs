//! The relay's per-connection outgoing FIFO, its payload credit and its task's waker.
//!
//! One task per connection polls both directions, so the wake-ups are plain wakers
//! instead of a `Notify` and a `Semaphore`.
//!
//! Why a FIFO of [`Bytes`] and not a byte buffer: payload read from one connection is
//! split off its read buffer and queued for the other connection as is (no copy in user
//! space), and control frames are appended between payload chunks in exactly the order
//! the protocol core produced them. Every push happens while the caller holds the core's
//! lock, so the FIFO order is the core's order.
//!
//! Backpressure: payload chunks carry *credit*. A connection that wants to forward `n`
//! bytes to another first takes `n` of its credit ([`Fifo::poll_reserve`]); the
//! receiver gives it back once the bytes are written to its socket. A slow receiver
//! therefore stops its sender from reading its socket, and TCP pushes back on the sending
//! device. Memory per connection is bounded by [`CREDIT`] plus a few control frames.
//!
//! Everything sits behind one small `std` mutex (never held across I/O), and the only
//! wake-ups are plain [`Waker`]s: the connection's own task (new output, close, kill) and
//! the tasks waiting for credit. An idle connection's FIFO is a few dozen bytes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

/// Payload bytes that may wait in one connection's FIFO.
pub const CREDIT: u32 = 256 * 1024;

/// One queued write.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes in user space: control frames, or payload that returns `credit` once written.
    Bytes(Bytes, u32),
    /// `n` payload bytes waiting in a pipe ([`crate::splice`]); each byte returns one
    /// credit as it leaves the pipe.
    #[cfg(target_os = "linux")]
    Pipe(std::sync::Arc<crate::splice::Pipe>, usize),
}

#[derive(Debug)]
struct State {
    /// Chunks to write, in order.
    chunks: VecDeque<Chunk>,
    /// Payload credit left (see the module's doc).
    credit: u32,
    /// Shut the socket down once the FIFO is empty.
    close: bool,
    /// The connection is gone: pushes are dropped, reservations fail.
    dead: bool,
    /// The connection's task, registered when it found nothing to write.
    task: Option<Waker>,
    /// The core may have control output for this connection ([`Fifo::wake`]).
    pull: bool,
    /// Tasks waiting for credit (normally one: the session's peer).
    senders: Vec<Waker>,
}

/// A connection's outgoing FIFO, its payload credit and the wakers that go with them.
#[derive(Debug)]
pub struct Fifo {
    state: Mutex<State>,
}

impl Default for Fifo {
    fn default() -> Self {
        Self::new()
    }
}

/// What the connection's task should do next.
#[derive(Debug)]
pub enum Next {
    /// Write this.
    Chunk(Chunk),
    /// Nothing queued; the task's waker is registered for the next push. `pull`: the
    /// core was said to have output for this connection since the last `Empty`.
    Empty { pull: bool },
    /// Flush and shut the socket down.
    Close,
    /// The connection was killed: stop.
    Stop,
}

impl Fifo {
    /// An empty FIFO with [`CREDIT`] bytes of room. Allocates nothing until a push.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                credit: CREDIT,
                close: false,
                dead: false,
                task: None,
                pull: true,
                senders: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave a FIFO half-updated: every update is one step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk and wakes the connection's task. Dropped if the connection is gone.
    pub fn push(&self, chunk: Chunk) {
        let mut s = self.lock();
        if s.dead {
            return;
        }
        s.chunks.push_back(chunk);
        let task = s.task.take();
        drop(s);
        if let Some(t) = task {
            t.wake();
        }
    }

    /// Wakes the connection's task: the core has output for it, or its state changed.
    pub fn wake(&self) {
        let task = {
            let mut s = self.lock();
            s.pull = true;
            s.task.take()
        };
        if let Some(t) = task {
            t.wake();
        }
    }

    /// Shut the socket down after the chunks already queued.
    pub fn close_after_flush(&self) {
        self.lock().close = true;
        self.wake();
    }

    /// The connection is gone: drop queued chunks, fail pending and future reservations.
    pub fn kill(&self) {
        let (chunks, task, senders) = {
            let mut s = self.lock();
            s.dead = true;
            (
                std::mem::take(&mut s.chunks),
                s.task.take(),
                std::mem::take(&mut s.senders),
            )
        };
        drop(chunks);
        task.into_iter().chain(senders).for_each(Waker::wake);
    }

    /// Whether [`Fifo::kill`] was called.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Takes credit for `n` payload bytes (at most [`CREDIT`]), or registers `cx` to be
    /// woken when credit comes back. `Ready(Some(taken))`; `Ready(None)` if the connection
    /// is gone (the caller then forwards without credit: the push is dropped anyway).
    pub fn poll_reserve(&self, cx: &mut Context<'_>, n: usize) -> Poll<Option<u32>> {
        let n = u32::try_from(n).unwrap_or(u32::MAX).min(CREDIT);
        let mut s = self.lock();
        if s.dead {
            return Poll::Ready(None);
        }
        if s.credit >= n {
            s.credit -= n;
            return Poll::Ready(Some(n));
        }
        if !s.senders.iter().any(|w| w.will_wake(cx.waker())) {
            s.senders.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Registers `cx` to be woken at the next [`Fifo::release`] (a pipe with no room waits
    /// for the receiver to drain it). `false` if the connection is gone.
    #[cfg(target_os = "linux")]
    pub fn register_sender(&self, cx: &mut Context<'_>) -> bool {
        let mut s = self.lock();
        if !s.dead && !s.senders.iter().any(|w| w.will_wake(cx.waker())) {
            s.senders.push(cx.waker().clone());
        }
        !s.dead
    }

    /// Gives back `n` credit (written, or reserved and not used) and wakes the senders.
    pub fn release(&self, n: u32) {
        if n == 0 {
            return;
        }
        let senders = {
            let mut s = self.lock();
            s.credit = (s.credit + n).min(CREDIT);
            std::mem::take(&mut s.senders)
        };
        senders.into_iter().for_each(Waker::wake);
    }

    /// Moves the byte chunks queued right after the one just popped into `more` (as many
    /// as fit), so that they leave with it in one vectored write.
    pub fn pop_more<const N: usize>(&self, more: &mut heapless::Vec<(Bytes, u32), N>) {
        let mut s = self.lock();
        while !more.is_full() && matches!(s.chunks.front(), Some(Chunk::Bytes(..))) {
            if let Some(Chunk::Bytes(b, credit)) = s.chunks.pop_front() {
                let _ = more.push((b, credit));
            }
        }
    }

    /// Puts chunks taken by [`Fifo::pop_more`] and not written back at the front, in
    /// their order (the socket was full).
    pub fn unpop(&self, more: impl DoubleEndedIterator<Item = (Bytes, u32)>) {
        let mut s = self.lock();
        if s.dead {
            return;
        }
        for (b, credit) in more.rev() {
            s.chunks.push_front(Chunk::Bytes(b, credit));
        }
    }

    /// The next chunk to write. When there is none, `cx`'s waker is registered first, so
    /// that a push (or [`Fifo::wake`]) after this call is never missed.
    pub fn pop(&self, cx: &mut Context<'_>) -> Next {
        let mut s = self.lock();
        if s.dead {
            return Next::Stop;
        }
        match s.chunks.pop_front() {
            Some(chunk) => Next::Chunk(chunk),
            None if s.close => Next::Close,
            None => {
                match &mut s.task {
                    Some(w) => w.clone_from(cx.waker()),
                    None => s.task = Some(cx.waker().clone()),
                }
                // An empty queue gives its memory back: a burst must not stay pinned to
                // a connection that went idle.
                if s.chunks.capacity() > 0 {
                    s.chunks = VecDeque::new();
                }
                Next::Empty {
                    pull: std::mem::take(&mut s.pull),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn bytes(c: Next) -> Vec<u8> {
        match c {
            Next::Chunk(Chunk::Bytes(b, _)) => b.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn order_credit_and_close() {
        let mut cx = Context::from_waker(Waker::noop());
        let out = Fifo::new();
        assert_eq!(
            out.poll_reserve(&mut cx, CREDIT as usize),
            Poll::Ready(Some(CREDIT))
        );
        assert_eq!(out.poll_reserve(&mut cx, 1), Poll::Pending);
        out.push(Chunk::Bytes(Bytes::from_static(b"ab"), 0));
        out.push(Chunk::Bytes(Bytes::from_static(b"cd"), CREDIT));
        out.close_after_flush();
        assert_eq!(bytes(out.pop(&mut cx)), b"ab");
        assert_eq!(bytes(out.pop(&mut cx)), b"cd");
        assert!(matches!(out.pop(&mut cx), Next::Close));
        // The credit comes back when the writer gives it back.
        out.release(CREDIT);
        assert_eq!(out.poll_reserve(&mut cx, 10), Poll::Ready(Some(10)));
        out.kill();
        assert_eq!(out.poll_reserve(&mut cx, 1), Poll::Ready(None));
        assert!(matches!(out.pop(&mut cx), Next::Stop));
    }

    #[test]
    fn a_batch_taken_and_partly_put_back_keeps_the_order() {
        let mut cx = Context::from_waker(Waker::noop());
        let out = Fifo::new();
        for c in [&b"a"[..], b"b", b"c", b"d"] {
            out.push(Chunk::Bytes(Bytes::from_static(c), 1));
        }
        assert_eq!(bytes(out.pop(&mut cx)), b"a");
        let mut more: heapless::Vec<(Bytes, u32), 2> = heapless::Vec::new();
        out.pop_more(&mut more);
        let taken: Vec<&[u8]> = more.iter().map(|(b, _)| &b[..]).collect();
        assert_eq!(taken, [b"b", b"c"], "as many as fit, in order");
        // "b" was written; "c" goes back in front of "d".
        out.unpop(more.into_iter().skip(1));
        out.push(Chunk::Bytes(Bytes::from_static(b"e"), 1));
        assert_eq!(bytes(out.pop(&mut cx)), b"c");
        assert_eq!(bytes(out.pop(&mut cx)), b"d");
        assert_eq!(bytes(out.pop(&mut cx)), b"e");
    }
}
