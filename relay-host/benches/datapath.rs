//! In-process benchmark of the relay server's data path (issue 10): many small
//! request/response sessions through `relay_host::server::serve`, its real forwarding code
//! on loopback TCP, on a tokio runtime with 1 and with 2 worker threads.
//!
//! Per repeat and thread count: a fresh store and server in this process; `--pairs` pairs
//! of terminals (requester `r<i>`, reachable target `t<i>`, raw frames over plain TCP) log
//! in, each pair opens one session, then every requester sends a `--size`-byte DATA frame,
//! its target answers with one of the same size, and so on (one exchange in flight per
//! session) for `--secs` seconds. The terminals run on the same runtime as the relay, so
//! the figure is what `T` threads do for relay and terminals together. Printed: exchanges
//! per second and round-trip p50/p99 per repeat, then the median over the repeats.
//!
//! ```sh
//! cargo bench -p relay-host --bench datapath --profile datapath -- --threads 1,2 --repeats 3
//! ```

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use relay_host::config::ServeConfig;
use relay_host::store::{AccountName, AccountStore, SqliteStore};
use relay_proto::frame::{self, Credential, Demand, Frame, Hello, Login, Parsed, caps};
use relay_proto::ident::{Password, ServiceName, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "datapath-bench";

struct Args {
    threads: Vec<usize>,
    repeats: usize,
    pairs: usize,
    size: usize,
    secs: f64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        threads: vec![1, 2],
        repeats: 3,
        pairs: 64,
        size: 64,
        secs: 3.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to harness-less targets.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => {
                a.threads = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--repeats" => a.repeats = value.parse()?,
            "--pairs" => a.pairs = value.parse()?,
            "--size" => a.size = value.parse()?,
            "--secs" => a.secs = value.parse()?,
            _ => {
                bail!("unknown flag {flag} (--threads 1,2 --repeats N --pairs N --size B --secs S)")
            }
        }
    }
    Ok(a)
}

