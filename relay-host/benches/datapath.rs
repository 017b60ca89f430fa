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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use relay_proto::frame::Frame;
use tokio::io::AsyncWriteExt;

#[path = "../tests/support/raw.rs"]
mod raw;
use raw::{In, Relay, Wire, data_frame, open_session};

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

fn run_once(args: &Args, threads: usize) -> Result<Figures> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let relay = Relay::start(args.pairs)?;
        let figures = measure(args, relay.plain).await;
        relay.stop().await?;
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
