//! Payload between two plain-TCP connections without user space: `splice(2)` moves it
//! from the sender's socket into a pipe, and later from the pipe into the receiver's
//! socket. The relay core's forwarding contract allows it ([`relay_proto::relay::Relay::forwarded`]):
//! the sender reports the bytes it moved, and the receiver's FIFO holds a
//! [`crate::fifo::Chunk::Pipe`] in the place the copied chunk would have had, so the
//! order of headers, payload and control frames is the same as on the copy path.
//!
//! One pipe per sending connection while it forwards (none while idle). Bytes enter the
//! pipe only up to its capacity, so a pipe never blocks the sender with bytes that have no
//! chunk yet; the receiver's FIFO credit bounds it as for copied payload.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A pipe holding payload on its way from one socket to another.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds in bytes (from the kernel: F_GETPIPE_SZ).
    capacity: usize,
    /// Bytes in the pipe now.
    len: AtomicUsize,
}

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Pipe {
    /// A new non-blocking pipe.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_GETPIPE_SZ takes no argument and only reads the pipe's size.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(Self {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(4096).max(4096),
            len: AtomicUsize::new(0),
        })
    }

    /// Room left in the pipe, in bytes.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.len())
    }

    /// Bytes in the pipe.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether the pipe is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves up to `n` bytes from socket `from` into the pipe. `Ok(0)`: end of stream.
    pub fn fill(&self, from: RawFd, n: usize) -> io::Result<usize> {
        // SAFETY: plain system call on descriptors that are open for its duration.
        let r = cvt(unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                self.write.as_raw_fd(),
                std::ptr::null_mut(),
                n,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        })?;
        self.len.fetch_add(r, Ordering::AcqRel);
        Ok(r)
    }

    /// Moves up to `n` bytes from the pipe into socket `to`.
    pub fn drain(&self, to: RawFd, n: usize) -> io::Result<usize> {
        // SAFETY: plain system call on descriptors that are open for its duration.
        let r = cvt(unsafe {
            libc::splice(
                self.read.as_raw_fd(),
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                n,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        })?;
        self.len.fetch_sub(r, Ordering::AcqRel);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn socket_to_pipe_to_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let c_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(c_l.local_addr().unwrap()).unwrap();
        let (mut d, _) = c_l.accept().unwrap();

        a.write_all(b"hello, pipe").unwrap();
        let pipe = Pipe::new().unwrap();
        assert!(pipe.room() >= 4096);
        let mut moved = 0;
        while moved < 11 {
            match pipe.fill(b.as_raw_fd(), 11 - moved) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.len(), 11);
        assert_eq!(pipe.drain(c.as_raw_fd(), 5).unwrap(), 5);
        assert_eq!(pipe.drain(c.as_raw_fd(), 6).unwrap(), 6);
        assert!(pipe.is_empty());
        let mut got = [0u8; 11];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, pipe");
    }
}
