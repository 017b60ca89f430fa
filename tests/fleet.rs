//! Many lightweight terminals in the test process, for the cluster's failure tests
//! (tests/host_cluster.rs): each is a task on one tokio thread that logs in with a
//! resumption token minted from the database's key (no argon2), stays logged in reading
//! whatever the relay sends, and when its connection ends moves to the next relay address
//! after 0.5 s ± 25 % (the first step of relay-proto's terminal back-off, and its
//! next-address rule: `Terminal::relay`). A `relay expose` process costs megabytes; one
//! of these costs a socket and a small task, so thousands fit.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_proto::frame::{self, Frame, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `Fleet::on` of a terminal that is not logged in.
pub const DOWN: usize = usize::MAX;

/// Each terminal's state, shared with the test.
pub struct State {
    pub epoch: Instant,
    /// The relay address index each terminal is logged in on, or [`DOWN`].
    pub on: Vec<AtomicUsize>,
    /// When each terminal last got LOGIN_OK, in ms since `epoch`.
    pub since: Vec<AtomicU64>,
}

/// The running terminals; dropping it stops them (their connections close).
pub struct Fleet {
    pub state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fleet {
    /// One terminal per LOGIN frame in `logins` (encoded), terminal `i` starting at
    /// address `first(i)` of `addrs`.
    pub fn start(
        addrs: Vec<SocketAddr>,
        logins: Vec<Vec<u8>>,
        first: impl Fn(usize) -> usize,
    ) -> Fleet {
        let n = logins.len();
        let state = Arc::new(State {
            epoch: Instant::now(),
            on: (0..n).map(|_| AtomicUsize::new(DOWN)).collect(),
            since: (0..n).map(|_| AtomicU64::new(0)).collect(),
        });
        let starts: Vec<usize> = (0..n).map(first).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fleet runtime");
            rt.block_on(async move {
                let addrs: Arc<[SocketAddr]> = addrs.into();
                for (i, (login, start)) in logins.into_iter().zip(starts).enumerate() {
                    tokio::spawn(terminal(i, addrs.clone(), login, start, shared.clone()));
                }
                let _ = stopped.await;
            });
        });
        Fleet {
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Terminals logged in on address `node`.
    pub fn on(&self, node: usize) -> usize {
        self.state
            .on
            .iter()
            .filter(|o| o.load(Ordering::Relaxed) == node)
            .count()
    }

    /// Terminals logged in anywhere.
    pub fn up(&self) -> usize {
        self.state
            .on
            .iter()
            .filter(|o| o.load(Ordering::Relaxed) != DOWN)
            .count()
    }

    /// Milliseconds since the fleet started.
    pub fn now_ms(&self) -> u64 {
        self.state.epoch.elapsed().as_millis() as u64
    }

    /// For each terminal logged in now, when it logged in (ms since the fleet started).
    pub fn login_times(&self) -> Vec<u64> {
        (0..self.state.on.len())
            .filter(|&i| self.state.on[i].load(Ordering::Relaxed) != DOWN)
            .map(|i| self.state.since[i].load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One terminal: log in, stay until the connection ends, move on to the next address.
async fn terminal(
    i: usize,
    addrs: Arc<[SocketAddr]>,
    login: Vec<u8>,
    mut at: usize,
    st: Arc<State>,
) {
    let mut seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addrs[at])).await
            && s.write_all(&login).await.is_ok()
            && logged_in(&mut s).await
        {
            st.since[i].store(st.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            st.on[i].store(at, Ordering::Relaxed);
            let mut buf = [0u8; 512];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            st.on[i].store(DOWN, Ordering::Relaxed);
        }
        at = (at + 1) % addrs.len();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(375 + seed % 251)).await;
    }
}

/// Reads the relay's answer to LOGIN: LOGIN_OK (true), or an ERROR or the end (false).
async fn logged_in(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    loop {
        match frame::parse(&buf) {
            Ok(Some((Parsed::Control(Frame::LoginOk(_)), _))) => return true,
            Ok(Some((Parsed::Control(_), n))) => {
                buf.drain(..n);
            }
            Ok(None) => {
                let mut chunk = [0u8; 512];
                match s.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
}
