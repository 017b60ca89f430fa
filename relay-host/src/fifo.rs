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
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::net::tcp::OwnedWriteHalf;

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
    /// The connection's task holds chunks it popped and has not finished writing: only
    /// it may write now.
    busy: bool,
    /// The socket's shared write side, for [`Fifo::push_frame`]: plain TCP only.
    direct: Option<Direct>,
}

/// A socket [`Fifo::push_frame`] may write to itself, and what it writes there.
#[derive(Debug, Clone)]
pub enum Direct {
    /// A terminal's connection: frames as they are.
    Frames(Arc<OwnedWriteHalf>),
    /// A published port's client ([`crate::published`]): the payload of DATA frames
    /// only (the stream strips their headers); any other frame goes through the queue.
    Payload(Arc<OwnedWriteHalf>),
}

impl State {
    /// Nothing queued, nothing being written, no close pending: bytes written to the
    /// socket now keep the FIFO's order.
    fn idle(&self) -> bool {
        !self.busy && !self.close && !self.dead && self.chunks.is_empty()
    }

    /// Gives back `n` credit; returns the senders to wake.
    fn give_back(&mut self, n: u32) -> Vec<Waker> {
        if n == 0 {
            return Vec::new();
        }
        self.credit = (self.credit + n).min(CREDIT);
        std::mem::take(&mut self.senders)
    }
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
                busy: false,
                direct: None,
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

    /// Lets [`Fifo::push_frame`] write to the connection's socket itself (plain TCP).
    pub fn attach(&self, direct: Direct) {
        let mut s = self.lock();
        if !s.dead {
            s.direct = Some(direct);
        }
    }

