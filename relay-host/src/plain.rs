//! A plain-TCP relay connection whose write side can be shared.
//!
//! The connection's own task reads and writes it like any stream. The write side is also
//! handed to the connection's [`crate::fifo::Fifo`], so that another connection's task
//! forwarding a session's payload can write it straight into this socket when nothing is
//! queued for it ([`crate::fifo::Fifo::push_frame`]): one system call and no wake-up of
//! this connection's task, where the queue costs a task switch (and, with several worker
//! threads, often a thread wake-up) per message. TLS and the device channel keep their
//! state in the stream, so only plain TCP is shared this way.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A plain TCP connection: the read half owned by the connection's task, the write half
/// shared ([`PlainTcp::writer`]).
#[derive(Debug)]
pub struct PlainTcp {
    read: OwnedReadHalf,
    write: Arc<OwnedWriteHalf>,
}

impl PlainTcp {
    /// Splits `tcp`; the socket closes once both halves and every [`PlainTcp::writer`]
    /// clone are gone (the last write half sends FIN as it goes).
    pub fn new(tcp: TcpStream) -> Self {
        let (read, write) = tcp.into_split();
        Self {
            read,
            write: Arc::new(write),
        }
    }

    /// The socket (for readiness and `splice(2)`).
    pub fn tcp(&self) -> &TcpStream {
        self.read.as_ref()
    }

    /// The shared write side.
    pub fn writer(&self) -> Arc<OwnedWriteHalf> {
        self.write.clone()
    }
}

impl AsyncRead for PlainTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = self.write.as_ref().as_ref();
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            // A full socket clears the readiness, so the next poll registers `cx`.
            match tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP keeps nothing in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The write half is shared, so it cannot be dropped to send FIN: shut it down here.
        // SAFETY: the descriptor is this connection's own, open while `self` lives.
        let r = unsafe { libc::shutdown(self.tcp().as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}