/// One repeat's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    println!(
        "datapath: {} pairs, {}-byte DATA each way, {} s per measurement, {} repeat(s)",
        args.pairs, args.size, args.secs, args.repeats
    );
    let mut all: Vec<(usize, Vec<Figures>)> = args.threads.iter().map(|&t| (t, vec![])).collect();
    // Repeats interleave the thread counts, so a burst of load elsewhere hits both alike.
    for r in 0..args.repeats {
        for (threads, figs) in &mut all {
            let f = run_once(&args, *threads)?;
            println!(
                "  repeat {} threads {}: {:.0} exchanges/s, p50 {:.1} µs, p99 {:.1} µs",
                r + 1,
                threads,
                f.per_sec,
                f.p50_us,
                f.p99_us
            );
            figs.push(f);
        }
    }
    println!("| runtime threads | exchanges/s | p50 RTT (µs) | p99 RTT (µs) |");
    println!("|---:|---:|---:|---:|");
    for (threads, figs) in &all {
        let med = |f: fn(&Figures) -> f64| median(figs.iter().map(f).collect());
        println!(
            "| {threads} | {:.0} | {:.1} | {:.1} |",
            med(|f| f.per_sec),
            med(|f| f.p50_us),
            med(|f| f.p99_us)
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A fresh store with accounts `r<i>` and `t<i>`. One cheap argon2id hash (8 KiB, one
/// pass) serves every row: the store checks with the parameters in the PHC string, so a
/// login costs microseconds and the setup stays out of the way.
fn make_store(db: &Path, pairs: usize) -> Result<SqliteStore> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let store = SqliteStore::open(db)?;
    store.add(&AccountName::new("seed")?, PASSWORD)?;
    let params = argon2::Params::new(8, 1, 1, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::from_b64("cmVsYXktYmVuY2g").map_err(|e| anyhow::anyhow!("{e}"))?;
    let phc = hasher
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string();
    let mut conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO accounts (name, phc, created) VALUES (?1, ?2, 0)")?;
        for i in 0..pairs {
            for name in [format!("r{i}"), format!("t{i}")] {
                st.execute(rusqlite::params![name, phc])?;
            }
        }
    }
    tx.commit()?;
    Ok(store)
}

fn run_once(args: &Args, threads: usize) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("relay.db");
    let store = make_store(&db, args.pairs)?;
    let plain = free_port()?;
    let config = ServeConfig {
        listen: free_port()?,
        db: db.clone(),
        allow_plain: Some(plain),
        ..ServeConfig::default()
    };
    let identity = relay_host::reload::identity(&config)?;
    let again = config.clone();
    let reloader = relay_host::reload::Reloader::new(
        config.clone(),
        &identity,
        Box::new(move || Ok(again.clone())),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(relay_host::server::serve(
            config,
            Arc::new(store),
            reloader,
            None,
            async {
                let _ = stop_rx.await;
            },
        ));
        let figures = measure(args, plain).await;
        let _ = stop_tx.send(());
        let _ = server.await;
        figures
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    figures
}

/// Logs in the pairs, opens their sessions, runs the exchanges.
async fn measure(args: &Args, relay: SocketAddr) -> Result<Figures> {
    let mut sessions = Vec::new();
    for i in 0..args.pairs {
        sessions.push(tokio::spawn(open_session(relay, i)));
    }
    let mut pairs = Vec::new();
    for s in sessions {
        pairs.push(s.await??);
    }
    let go = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let mut runs = Vec::new();
    for (req, tgt) in pairs {
        runs.push(tokio::spawn(echo(tgt, args.size)));
        runs.push(tokio::spawn(ping(req, args.size, go.clone())));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    go.store(false, Ordering::Relaxed);
    let mut rtts: Vec<u32> = Vec::new();
    for r in runs {
        rtts.extend(r.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if rtts.is_empty() {
        bail!("no exchange completed");
    }
    rtts.sort_unstable();
    let pct = |p: f64| f64::from(rtts[((rtts.len() - 1) as f64 * p) as usize]) / 1000.0;
    Ok(Figures {
        per_sec: rtts.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// A raw terminal connection: frames in, frames out.
struct Wire {
    tcp: TcpStream,
    buf: Vec<u8>,
}

// One value at a time, on the stack of a terminal's task: no need to box the frame.
#[allow(clippy::large_enum_variant)]
enum In {
    Control(Frame),
    Data(usize),
}

impl Wire {
    async fn login(relay: SocketAddr, user: &str, caps: u32) -> Result<Wire> {
        let tcp = connect(relay).await?;
        tcp.set_nodelay(true)?;
        let mut w = Wire {
            tcp,
            buf: Vec::new(),
        };
        w.send(&Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).map_err(|e| anyhow::anyhow!("{e:?}"))?,
            credential: Credential::Password(
                Password::new(PASSWORD).map_err(|e| anyhow::anyhow!("{e:?}"))?,
            ),
        }))
        .await?;
        match w.next().await? {
            In::Control(Frame::LoginOk(_)) => Ok(w),
            In::Control(f) => bail!("{user}: login answered {f:?}"),
            In::Data(_) => bail!("{user}: DATA before LOGIN_OK"),
        }
    }

    async fn send(&mut self, f: &Frame) -> Result<()> {
        let mut b = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut b).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.tcp.write_all(&b[..n]).await?;
        Ok(())
    }

    /// The next frame; for DATA its payload is consumed and its length returned.
    async fn next(&mut self) -> Result<In> {
        loop {
            match frame::parse(&self.buf).map_err(|e| anyhow::anyhow!("{e:?}"))? {
                Some((Parsed::Control(f), n)) => {
                    self.buf.drain(..n);
                    return Ok(In::Control(f));
                }
                Some((Parsed::DataHeader { len }, n)) => {
                    let len = usize::from(len);
                    while self.buf.len() < n + len {
                        self.fill().await?;
                    }
                    self.buf.drain(..n + len);
                    return Ok(In::Data(len));
                }
                None => self.fill().await?,
            }
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let mut b = [0u8; 4096];
        let n = self.tcp.read(&mut b).await?;
        if n == 0 {
            bail!("the relay closed the connection");
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }

    /// Skips frames other than DATA (none are expected mid-run) until a DATA frame.
    async fn next_data(&mut self) -> Result<usize> {
        loop {
            match self.next().await? {
                In::Data(n) => return Ok(n),
                In::Control(Frame::KeepAliveAck { .. }) => {}
                In::Control(f) => bail!("unexpected {f:?} in a session"),
            }
        }
    }
}

/// Connects to the relay, which `serve` may still be starting: retried for 10 s.
async fn connect(relay: SocketAddr) -> Result<TcpStream> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(relay).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) if Instant::now() > until => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Logs in `r<i>` (requester) and `t<i>` (reachable) and pairs them.
async fn open_session(relay: SocketAddr, i: usize) -> Result<(Wire, Wire)> {
    let mut tgt = Wire::login(relay, &format!("t{i}"), caps::ALL).await?;
    let mut req = Wire::login(relay, &format!("r{i}"), caps::ALL | caps::REQUESTER).await?;
    req.send(&Frame::Demand(Demand {
        target: UserId::new(&format!("t{i}")).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        service: ServiceName::default(),
    }))
    .await?;
    let session = match tgt.next().await? {
        In::Control(Frame::Notice(n)) => n.session,
        _ => bail!("t{i}: no NOTICE"),
    };
    tgt.send(&Frame::Accept { session }).await?;
    match req.next().await? {
        In::Control(Frame::DemandResult(frame::DemandResult::Accepted { .. })) => {}
        _ => bail!("r{i}: demand not accepted"),
    }
    Ok((req, tgt))
}

fn data_frame(size: usize) -> Result<Vec<u8>> {
    let mut f = frame::data_header(size)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .to_vec();
    f.resize(frame::HEADER_LEN + size, 0x5A);
    Ok(f)
}

/// The requester: one exchange in flight; its round trips in nanoseconds.
async fn ping(mut w: Wire, size: usize, go: Arc<AtomicBool>) -> Result<Vec<u32>> {
    let f = data_frame(size)?;
    let mut rtts = Vec::new();
    while go.load(Ordering::Relaxed) {
        let t = Instant::now();
        w.tcp.write_all(&f).await?;
        if w.next_data().await? != size {
            bail!("a reply of the wrong size");
        }
        rtts.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    w.send(&Frame::Terminate).await?;
    Ok(rtts)
}

/// The target: answers each DATA with one of the same size until the requester ends.
async fn echo(mut w: Wire, size: usize) -> Result<Vec<u32>> {
    let f = data_frame(size)?;
    loop {
        match w.next().await? {
            In::Data(_) => w.tcp.write_all(&f).await?,
            In::Control(Frame::Terminate) => return Ok(Vec::new()),
            In::Control(Frame::KeepAliveAck { .. }) => {}
            In::Control(f) => bail!("unexpected {f:?} at the target"),
        }
    }
}