    /// Queues a forwarded frame: `head` (the receiver's DATA header, and any control
    /// frame the core had for it before) and `payload` with its `credit`. When the FIFO
    /// is idle and the socket shared ([`Fifo::attach`]), the frame is written to the
    /// socket right away, under this FIFO's lock (so its order holds), and only what the
    /// socket does not take is queued: the connection's task is woken only then. A write
    /// error queues everything: the task meets the error itself.
    pub fn push_frame(&self, mut head: Bytes, mut payload: Bytes, credit: u32) {
        let mut s = self.lock();
        if s.dead {
            return;
        }
        if s.idle()
            && let Some(direct) = &s.direct
            && write_through(direct, &mut head, &mut payload)
        {
            // As after the task's own writes: the core may have output now.
            s.pull = true;
        }
        let mut senders = Vec::new();
        if !head.is_empty() {
            s.chunks.push_back(Chunk::Bytes(head, 0));
        }
        if payload.is_empty() {
            senders = s.give_back(credit);
        } else {
            s.chunks.push_back(Chunk::Bytes(payload, credit));
        }
        let task = if s.chunks.is_empty() {
            None
        } else {
            s.task.take()
        };
        drop(s);
        task.into_iter().chain(senders).for_each(Waker::wake);
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
            s.direct = None;
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
        let senders = self.lock().give_back(n);
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
            Some(chunk) => {
                s.busy = true;
                Next::Chunk(chunk)
            }
            None if s.close => Next::Close,
            None => {
                s.busy = false;
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

/// Writes as much of `head` + `payload` as the socket takes now, advancing both past
/// what was written; `true` if anything was. For [`Direct::Payload`], only a frame whose
/// `head` is exactly its DATA header, and what is left keeps a header of its own.
fn write_through(direct: &Direct, head: &mut Bytes, payload: &mut Bytes) -> bool {
    match direct {
        Direct::Frames(w) => {
            let iov = [io::IoSlice::new(head), io::IoSlice::new(payload)];
            let Ok(n @ 1..) = w.as_ref().as_ref().try_write_vectored(&iov) else {
                return false;
            };
            let h = n.min(head.len());
            head.advance(h);
            payload.advance(n - h);
            true
        }
        Direct::Payload(w) => {
            let header = relay_proto::frame::data_header(payload.len());
            if header.as_ref().map(|h| &h[..]) != Ok(&head[..]) {
                return false;
            }
            let Ok(n @ 1..) = w.as_ref().as_ref().try_write(payload) else {
                return false;
            };
            payload.advance(n);
            *head = match relay_proto::frame::data_header(payload.len()) {
                Ok(h) if !payload.is_empty() => Bytes::copy_from_slice(&h),
                _ => Bytes::new(),
            };
            true
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

    /// A connected loopback pair: (the side the FIFO writes to, its peer).
    async fn sockets() -> (crate::plain::PlainTcp, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = tokio::net::TcpStream::from_std(ours).unwrap();
        // The runtime learns that a new socket is writable from its first event.
        ours.writable().await.unwrap();
        (crate::plain::PlainTcp::new(ours), peer)
    }

    fn read_exactly(peer: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut b = vec![0u8; n];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        peer.read_exact(&mut b).unwrap();
        b
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_idle_fifo_writes_a_frame_through_without_waking_its_task() {
        let (sock, mut peer) = sockets().await;
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let out = Fifo::new();
        out.attach(Direct::Frames(sock.writer()));
        assert!(matches!(out.pop(&mut cx), Next::Empty { .. }));
        assert_eq!(out.poll_reserve(&mut cx, 3), Poll::Ready(Some(3)));
        out.push_frame(Bytes::from_static(b"H"), Bytes::from_static(b"abc"), 3);
        assert_eq!(read_exactly(&mut peer, 4), b"Habc");
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no wake"
        );
        assert!(
            matches!(out.pop(&mut cx), Next::Empty { pull: true }),
            "nothing queued"
        );
        assert_eq!(
            out.poll_reserve(&mut cx, CREDIT as usize),
            Poll::Ready(Some(CREDIT)),
            "the credit came back at once"
        );
    }

    #[tokio::test]
    async fn a_published_client_gets_the_payload_alone_and_other_frames_are_queued() {
        let (sock, mut peer) = sockets().await;
        let mut cx = Context::from_waker(Waker::noop());
        let out = Fifo::new();
        out.attach(Direct::Payload(sock.writer()));
        assert!(matches!(out.pop(&mut cx), Next::Empty { .. }));
        let header = |n| Bytes::copy_from_slice(&relay_proto::frame::data_header(n).unwrap());
        out.push_frame(header(3), Bytes::from_static(b"abc"), 0);
        assert_eq!(
            read_exactly(&mut peer, 3),
            b"abc",
            "no header on the client's socket"
        );
        assert!(matches!(out.pop(&mut cx), Next::Empty { .. }));
        // A head that is more than the DATA header (a frame the stream must see first).
        let mut head = b"\x0e\x00\x00".to_vec();
        head.extend_from_slice(&header(2));
        out.push_frame(Bytes::from(head.clone()), Bytes::from_static(b"de"), 0);
        assert_eq!(bytes(out.pop(&mut cx)), head);
        assert_eq!(bytes(out.pop(&mut cx)), b"de");
    }

    #[tokio::test]
    async fn a_fifo_whose_task_is_writing_queues_the_frame_behind() {
        let (sock, mut peer) = sockets().await;
        let mut cx = Context::from_waker(Waker::noop());
        let out = Fifo::new();
        out.attach(Direct::Frames(sock.writer()));
        out.push(Chunk::Bytes(Bytes::from_static(b"first"), 0));
        // The task took "first" and has not written it yet.
        assert_eq!(bytes(out.pop(&mut cx)), b"first");
        out.push_frame(Bytes::from_static(b"H"), Bytes::from_static(b"xy"), 2);
        assert_eq!(bytes(out.pop(&mut cx)), b"H");
        assert_eq!(bytes(out.pop(&mut cx)), b"xy");
        // Nothing went to the socket behind the task's back.
        peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 8];
        use std::io::Read;
        assert_eq!(
            peer.read(&mut b).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock)
        );
    }

    #[tokio::test]
    async fn a_full_socket_queues_what_it_did_not_take() {
        let (sock, mut peer) = sockets().await;
        let mut cx = Context::from_waker(Waker::noop());
        let out = Fifo::new();
        out.attach(Direct::Frames(sock.writer()));
        // Fill the socket (and the peer's receive buffer) until it takes nothing more.
        let junk = vec![7u8; 1 << 16];
        let mut sent = 0;
        while let Ok(n) = sock.tcp().try_write(&junk) {
            sent += n;
        }
        assert!(matches!(out.pop(&mut cx), Next::Empty { .. }));
        out.push_frame(Bytes::from_static(b"H"), Bytes::from_static(b"tail"), 4);
        let mut queued = Vec::new();
        while let Next::Chunk(Chunk::Bytes(b, _)) = out.pop(&mut cx) {
            queued.extend_from_slice(&b);
        }
        // Whatever the socket took comes first, the rest was queued: together, the frame.
        let taken = read_exactly(&mut peer, sent + 5 - queued.len());
        let mut whole = taken[sent..].to_vec();
        whole.extend_from_slice(&queued);
        assert_eq!(whole, b"Htail");
        assert!(!queued.is_empty(), "a full socket takes (nearly) nothing");
    }

    #[test]
    fn a_killed_fifo_forgets_its_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (sock, _peer) = rt.block_on(sockets());
        let out = Fifo::new();
        let w = sock.writer();
        out.attach(Direct::Frames(w.clone()));
        out.kill();
        assert_eq!(Arc::strong_count(&w), 2, "only `sock` and `w` hold it");
        out.attach(Direct::Frames(w.clone()));
        assert_eq!(Arc::strong_count(&w), 2, "a dead FIFO takes no socket");
    }
}
