//! The services behind every path (echo, HTTP) and the load generators that drive them.
//! Everything connects to 127.0.0.1 only; every loop is bounded by a deadline.

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{MissedTickBehavior, timeout};

/// Request/response size of the latency and session figures.
pub const MSG: usize = 64;
const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// The body of every HTTP response of the bench's HTTP server.
pub const HTTP_BODY: &str = "hello, relay\n";

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// A current-thread runtime: the load side stays on one core, like the services.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs the echo and HTTP services until killed (the `bench serve` subcommand).
pub async fn serve(echo_port: u16, http_port: u16) -> Result<()> {
    let echo = TcpListener::bind(local(echo_port)).await?;
    let http = TcpListener::bind(local(http_port)).await?;
    let e = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = echo.accept().await {
                tokio::spawn(echo_conn(s));
            }
        }
    });
    let h = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = http.accept().await {
                tokio::spawn(http_conn(s));
            }
        }
    });
    let _ = tokio::join!(e, h);
    Ok(())
}

async fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn http_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{HTTP_BODY}",
        HTTP_BODY.len()
    );
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0usize;
    loop {
        if have == buf.len() {
            return; // a request head over 16 KiB: not ours
        }
        match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        // Answer every complete request head in the buffer (pipelining allowed; GETs only).
        let mut start = 0;
        let mut out = Vec::new();
        while let Some(i) = find(&buf[start..have], b"\r\n\r\n") {
            out.extend_from_slice(resp.as_bytes());
            start += i + 4;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One 64-byte request/response on an open connection; returns the RTT.
async fn rtt(s: &mut TcpStream, req: &[u8; MSG], resp: &mut [u8; MSG]) -> Result<Duration> {
    let t = Instant::now();
    timeout(OP_TIMEOUT, async {
        s.write_all(req).await?;
        s.read_exact(resp).await?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| anyhow!("echo timed out"))??;
    if resp != req {
        bail!("echo returned other bytes");
    }
    Ok(t.elapsed())
}

async fn connect(port: u16) -> Result<TcpStream> {
    let s = timeout(OP_TIMEOUT, TcpStream::connect(local(port)))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
        .with_context(|| format!("connect 127.0.0.1:{port}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Checks the path end to end: one echo round trip (retried until `wait`, for relays whose
/// device side logs in after the public port opens).
pub async fn probe_echo(port: u16, wait: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = anyhow!("no attempt");
    while start.elapsed() < wait {
        let r = async {
            let mut s = connect(port).await?;
            let req = [7u8; MSG];
            let mut resp = [0u8; MSG];
            rtt(&mut s, &req, &mut resp).await
        }
        .await;
        match r {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.context(format!("echo through 127.0.0.1:{port} never worked")))
}

/// Checks the HTTP path: one GET with a 200 answer.
pub async fn probe_http(port: u16, wait: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = anyhow!("no attempt");
    while start.elapsed() < wait {
        let r = async {
            let mut s = connect(port).await?;
            http_get(&mut s).await
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.context(format!("HTTP through 127.0.0.1:{port} never worked")))
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

async fn http_get(s: &mut TcpStream) -> Result<()> {
    let want = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{HTTP_BODY}",
        HTTP_BODY.len()
    );
    let mut buf = vec![0u8; want.len()];
    timeout(OP_TIMEOUT, async {
        s.write_all(GET).await?;
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| anyhow!("HTTP GET timed out"))??;
    if buf != want.as_bytes() {
        bail!("unexpected HTTP response");
    }
    Ok(())
}

/// RTT percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rtt {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub count: u64,
    pub per_s: f64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn summarize(h: &Histogram<u64>, elapsed: Duration) -> Rtt {
    Rtt {
        p50_us: h.value_at_quantile(0.50) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_us: h.value_at_quantile(0.999) as f64 / 1000.0,
        count: h.len(),
        per_s: h.len() as f64 / elapsed.as_secs_f64(),
    }
}

/// 64-byte request/response at a fixed rate on one connection.
pub async fn latency_fixed_rate(port: u16, rate: u32, dur: Duration) -> Result<Rtt> {
    let mut s = connect(port).await?;
    let mut h = new_hist();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let req = [0x5au8; MSG];
    let mut resp = [0u8; MSG];
    let start = Instant::now();
    while start.elapsed() < dur {
        tick.tick().await;
        let d = rtt(&mut s, &req, &mut resp).await?;
        h.saturating_record(d.as_nanos() as u64);
    }
    Ok(summarize(&h, start.elapsed()))
}

/// 64-byte request/response as fast as possible on `conns` connections (closed loop).
pub async fn latency_load(port: u16, conns: usize, dur: Duration) -> Result<Rtt> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(port).await?;
            let mut h = new_hist();
            let req = [i as u8; MSG];
            let mut resp = [0u8; MSG];
            while start.elapsed() < dur {
                let d = rtt(&mut s, &req, &mut resp).await?;
                h.saturating_record(d.as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(h)
        }));
    }
    let mut all = new_hist();
    for t in tasks {
        all.add(t.await??).map_err(|e| anyhow!("{e:?}"))?;
    }
    Ok(summarize(&all, start.elapsed()))
}

/// New sessions: connect, one 64-byte request/response, close; `workers` in parallel.
/// Returns (completed sessions per second, failed sessions).
pub async fn sessions(port: u16, workers: usize, dur: Duration) -> Result<(f64, u64)> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..workers {
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let req = [i as u8; MSG];
            let mut resp = [0u8; MSG];
            while start.elapsed() < dur {
                let r = async {
                    let mut s = connect(port).await?;
                    rtt(&mut s, &req, &mut resp).await?;
                    s.shutdown().await?;
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                match r {
                    Ok(()) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        // Back off a little so a broken path does not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await?;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / start.elapsed().as_secs_f64(), failed))
}

/// HTTP GETs at a fixed total rate over `conns` keep-alive connections, while `sample` is
/// called every 200 ms. Returns (achieved requests/s, failed requests).
pub async fn http_fixed_rate(
    port: u16,
    conns: usize,
    rate: u32,
    dur: Duration,
    mut sample: impl FnMut(),
) -> Result<(f64, u64)> {
    let start = Instant::now();
    let per_conn = (rate as f64 / conns as f64).max(1.0);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(port).await?;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_conn));
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let (mut ok, mut failed) = (0u64, 0u64);
            while start.elapsed() < dur {
                tick.tick().await;
                match http_get(&mut s).await {
                    Ok(()) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        s = connect(port).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((ok, failed))
        }));
    }
    let mut every = tokio::time::interval(Duration::from_millis(200));
    while start.elapsed() < dur {
        every.tick().await;
        sample();
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await??;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / start.elapsed().as_secs_f64(), failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_clients_talk() {
        let rt = runtime().unwrap();
        rt.block_on(async {
            let (e, h) = (
                crate::procs::free_port().unwrap(),
                crate::procs::free_port().unwrap(),
            );
            tokio::spawn(serve(e, h));
            probe_echo(e, Duration::from_secs(5)).await.unwrap();
            probe_http(h, Duration::from_secs(5)).await.unwrap();
            let d = Duration::from_millis(200);
            let low = latency_fixed_rate(e, 100, d).await.unwrap();
            assert!(low.count > 0 && low.p50_us > 0.0);
            let high = latency_load(e, 4, d).await.unwrap();
            assert!(high.count > low.count);
            let (per_s, failed) = sessions(e, 2, d).await.unwrap();
            assert!(per_s > 0.0 && failed == 0);
            let (rps, failed) = http_fixed_rate(h, 2, 100, d, || {}).await.unwrap();
            assert!(rps > 0.0 && failed == 0);
        });
    }
}
