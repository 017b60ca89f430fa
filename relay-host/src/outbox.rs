//! One connection's outgoing FIFO and the writer task that drains it.
//!
//! Why a FIFO of [`Bytes`] and not a byte buffer: payload read from one connection is
//! split off its read buffer and handed to the other connection's writer as is (no copy
//! in user space), and control frames are appended between payload chunks in exactly the
//! order the protocol core produced them. Every push happens while the caller holds the
//! core's lock, so the FIFO order is the core's order.
//!
//! Backpressure: payload chunks carry *credit*. A reader that wants to forward `n` bytes to
//! a connection first takes `n` permits from that connection's [`Outbox::reserve`]
//! (without any lock held); the writer gives them back once the bytes are written to the
//! socket. A slow receiver therefore stops its sender's reader, which stops reading its
//! socket, and TCP pushes back on the sending device. Memory per connection is bounded by
//! [`CREDIT`] plus a few control frames.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Mutex;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

/// Payload bytes that may wait in one connection's FIFO.
pub const CREDIT: usize = 256 * 1024;

/// Chunks handed to one vectored write: a DATA header and its payload (and whatever
/// else is queued) leave in one system call, hence one TCP segment when they fit.
const BATCH: usize = 16;

#[derive(Debug, Default)]
struct State {
    /// Chunks to write, with the credit each one returns once written.
    chunks: VecDeque<(Bytes, u32)>,
    /// Shut the socket down once the FIFO is empty.
    close: bool,
    /// The connection is gone: pushes are dropped, the writer stops.
    dead: bool,
}

/// A connection's outgoing FIFO, its writer's wake-up and its payload credit.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: new chunks, new control output in the core, or close.
    pub wake: Notify,
    credit: Semaphore,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An empty FIFO with [`CREDIT`] bytes of room. Allocates nothing until a push.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            credit: Semaphore::new(CREDIT),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave a FIFO half-updated: every update is one step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk that returns `credit` permits once written, and wakes the writer.
    pub fn push(&self, chunk: Bytes, credit: u32) {
        let mut s = self.lock();
        if s.dead {
            drop(s);
            self.release(credit);
            return;
        }
        s.chunks.push_back((chunk, credit));
        drop(s);
        self.wake.notify_one();
    }

    /// Shut the socket down after the chunks already queued.
    pub fn close_after_flush(&self) {
        self.lock().close = true;
        self.wake.notify_one();
    }

    /// The connection is gone: drop queued chunks, fail pending and future reservations.
    pub fn kill(&self) {
        let chunks = {
            let mut s = self.lock();
            s.dead = true;
            std::mem::take(&mut s.chunks)
        };
        drop(chunks);
        self.credit.close();
        self.wake.notify_one();
    }

    /// Whether [`Outbox::kill`] was called.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Waits for room for `n` payload bytes. `false` if the connection is gone (the caller
    /// then forwards without credit: the core drops payload for a dead peer anyway).
    pub async fn reserve(&self, n: usize) -> bool {
        let n = u32::try_from(n.min(CREDIT)).unwrap_or(u32::MAX);
        match self.credit.acquire_many(n).await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back `n` permits (written, or reserved and not used).
    pub fn release(&self, n: u32) {
        if n > 0 && !self.credit.is_closed() {
            self.credit.add_permits(n as usize);
        }
    }

    /// Moves up to [`BATCH`] chunks into `batch` (empty on entry).
    fn pop(&self, batch: &mut Vec<(Bytes, u32)>) -> Next {
        let mut s = self.lock();
        if s.dead {
            return Next::Stop;
        }
        let n = s.chunks.len().min(BATCH);
        batch.extend(s.chunks.drain(..n));
        match n {
            0 if s.close => Next::Close,
            0 => Next::Empty,
            _ => Next::Chunks,
        }
    }
}

enum Next {
    Chunks,
    Empty,
    Close,
    Stop,
}

/// Writes every chunk of `batch` to `w`, in order, with vectored writes.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut [(Bytes, u32)],
) -> std::io::Result<()> {
    let mut first = 0;
    loop {
        while first < batch.len() && batch[first].0.is_empty() {
            first += 1;
        }
        if first == batch.len() {
            return Ok(());
        }
        let mut iov = [IoSlice::new(&[]); BATCH];
        let mut k = 0;
        for (chunk, _) in &batch[first..] {
            iov[k] = IoSlice::new(chunk);
            k += 1;
        }
        let mut n = w.write_vectored(&iov[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let chunk = &mut batch[first].0;
            let step = n.min(chunk.len());
            chunk.advance(step);
            n -= step;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
}

/// How a writer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterEnd {
    /// The FIFO was flushed and the socket shut down, as asked.
    Closed,
    /// The connection was killed by someone else.
    Killed,
    /// A write failed (the peer is gone).
    Failed,
}

/// Writes `out`'s chunks to `w` in order. When the FIFO is empty it calls `pull`, which
/// must lock the core, ask it for control output and push that (returning `true` if it
/// pushed or asked to close); otherwise the writer sleeps until woken.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut w: W,
    out: &Outbox,
    mut pull: impl FnMut() -> bool,
) -> WriterEnd {
    let mut batch = Vec::new();
    loop {
        match out.pop(&mut batch) {
            Next::Chunks => {
                let ok = write_batch(&mut w, &mut batch).await.is_ok();
                for (_, credit) in batch.drain(..) {
                    out.release(credit);
                }
                if !ok {
                    return WriterEnd::Failed;
                }
            }
            Next::Stop => return WriterEnd::Killed,
            Next::Close => {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
                return WriterEnd::Closed;
            }
            Next::Empty => {
                if pull() {
                    continue;
                }
                // TLS buffers records: push them out before sleeping.
                if w.flush().await.is_err() {
                    return WriterEnd::Failed;
                }
                out.wake.notified().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn order_credit_and_close() {
        let out = Outbox::new();
        assert!(out.reserve(CREDIT).await);
        out.push(Bytes::from_static(b"ab"), 0);
        out.push(Bytes::from_static(b"cd"), CREDIT as u32);
        out.close_after_flush();
        let mut sink = Vec::new();
        let mut pulls = 0;
        let end = run_writer(&mut sink, &out, || {
            pulls += 1;
            false
        })
        .await;
        assert_eq!(end, WriterEnd::Closed);
        assert_eq!(sink, b"abcd");
        assert_eq!(pulls, 0);
        // The credit came back.
        assert!(out.reserve(CREDIT).await);
        out.kill();
        assert!(!out.reserve(1).await);
    }
}
