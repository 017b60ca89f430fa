//! `relay serve`'s threads: one tokio current-thread runtime per thread, each with its own
//! epoll and timers, and connections dealt out to them in turn (thread per core).
//!
//! Why not tokio's multi-thread runtime: on the two-hop published path its workers hand
//! woken tasks to each other, park and unpark around each event and steal work, and one
//! current-thread runtime beat two workers on every figure of the bench (docs/BENCHMARKS.md,
//! figure 8: 1.29× the new sessions per second at 0.89× the CPU per request). A
//! current-thread runtime per core keeps that on a many-core relay: a connection's task,
//! its socket's readiness and its timers stay on the thread it was dealt to. Sessions
//! whose two ends sit on different threads still meet in the shared router and FIFOs
//! (their wakers are thread-safe), and a forwarded frame is written straight into an idle
//! receiver's socket from the sender's thread ([`crate::fifo`]), so most messages wake
//! nobody. What is given up is work stealing: a thread whose connections are busy keeps
//! them.
//!
//! The main thread's runtime is worker 0: it runs the accept loops, the timers, the
//! account watch and the admin side besides its share of connections.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

/// How long a stopping worker gives its blocking tasks (a password check takes ~20 ms).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The runtimes connections are dealt to: the main one and the worker threads'.
#[derive(Debug)]
pub struct Workers {
    /// `handles[0]` is the main thread's runtime.
    handles: Vec<Handle>,
    /// The next runtime in turn (modulo `handles.len()`).
    next: AtomicUsize,
    /// Each worker thread and the sender that stops it.
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// A current-thread runtime with I/O and timers. `blocking`: its pool of blocking threads
/// (password checks are bounded elsewhere, by the number of cores; the rest are short
/// store queries).
pub fn runtime(blocking: usize) -> anyhow::Result<Runtime> {
    Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(blocking)
        .build()
        .context("starting the async runtime")
}

impl Workers {
    /// `main` (the caller's runtime) and `n - 1` more threads, each running a runtime of
    /// its own until [`Workers::stop`].
    pub fn start(main: Handle, n: usize, blocking: usize) -> anyhow::Result<Workers> {
        let mut workers = Workers {
            handles: vec![main],
            next: AtomicUsize::new(0),
            threads: Vec::new(),
        };
        for i in 1..n.max(1) {
            let rt = runtime(blocking)?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(rt.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("relay-worker-{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stopped);
                    rt.shutdown_timeout(STOP_GRACE);
                })
                .context("starting a worker thread")?;
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    /// Runs `task` on the next runtime in turn with `tcp` registered there: a socket's
    /// readiness is delivered by the reactor it is registered with, so it moves with its
    /// task (two `epoll_ctl` calls when it changes threads).
    pub fn spawn_with<F, Fut>(&self, tcp: TcpStream, task: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let n = self.handles.len();
        if n == 1 {
            self.handles[0].spawn(task(tcp));
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => return tracing::warn!("handing a connection to a worker: {e}"),
        };
        self.handles[i].spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => task(tcp).await,
                Err(e) => tracing::warn!("registering a connection on a worker: {e}"),
            }
        });
    }

    /// Stops the worker threads (their connections' tasks are dropped) and waits for them.
    pub fn stop(self) {
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections are dealt to every runtime in turn, each task runs on its runtime's
    /// thread, and a socket moved to another thread still reads and writes.
    #[test]
    fn connections_are_dealt_to_every_thread_and_their_sockets_work_there() {
        let main = runtime(2).unwrap();
        let workers = Workers::start(main.handle().clone(), 3, 2).unwrap();
        assert_eq!(workers.handles.len(), 3);
        let seen = Arc::new(Mutex::new(HashSet::new()));
        main.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..6 {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (tcp, _) = listener.accept().await.unwrap();
                let (seen, done_tx) = (seen.clone(), done_tx.clone());
                workers.spawn_with(tcp, move |mut tcp| async move {
                    seen.lock().unwrap().insert(std::thread::current().id());
                    let mut b = [0u8; 4];
                    tcp.read_exact(&mut b).await.unwrap();
                    tcp.write_all(&b).await.unwrap();
                    done_tx.send(()).unwrap();
                });
                client.write_all(b"ping").await.unwrap();
                let mut b = [0u8; 4];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"ping");
                done.recv().await.unwrap();
            }
        });
        assert_eq!(seen.lock().unwrap().len(), 3, "one thread per runtime");
        workers.stop();
    }
}
