//! `bench`: installs nothing itself (see bench/install.sh); starts every system's path on
//! loopback, measures, and writes the Markdown report and the PNG chart.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use relay_bench::chart::{self, Panel};
use relay_bench::cost;
use relay_bench::fleet::{self, Fleet};
use relay_bench::load;
use relay_bench::procs::{self, Proc, free_port, wait_port};
use relay_bench::report::{self, FIGS, Results, applies};
use relay_bench::systems::{self, Ctx, PathUp, RelayOpts, System, Tools, bench_dir};
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Relay vs direct TCP, socat, rathole, bore and an OpenSSH tunnel, side by side on loopback",
    after_help = "Install the peers first: bash bench/install.sh"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// Smoke test: one short run per figure; fails if a path is broken or a figure is missing.
    #[arg(long)]
    quick: bool,
    /// Systems to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,socat,rathole,bore,ssh,ssh-chain,relay,relay-published,relay-published-1t"
    )]
    systems: Vec<System>,
    /// Systems that must be available (otherwise they are reported as "not available").
    #[arg(long, value_enum, value_delimiter = ',')]
    require: Vec<System>,
    /// Figures to run: tput, latency, http, sessions, idle, recovery.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tput,latency,http,sessions,idle,recovery"
    )]
    figures: Vec<String>,
    /// Repeats per figure (the report shows medians). Default: 5, or 1 with --quick.
    #[arg(long)]
    repeats: Option<u32>,
    /// Seconds per measurement. Default: 10, or 1 with --quick.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second of the low-rate latency figure.
    #[arg(long, default_value_t = 200)]
    low_rate: u32,
    /// Connections of the high-load latency figure.
    #[arg(long, default_value_t = 32)]
    high_conns: usize,
    /// Idle clients of the peers for figure 5, as rathole,bore,ssh.
    /// Default: 1000,200,100, or 100,20,10 with --quick.
    #[arg(long, value_delimiter = ',')]
    idle_n: Vec<usize>,
    /// Logged-in idle terminals of our relay for figure 5 (the first is also its row in the
    /// side-by-side table). Default: 1000,10000,100000, or 200 with --quick.
    #[arg(long, value_delimiter = ',')]
    relay_idle_n: Vec<usize>,
    /// Logged-in terminals when our relay is restarted (figure 6). Default: 10000, or 200
    /// with --quick.
    #[arg(long)]
    recovery_n: Option<usize>,
    /// Markdown report. Default: docs/BENCHMARKS.md, or bench/out/quick/BENCHMARKS.md with --quick.
    #[arg(long)]
    out: Option<PathBuf>,
    /// PNG chart. Default: bench/results/benchmarks.png, or bench/out/quick/benchmarks.png.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Extra `relay serve` flags; `{plain}` becomes a free 127.0.0.1 address, the relay's
    /// plain-TCP listener, and then terminals connect there.
    #[arg(
        long,
        env = "RELAY_BENCH_SERVE_ARGS",
        default_value = "--allow-plain {plain}",
        allow_hyphen_values = true
    )]
    relay_serve_args: String,
    /// Extra flags of `relay expose` and `relay connect` (plain TCP).
    #[arg(
        long,
        env = "RELAY_BENCH_TERMINAL_ARGS",
        default_value = "--plain",
        allow_hyphen_values = true
    )]
    relay_terminal_args: String,
    /// Extra `relay serve` flags of the relay-splice system.
    #[arg(
        long,
        env = "RELAY_BENCH_SPLICE_ARGS",
        default_value = "--splice",
        allow_hyphen_values = true
    )]
    relay_splice_args: String,
    /// Run our relay over TLS (generated certificate pinned with --fingerprint) instead of
    /// plain TCP.
    #[arg(long)]
    relay_tls: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Runs the echo and HTTP services (started by the bench itself).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        echo_port: u16,
        #[arg(long)]
        http_port: u16,
    },
}

struct Cfg {
    quick: bool,
    dur: Duration,
    low_rate: u32,
    high_conns: usize,
    idle_n: [usize; 3],
    relay_idle_n: Vec<usize>,
    recovery_n: usize,
    figures: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Sub::Serve {
        echo_port,
        http_port,
    }) = cli.cmd
    {
        let r = load::runtime().and_then(|rt| rt.block_on(load::serve(echo_port, http_port)));
        if let Err(e) = r {
            eprintln!("bench serve: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match run(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    }
}

fn split(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn run(cli: Cli) -> Result<bool> {
    let started = Instant::now();
    let quick = cli.quick;
    let repeats = cli.repeats.unwrap_or(if quick { 1 } else { 5 }).max(1);
    let dur = Duration::from_secs_f64(cli.duration.unwrap_or(if quick { 1.0 } else { 10.0 }));
    let mut idle_n = if quick {
        [100, 20, 10]
    } else {
        [1000, 200, 100]
    };
    for (i, n) in cli.idle_n.iter().take(3).enumerate() {
        idle_n[i] = *n;
    }
    let relay_idle_n = match (&cli.relay_idle_n[..], quick) {
        ([], true) => vec![200],
        ([], false) => vec![1000, 10_000, 100_000],
        (v, _) => v.to_vec(),
    };
    let recovery_n = cli
        .recovery_n
        .unwrap_or(if quick { 200 } else { 10_000 })
        .max(1);
    let ws = bench_dir().join("..");
    let out_dir = if quick {
        bench_dir().join("out/quick")
    } else {
        bench_dir().join("results")
    };
    let md_path = cli.out.clone().unwrap_or_else(|| {
        if quick {
            out_dir.join("BENCHMARKS.md")
        } else {
            ws.join("docs/BENCHMARKS.md")
        }
    });
    let png_path = cli
        .chart
        .clone()
        .unwrap_or_else(|| out_dir.join("benchmarks.png"));
    let mut cfg = Cfg {
        quick,
        dur,
        low_rate: cli.low_rate.max(1),
        high_conns: cli.high_conns.max(1),
        idle_n,
        relay_idle_n,
        recovery_n,
        figures: cli.figures.clone(),
    };
    // One fd per fleet terminal in the bench (the fleet) and one in the relay, plus slack.
    let fleet_max = cfg
        .relay_idle_n
        .iter()
        .copied()
        .chain([cfg.recovery_n])
        .max()
        .unwrap_or(0);
    let fd_limit = procs::raise_fd_limit(fleet_max as u64 + 10_000);
    // Fleets that cannot fit under the fd limit are reported as such, and the largest N
    // that fits is measured instead.
    let fits = (fd_limit as usize).saturating_sub(FD_SLACK);
    let mut idle_unmeasurable = Vec::new();
    cfg.relay_idle_n.retain(|&n| {
        if n > fits {
            idle_unmeasurable.push((
                n,
                format!(
                    "not measurable on this machine: RLIMIT_NOFILE is {fd_limit} and cannot be \
                     raised (no CAP_SYS_RESOURCE); the relay needs one fd per terminal"
                ),
            ));
        }
        n <= fits
    });
    let largest = fits / 1000 * 1000;
    if !idle_unmeasurable.is_empty() && largest > 0 && !cfg.relay_idle_n.contains(&largest) {
        cfg.relay_idle_n.push(largest);
    }
    if cfg.recovery_n > fits {
        bail!(
            "--recovery-n {} needs more fds than RLIMIT_NOFILE allows ({fd_limit})",
            cfg.recovery_n
        );
    }
    let tools = Tools::locate();
    let work = bench_dir().join("out/run");
    let _ = fs::remove_dir_all(&work);
    let mut ctx = Ctx::new(
        tools.clone(),
        work.clone(),
        RelayOpts {
            serve_args: split(&cli.relay_serve_args),
            terminal_args: split(&cli.relay_terminal_args),
            splice_args: split(&cli.relay_splice_args),
            tls: cli.relay_tls,
        },
    )?;
    let mut systems: Vec<System> = Vec::new();
    for s in &cli.systems {
        if !systems.contains(s) {
            systems.push(*s);
        }
    }
    let mut res = Results {
        idle_unmeasurable,
        ..Results::default()
    };
    for &s in &systems {
        if let Some(why) = tools.missing(s) {
            if cli.require.contains(&s) {
                bail!("{s} is required (--require) but {why}");
            }
            if !s.is_relay() {
                res.errors.push(format!("{s}: {why}"));
            }
            println!("{s}: {why}");
            res.unavailable.insert(s, why);
        }
    }
    if cfg.figures.iter().any(|f| f == "tput") && !tools.iperf3.is_file() {
        bail!("iperf3 not found: run bench/install.sh");
    }
    if cfg.figures.iter().any(|f| f == "http") && !tools.wrk.is_file() {
        bail!("wrk not found: run bench/install.sh");
    }
    if cfg.figures.iter().any(|f| f == "http") && !tools.strace.is_file() {
        bail!("strace not found (figure 3c): run bench/install.sh");
    }

    // The services behind every path, in a child process of their own.
    let (echo, http) = (free_port()?, free_port()?);
    let exe = std::env::current_exe()?;
    let mut c = Command::new(&exe);
    c.args([
        "serve",
        "--echo-port",
        &echo.to_string(),
        "--http-port",
        &http.to_string(),
    ]);
    let mut svc = vec![Proc::spawn("services", c, &work.join("services.log"))?];
    wait_port(echo, Duration::from_secs(10), &mut svc)?;
    wait_port(http, Duration::from_secs(10), &mut svc)?;
    let rt = load::runtime()?;

    let runnable: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| !res.unavailable.contains_key(s))
        .collect();
    for rep in 0..repeats {
        // Systems interleaved within each repeat, so drift on a shared machine hits all alike.
        for &sys in &runnable {
            println!(
                "[{:>5.1}s] repeat {}/{repeats}: {sys}",
                started.elapsed().as_secs_f64(),
                rep + 1
            );
            measure_system(sys, &mut ctx, &rt, &cfg, echo, http, &mut res);
        }
    }
    drop(svc);

    // A figure is missing when its required metric has no sample for an applicable system.
    for &sys in &runnable {
        for fig in FIGS {
            let wanted = match fig.id {
                "lat_low" | "lat_high" => "latency",
                "rss" | "cost" => "http",
                "idle_scale" => "idle",
                other => other,
            };
            if fig.required.is_empty()
                || !applies(fig.id, sys)
                || !cfg.figures.iter().any(|f| f == wanted)
            {
                continue;
            }
            // Idle growth can be 0 KiB at small N (within already-touched pages).
            let min = if fig.id == "idle" {
                0.0
            } else {
                f64::MIN_POSITIVE
            };
            if res
                .median(fig.required, sys)
                .filter(|v| *v >= min)
                .is_none()
            {
                res.errors.push(format!(
                    "{sys}: figure {} missing ({})",
                    fig.id, fig.required
                ));
            }
        }
    }

    // Figure 5 at every N of our relay.
    if want(&cfg, "idle") {
        for &sys in runnable.iter().filter(|s| applies("idle_scale", **s)) {
            for &n in &cfg.relay_idle_n {
                if res.median(&format!("idle_scale.{n}.pss"), sys).is_none() {
                    res.errors
                        .push(format!("{sys}: figure idle_scale missing at N = {n}"));
                }
            }
        }
    }

    let mut md = render_report(
        &cli, &cfg, &systems, &res, repeats, fd_limit, &tools, &png_path, &md_path,
    );
    md.push_str(&kept_sections(&md_path));
    if let Some(d) = md_path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    if let Some(d) = png_path.parent() {
        fs::create_dir_all(d)?;
    }
    chart::render(
        &png_path,
        &format!(
            "Relay benchmarks ({}; median of {repeats} run(s), {} s each; {})",
            if quick { "--quick" } else { "full" },
            dur.as_secs_f64(),
            one_line_machine()
        ),
        &panels(&res, &runnable),
    )?;
    println!();
    println!("{}", report::tables(&res, &systems));
    println!("report: {}", md_path.display());
    println!("chart:  {}", png_path.display());
    println!("total:  {:.1} s", started.elapsed().as_secs_f64());
    if res.errors.is_empty() {
        println!("bench: all selected paths work, every figure present");
        Ok(true)
    } else {
        for e in &res.errors {
            eprintln!("bench: FAILED: {e}");
        }
        Ok(false)
    }
}

fn one_line_machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpus} cores, loopback")
}

fn panels(res: &Results, systems: &[System]) -> Vec<Panel> {
    let spec: [(&str, &str); 6] = [
        ("tput1.gbps", "Throughput, 1 stream (Gbit/s)"),
        ("tput8.gbps", "Throughput, 8 streams (Gbit/s)"),
        ("http.rps", "HTTP requests/s (wrk)"),
        ("lat_low.p50_us", "RTT p50 at low rate (µs)"),
        ("lat_low.p99_us", "RTT p99 at low rate (µs)"),
        ("lat_high.p99_us", "RTT p99 at high load (µs)"),
    ];
    spec.iter()
        .map(|(key, title)| Panel {
            title: title.to_string(),
            bars: systems
                .iter()
                .filter_map(|&s| res.median(key, s).map(|v| (s.name().to_string(), v)))
                .collect(),
        })
        .collect()
}

fn want(cfg: &Cfg, fig: &str) -> bool {
    cfg.figures.iter().any(|f| f == fig)
}

/// Runs every selected figure once for `sys`; failures are recorded, never fatal.
fn measure_system(
    sys: System,
    ctx: &mut Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &Cfg,
    echo: u16,
    http: u16,
    res: &mut Results,
) {
    let step = |fig: &str, r: Result<()>, res: &mut Results| {
        if let Err(e) = r {
            let msg = format!("{sys}/{fig}: {e:#}");
            println!("    error: {msg}");
            res.errors.push(msg);
        }
    };
    if want(cfg, "tput") {
        let r = fig_tput(sys, ctx, cfg, res);
        step("tput", r, res);
    }
    if want(cfg, "latency") || want(cfg, "sessions") {
        let r = fig_echo(sys, ctx, rt, cfg, echo, res);
        step("latency/sessions", r, res);
    }
    if want(cfg, "http") {
        let r = fig_http(sys, ctx, rt, cfg, http, res);
        step("http", r, res);
    }
    if want(cfg, "idle") && applies("idle", sys) {
        let r = if sys.is_relay() {
            fig_idle_relay(sys, ctx, cfg, res)
        } else {
            fig_idle(sys, ctx, cfg, echo, res)
        };
        step("idle", r, res);
    }
    if want(cfg, "recovery") && applies("recovery", sys) {
        let r = fig_recovery(sys, ctx, rt, cfg, echo, res);
        step("recovery", r, res);
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Runs a command to completion with a deadline; returns stdout.
fn run_with_deadline(name: &str, mut c: Command, deadline: Duration) -> Result<String> {
    use std::io::Read;
    let tmp = std::env::temp_dir().join(format!("relay-bench-{}-{name}.out", std::process::id()));
    let _ = fs::remove_file(&tmp);
    c.stdin(std::process::Stdio::null());
    let mut p = Proc::spawn(name, c, &tmp)?;
    let start = Instant::now();
    loop {
        match p.check_alive() {
            Ok(()) if start.elapsed() > deadline => {
                bail!("{name} did not finish within {deadline:?}")
            }
            Ok(()) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    drop(p);
    let mut s = String::new();
    fs::File::open(&tmp)?.read_to_string(&mut s)?;
    let _ = fs::remove_file(&tmp);
    Ok(s)
}

fn fig_tput(sys: System, ctx: &mut Ctx, cfg: &Cfg, res: &mut Results) -> Result<()> {
    let port = free_port()?;
    let mut server = vec![Proc::spawn(
        "iperf3 -s",
        {
            let mut c = Command::new(&ctx.tools.iperf3);
            c.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
            c
        },
        &ctx.work.join("iperf3-server.log"),
    )?];
    wait_port(port, Duration::from_secs(10), &mut server)?;
    let path = systems::start(sys, port, ctx)?;
    // The readiness probe reached iperf3 -s as an empty control connection on paths whose
    // public port forwards at once; give iperf3 time to reset before the real test.
    std::thread::sleep(Duration::from_millis(500));
    for streams in [1u32, 8] {
        let t = match iperf(ctx, cfg, streams, &path) {
            Ok(r) => r,
            Err(e) => {
                println!("    iperf3 -P {streams} failed once ({e:#}); retrying");
                std::thread::sleep(Duration::from_secs(1));
                iperf(ctx, cfg, streams, &path)?
            }
        };
        let key = if streams == 1 { "tput1" } else { "tput8" };
        res.add(&format!("{key}.gbps"), sys, t.bps / 1e9);
        if !path.procs.is_empty() {
            let gb = t.bytes / 1e9;
            res.add(&format!("{key}.cpu_s_per_gb"), sys, t.cpu_all / gb);
            res.add(
                &format!("{key}.server_cpu_s_per_gb"),
                sys,
                t.cpu_server / gb,
            );
        }
        println!(
            "    tput -P {streams}: {:.2} Gbit/s, forwarders' CPU {:.2} s (relay role {:.2} s)",
            t.bps / 1e9,
            t.cpu_all,
            t.cpu_server
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(path);
    drop(server);
    Ok(())
}

/// One iperf3 run's result.
struct Tput {
    bps: f64,
    bytes: f64,
    /// CPU seconds of every forwarding process of the path.
    cpu_all: f64,
    /// CPU seconds of the relay-role process tree alone.
    cpu_server: f64,
}

/// One iperf3 client run through the path.
fn iperf(ctx: &Ctx, cfg: &Cfg, streams: u32, path: &PathUp) -> Result<Tput> {
    let (fwd, port) = (path.forwarders(), path.port);
    {
        let cpu0 = procs::cpu_seconds(&fwd);
        let server0 = procs::cpu_seconds(&path.server);
        let mut c = Command::new(&ctx.tools.iperf3);
        c.args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &secs(cfg.dur).to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "5000",
        ]);
        let out = run_with_deadline("iperf3", c, cfg.dur + Duration::from_secs(20))?;
        let cpu_all = procs::cpu_seconds(&fwd) - cpu0;
        let cpu_server = procs::cpu_seconds(&path.server) - server0;
        let j: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
            anyhow!(
                "iperf3 JSON: {e}: {}",
                out.chars().take(300).collect::<String>()
            )
        })?;
        if let Some(err) = j.get("error") {
            bail!("iperf3 -P {streams}: {err}");
        }
        let recv = &j["end"]["sum_received"];
        let bps = recv["bits_per_second"]
            .as_f64()
            .context("iperf3: no bits_per_second")?;
        let bytes = recv["bytes"].as_f64().context("iperf3: no bytes")?;
        if bytes <= 0.0 {
            bail!("iperf3 -P {streams}: no bytes received");
        }
        Ok(Tput {
            bps,
            bytes,
            cpu_all,
            cpu_server,
        })
    }
}

fn fig_echo(
    sys: System,
    ctx: &mut Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &Cfg,
    echo: u16,
    res: &mut Results,
) -> Result<()> {
    let path = systems::start(sys, echo, ctx)?;
    let port = path.port;
    rt.block_on(load::probe_echo(port, Duration::from_secs(15)))?;
    if want(cfg, "latency") {
        let low = rt.block_on(load::latency_fixed_rate(port, cfg.low_rate, cfg.dur))?;
        res.add("lat_low.p50_us", sys, low.p50_us);
        res.add("lat_low.p99_us", sys, low.p99_us);
        res.add("lat_low.p999_us", sys, low.p999_us);
        let high = rt.block_on(load::latency_load(port, cfg.high_conns, cfg.dur))?;
        res.add("lat_high.p50_us", sys, high.p50_us);
        res.add("lat_high.p99_us", sys, high.p99_us);
        res.add("lat_high.p999_us", sys, high.p999_us);
        res.add("lat_high.per_s", sys, high.per_s);
        println!(
            "    rtt low {} req/s: p50 {:.0} µs p99 {:.0} µs; high {} conns: p50 {:.0} µs p99 {:.0} µs, {:.0} req/s",
            cfg.low_rate,
            low.p50_us,
            low.p99_us,
            cfg.high_conns,
            high.p50_us,
            high.p99_us,
            high.per_s
        );
    }
    if want(cfg, "sessions") {
        let (per_s, failed) = rt.block_on(load::sessions(port, 8, cfg.dur))?;
        res.add("sessions.per_s", sys, per_s);
        res.add("sessions.failed", sys, failed as f64);
        println!("    sessions: {per_s:.0}/s, {failed} failed");
    }
    drop(path);
    Ok(())
}

fn fig_http(
    sys: System,
    ctx: &mut Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &Cfg,
    http: u16,
    res: &mut Results,
) -> Result<()> {
    let path = systems::start(sys, http, ctx)?;
    let port = path.port;
    rt.block_on(load::probe_http(port, Duration::from_secs(15)))?;
    let cpu0 = procs::cpu_seconds(&path.server);
    let use0 = cost::Usage::of(&path.server);
    let w = wrk(ctx, port, cfg.dur)?;
    let server_cpu = procs::cpu_seconds(&path.server) - cpu0;
    let use1 = cost::Usage::of(&path.server);
    res.add("http.rps", sys, w.rps);
    res.add("http.errors", sys, w.errors);
    println!(
        "    http (wrk -c32): {:.0} req/s, {} errors",
        w.rps, w.errors
    );
    if sys != System::Direct {
        let us = server_cpu * 1e6 / w.requests.max(1.0);
        res.add("http.server_cpu_us_per_req", sys, us);
        println!("    relay-role CPU {us:.1} µs per request");
        http_cost(sys, ctx, cfg, &path, (&use0, &use1, w.requests), res);
    }
    if sys != System::Direct {
        let server = path.server.clone();
        let all = path.forwarders();
        let (mut max_s, mut max_a) = (0u64, 0u64);
        let (per_s, failed) =
            rt.block_on(load::http_fixed_rate(port, 10, 1000, cfg.dur, || {
                max_s = max_s.max(procs::rss_kib(&server));
                max_a = max_a.max(procs::rss_kib(&all));
            }))?;
        res.add("rss.server_mib", sys, max_s as f64 / 1024.0);
        res.add("rss.all_mib", sys, max_a as f64 / 1024.0);
        res.add("rss.per_s", sys, per_s);
        println!(
            "    at {per_s:.0} req/s ({failed} failed): relay RSS {:.1} MiB, all forwarders {:.1} MiB",
            max_s as f64 / 1024.0,
            max_a as f64 / 1024.0
        );
    }
    drop(path);
    Ok(())
}

/// What one wrk run printed.
struct Wrk {
    rps: f64,
    requests: f64,
    /// Non-2xx answers and socket errors.
    errors: f64,
}

/// `wrk -t1 -c32` for `dur` against 127.0.0.1:`port`.
fn wrk(ctx: &Ctx, port: u16, dur: Duration) -> Result<Wrk> {
    let mut c = Command::new(&ctx.tools.wrk);
    c.args([
        "-t1",
        "-c32",
        &format!("-d{}s", secs(dur)),
        "--timeout",
        "3s",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let out = run_with_deadline("wrk", c, dur + Duration::from_secs(20))?;
    let first = |prefix: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    let rps =
        first("Requests/sec:").with_context(|| format!("wrk printed no Requests/sec: {out}"))?;
    let requests: f64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("wrk printed no request count: {out}"))?;
    let mut errors = 0f64;
    for l in out.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<f64>().unwrap_or(0.0);
        }
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    Ok(Wrk {
        rps,
        requests,
        errors,
    })
}

/// Figure 3c: the relay role's user and system CPU and context switches per request of
/// the timed wrk run (`usage`: before, after, requests), then its system calls per
/// request by kind over a second, strace-counted wrk run (shorter: strace slows it).
fn http_cost(
    sys: System,
    ctx: &Ctx,
    cfg: &Cfg,
    path: &PathUp,
    usage: (&cost::Usage, &cost::Usage, f64),
    res: &mut Results,
) {
    let (before, after, requests) = usage;
    let (user, system, switches) = after.per(before, requests);
    res.add("cost.user_us", sys, user);
    res.add("cost.system_us", sys, system);
    res.add("cost.switches", sys, switches);
    let out = std::env::temp_dir().join(format!("relay-bench-{}-strace", std::process::id()));
    let dur = cfg.dur.min(Duration::from_secs(2));
    let counted = cost::count_syscalls(&ctx.tools.strace, &path.server, &out, || {
        wrk(ctx, path.port, dur)
    });
    let _ = fs::remove_file(&out);
    match counted {
        Ok((calls, w)) => {
            let n = w.requests.max(1.0);
            let per = |names: &[&str]| calls.of(names) as f64 / n;
            res.add("cost.syscalls", sys, calls.total() as f64 / n);
            res.add("cost.reads", sys, per(cost::READS));
            res.add("cost.writes", sys, per(cost::WRITES));
            res.add("cost.waits", sys, per(cost::WAITS));
            res.add("cost.futex", sys, per(cost::FUTEX));
            println!(
                "    per request: user {user:.1} µs, system {system:.1} µs, {switches:.2} switches, {:.2} syscalls ({:.2} reads, {:.2} writes, {:.2} waits, {:.2} futex)",
                calls.total() as f64 / n,
                per(cost::READS),
                per(cost::WRITES),
                per(cost::WAITS),
                per(cost::FUTEX)
            );
        }
        Err(e) => {
            println!(
                "    per request: user {user:.1} µs, system {system:.1} µs, {switches:.2} switches; syscalls not counted: {e:#}"
            );
            res.note(sys, "cost", format!("system calls not counted: {e:#}"));
        }
    }
}

/// Waits until the fds of `roots` grew by `want` (or the deadline passes); returns growth.
fn wait_fds(roots: &[u32], base: usize, want: usize, deadline: Duration) -> usize {
    let start = Instant::now();
    let mut last = 0;
    while start.elapsed() < deadline {
        last = procs::fd_count(roots).saturating_sub(base);
        if last >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

/// File descriptors the bench and the relay keep for everything but the fleet.
const FD_SLACK: usize = 1000;

/// First logins in flight at once while a fleet logs in (the ramp).
const RAMP: usize = 256;

/// Our relay for figures 5 and 6: a fresh store with `dev`, `cli` and `n` fleet accounts,
/// `relay serve` with its metrics endpoint. `procs[0]` is `relay serve`.
struct FleetRelay {
    relay: PathBuf,
    serve: systems::RelayServe,
    /// Where the fleet connects (the plain listener).
    addr: SocketAddr,
    metrics: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    procs: Vec<Proc>,
}

impl FleetRelay {
    fn start(sys: System, ctx: &mut Ctx, dir: &Path, prefix: &str, n: usize) -> Result<Self> {
        if ctx.relay.tls {
            bail!("the fleet speaks plain TCP: run figures 5 and 6 without --relay-tls");
        }
        let relay = ctx.tools.relay.clone().context("no relay binary")?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let db = dir.join("relay.db");
        systems::relay_users(&relay, &db, dir)?;
        fleet::add_accounts(&db, prefix, n)?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let serve = systems::relay_serve(
            ctx,
            free_port()?,
            db.to_str().context("non-UTF-8 path")?,
            sys,
            &["--metrics".into(), metrics.to_string()],
        )?;
        let addr: SocketAddr = serve.listen.parse()?;
        let log = dir.join("log.txt");
        let mut procs = vec![Proc::spawn(
            "relay serve",
            serve.command(&relay, dir),
            &log,
        )?];
        serve.wait(&mut procs)?;
        wait_port(metrics.port(), Duration::from_secs(10), &mut procs)?;
        Ok(FleetRelay {
            relay,
            serve,
            addr,
            metrics,
            dir: dir.to_path_buf(),
            log,
            procs,
        })
    }
}

/// How long `n` terminals may take to log in: generous, the point is to fail, not hang.
fn login_deadline(n: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(n as u64 * 2)
}

/// Figure 5 for our relay: relay-proto terminals, one logged-in idle connection each, at
/// every N of --relay-idle-n.
fn fig_idle_relay(sys: System, ctx: &mut Ctx, cfg: &Cfg, res: &mut Results) -> Result<()> {
    for (k, &n) in cfg.relay_idle_n.iter().enumerate() {
        let dir = ctx.work.join(format!("idle-{sys}-{n}"));
        let mut fr = FleetRelay::start(sys, ctx, &dir, "idle", n)?;
        std::thread::sleep(Duration::from_millis(300));
        let pids = [fr.procs[0].pid()];
        let (pss0, anon0, sock0, slab0) = (
            procs::pss_kib(&pids),
            procs::rss_anon_kib(&pids),
            procs::sockstat_tcp_mem_kib(),
            procs::slab_kib(),
        );
        let fleet = Fleet::start(fr.addr, "idle", n, RAMP)?;
        let took = fleet::wait_logged_in(&fleet, fr.metrics, n, login_deadline(n))?;
        // Let the allocator and the kernel settle, then check nothing was dropped.
        std::thread::sleep(Duration::from_secs(1));
        fr.procs[0].check_alive()?;
        let held = fleet::metric(fr.metrics, "relay_logged_in_terminals")?;
        if held < n as f64 {
            bail!("only {held} of {n} terminals still logged in after the ramp");
        }
        let pss = procs::pss_kib(&pids).saturating_sub(pss0) as f64 / n as f64;
        let anon = procs::rss_anon_kib(&pids).saturating_sub(anon0) as f64 / n as f64;
        let sock = procs::sockstat_tcp_mem_kib().saturating_sub(sock0) as f64 / n as f64;
        let slab = procs::slab_kib().saturating_sub(slab0) as f64 / n as f64;
        let secs = took.as_secs_f64();
        res.add(&format!("idle_scale.{n}.pss"), sys, pss);
        res.add(&format!("idle_scale.{n}.anon"), sys, anon);
        res.add(&format!("idle_scale.{n}.sock"), sys, sock);
        res.add(&format!("idle_scale.{n}.slab"), sys, slab);
        res.add(&format!("idle_scale.{n}.login_s"), sys, secs);
        if k == 0 {
            res.add("idle.n", sys, n as f64);
            res.add("idle.pss_kib_per", sys, pss);
            res.add("idle.sock_kib_per", sys, sock);
        }
        println!(
            "    idle: {n} terminals logged in in {secs:.1} s ({:.0}/s, {} connect errors): relay +{pss:.2} KiB PSS, +{anon:.2} KiB RssAnon, kernel TCP buffers +{sock:.2} KiB, slab +{slab:.2} KiB per terminal",
            n as f64 / secs.max(1e-3),
            fleet.connect_errors()
        );
        drop(fleet);
        drop(fr);
    }
    Ok(())
}

/// Figure 6: `n` logged-in terminals plus the dev/cli path; `relay serve` is killed and
/// started again on the same store and ports. Seconds from the kill until the new process
/// listens, until every terminal is logged in again, and until a new session works.
fn fig_recovery(
    sys: System,
    ctx: &mut Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &Cfg,
    echo: u16,
    res: &mut Results,
) -> Result<()> {
    let n = cfg.recovery_n;
    let dir = ctx.work.join(format!("recovery-{sys}"));
    let mut fr = FleetRelay::start(sys, ctx, &dir, "rec", n)?;
    let (terminals, port) =
        systems::relay_terminals(ctx, &fr.relay, &fr.serve, echo, &fr.dir, &fr.log, true)?;
    let port = port.context("relay connect's port")?;
    fr.procs.extend(terminals);
    let fleet = Fleet::start(fr.addr, "rec", n, RAMP)?;
    fleet::wait_logged_in(&fleet, fr.metrics, n, login_deadline(n))?;
    rt.block_on(load::probe_echo(port, Duration::from_secs(15)))
        .context("session before the restart")?;
    // The fleet, dev and cli: what the restarted relay must show again.
    let before = fleet::metric(fr.metrics, "relay_logged_in_terminals")? as usize;

    let killed = Instant::now();
    drop(fr.procs.remove(0)); // SIGKILL, reaped
    let again = Proc::spawn(
        "relay serve (restarted)",
        fr.serve.command(&fr.relay, &fr.dir),
        &fr.log,
    )?;
    fr.procs.insert(0, again);
    fr.serve.wait(&mut fr.procs[..1])?;
    let listen_s = killed.elapsed().as_secs_f64();
    fleet::wait_logged_in(&fleet, fr.metrics, before, login_deadline(n))
        .context("after the restart")?;
    let relogin_s = killed.elapsed().as_secs_f64();
    rt.block_on(load::probe_echo(port, Duration::from_secs(30)))
        .context("session after the restart")?;
    let session_s = killed.elapsed().as_secs_f64();
    let logins = |method: &str| {
        fleet::metric(
            fr.metrics,
            &format!("relay_logins_total{{method=\"{method}\",outcome=\"ok\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (resumed, password) = (logins("resumption"), logins("password"));
    res.add("recovery.n", sys, n as f64);
    res.add("recovery.listen_s", sys, listen_s);
    res.add("recovery.relogin_s", sys, relogin_s);
    res.add("recovery.session_s", sys, session_s);
    res.add("recovery.resumed", sys, resumed);
    res.add("recovery.password", sys, password);
    println!(
        "    recovery: {n} terminals; after the kill: listening {listen_s:.2} s, all logged in {relogin_s:.2} s, new session {session_s:.2} s ({resumed} resumption / {password} password logins)"
    );
    drop(fleet);
    drop(fr);
    Ok(())
}

fn fig_idle(sys: System, ctx: &mut Ctx, cfg: &Cfg, echo: u16, res: &mut Results) -> Result<()> {
    let t = ctx.tools.clone();
    let dir = ctx.work.join(format!("idle-{sys}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let log = dir.join("log.txt");
    let settle = Duration::from_secs(if cfg.quick { 15 } else { 60 });
    let mut server: Vec<Proc> = Vec::new();
    let mut clients: Vec<Proc> = Vec::new();
    let (n, per_client_fds, base_pss, base_sock, base_fds);
    match sys {
        System::Rathole => {
            n = cfg.idle_n[0];
            let ctl = free_port()?;
            let mut publics = Vec::with_capacity(n);
            for _ in 0..n {
                publics.push(free_port()?);
            }
            let st = dir.join("server.toml");
            let ct = dir.join("client.toml");
            fs::write(&st, systems::rathole_server_toml(ctl, &publics))?;
            fs::write(&ct, systems::rathole_client_toml(ctl, &vec![echo; n]))?;
            let mut c = Command::new(&t.rathole);
            c.arg("-s").arg(&st);
            server.push(Proc::spawn("rathole server", c, &log)?);
            wait_port(ctl, Duration::from_secs(10), &mut server)?;
            std::thread::sleep(Duration::from_millis(300));
            let pids = [server[0].pid()];
            (base_pss, base_sock, base_fds) = (
                procs::pss_kib(&pids),
                procs::sockstat_tcp_mem_kib(),
                procs::fd_count(&pids),
            );
            let mut c = Command::new(&t.rathole);
            c.arg("-c").arg(&ct);
            clients.push(Proc::spawn("rathole client", c, &log)?);
            per_client_fds = 2; // control channel + public listener
        }
        System::Bore => {
            n = cfg.idle_n[1];
            server.push(systems::bore_server(&t, &log)?);
            wait_port(
                systems::BORE_CONTROL_PORT,
                Duration::from_secs(10),
                &mut server,
            )?;
            std::thread::sleep(Duration::from_millis(300));
            let pids = [server[0].pid()];
            (base_pss, base_sock, base_fds) = (
                procs::pss_kib(&pids),
                procs::sockstat_tcp_mem_kib(),
                procs::fd_count(&pids),
            );
            for _ in 0..n {
                clients.push(systems::bore_local(&t, echo, free_port()?, &log)?);
            }
            per_client_fds = 2;
        }
        System::Ssh => {
            n = cfg.idle_n[2];
            let (sshd, p) = systems::sshd_start(&t, &dir, n)?;
            server.push(sshd);
            wait_port(p, Duration::from_secs(10), &mut server)?;
            std::thread::sleep(Duration::from_millis(300));
            let pids = [server[0].pid()];
            (base_pss, base_sock, base_fds) = (
                procs::pss_kib(&pids),
                procs::sockstat_tcp_mem_kib(),
                procs::fd_count(&pids),
            );
            for _ in 0..n {
                clients.push(systems::ssh_reverse(
                    &t,
                    &dir,
                    p,
                    &[(free_port()?, echo)],
                    &log,
                )?);
                // sshd throttles bursts of unauthenticated connections (MaxStartups).
                std::thread::sleep(Duration::from_millis(20));
            }
            per_client_fds = 2;
        }
        System::Direct
        | System::Socat
        | System::SshChain
        | System::Relay
        | System::RelayPublished
        | System::RelayPublished1t
        | System::RelaySplice => {
            return Ok(());
        }
    }
    let pids = [server[0].pid()];
    let grown = wait_fds(&pids, base_fds, n * per_client_fds, settle);
    std::thread::sleep(Duration::from_millis(500));
    let pss = procs::pss_kib(&pids).saturating_sub(base_pss);
    let sock = procs::sockstat_tcp_mem_kib().saturating_sub(base_sock);
    let held = (grown / per_client_fds).min(n);
    // A peer client or two can lose its port race (bore and ssh ask for a remote port the
    // bench picked free a moment before): the figure is per client that held on. A larger
    // shortfall means the path is broken.
    if held * 100 < n * 95 {
        bail!("only {held} of {n} idle clients logged in within {settle:?}");
    }
    if held < n {
        println!("    idle: {held} of {n} clients held on; the figure is per client held");
    }
    let n = held.max(1);
    res.add("idle.n", sys, n as f64);
    res.add("idle.pss_kib_per", sys, pss as f64 / n as f64);
    res.add("idle.sock_kib_per", sys, sock as f64 / n as f64);
    println!(
        "    idle: {n} clients: relay +{pss} KiB PSS ({:.1} KiB each), kernel TCP +{sock} KiB",
        pss as f64 / n as f64
    );
    drop(clients);
    drop(server);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn render_report(
    cli: &Cli,
    cfg: &Cfg,
    systems: &[System],
    res: &Results,
    repeats: u32,
    fd_limit: u64,
    tools: &Tools,
    png: &Path,
    md: &Path,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: the relay and its peers, side by side\n");
    let _ = writeln!(
        s,
        "Generated by `relay-bench` ({} mode; {repeats} repeat(s); {} s per measurement). \
         Every figure is a median over the repeats, measured in the same run, on the same \
         machine, on the same loopback path shape. Ratios are this system's median divided by \
         rathole's and by direct TCP's. This machine is shared (2 cores, other builds may run), \
         so compare within a table, never across runs.\n",
        if cfg.quick { "--quick" } else { "full" },
        cfg.dur.as_secs_f64()
    );
    let png_rel = relative(png, md);
    let _ = writeln!(s, "![throughput and latency per system]({png_rel})\n");
    let _ = writeln!(
        s,
        "## Verdict\n\nThe issue's targets, then every figure where a peer beats us. Each missed target is \
         explained, from figure 3c's profile, in \"Why the missed targets are missed\" below.\n\n{}",
        report::verdict(res, systems)
    );
    let _ = writeln!(
        s,
        "## Machine\n\n{}- fd limit (raised by the bench): {fd_limit}\n",
        report::machine()
    );
    let _ = writeln!(s, "## Versions\n");
    let v = |p: &Path, a: &[&str]| procs::version_of(p, a);
    let _ = writeln!(
        s,
        "- socat: {}",
        v(&tools.socat, &["-V"])
            .replace(
                "socat by Gerhard Rieger and contributors - see www.dest-unreach.org",
                ""
            )
            .trim()
    );
    let _ = writeln!(s, "- rathole: {}", v(&tools.rathole, &["--version"]));
    let _ = writeln!(s, "- bore: {}", v(&tools.bore, &["--version"]));
    let _ = writeln!(s, "- OpenSSH: {}", v(&tools.ssh, &["-V"]));
    let _ = writeln!(s, "- iperf3: {}", v(&tools.iperf3, &["--version"]));
    let _ = writeln!(s, "- wrk: {}", v(&tools.wrk, &["-v"]));
    let _ = writeln!(
        s,
        "- relay: {}\n",
        tools
            .relay
            .as_ref()
            .map(|p| format!("{} ({})", p.display(), v(p, &["--version"])))
            .unwrap_or_else(|| "not available".into())
    );
    let _ = writeln!(s, "## Paths (hops)\n");
    let _ = writeln!(
        s,
        "| system | path | forwarding processes |\n|---|---|---:|"
    );
    for &sys in systems {
        let (p, h) = sys.hops();
        let _ = writeln!(s, "| {sys} | {p} | {h} |");
    }
    let _ = writeln!(
        s,
        "\nEvery program listens on 127.0.0.1 on its own port. rathole, bore and ssh have no \
         client-local side: the client program connects to the public port the relay opened \
         for the device, so their paths have one process fewer than ours (`relay connect` is \
         the client's local side). ssh encrypts (its default cipher); rathole, bore, socat and \
         our relay (unless `--relay-tls`) carry plain TCP.\n"
    );
    let _ = writeln!(s, "## Commands\n");
    let _ = writeln!(
        s,
        "```sh\nbash bench/run.sh {}    # installs the peers (bench/install.sh), builds bench + relay (release), runs\n```\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(
        s,
        "How each path is started (ports are picked free on 127.0.0.1 per run; SVC = the service):\n"
    );
    let _ = writeln!(s, "```sh");
    let _ = writeln!(
        s,
        "# socat\nsocat TCP-LISTEN:L,bind=127.0.0.1,reuseaddr,fork,backlog=1024 TCP:127.0.0.1:SVC"
    );
    let _ = writeln!(
        s,
        "# rathole (server.toml: [server] bind_addr=127.0.0.1:C, default_token; [server.services.svc0] bind_addr=127.0.0.1:L;\n#          client.toml: [client] remote_addr=127.0.0.1:C; [client.services.svc0] local_addr=127.0.0.1:SVC)\nrathole -s server.toml\nrathole -c client.toml"
    );
    let _ = writeln!(
        s,
        "# bore (its control port 7835 is fixed in bore-cli)\nbore server --bind-addr 127.0.0.1 --bind-tunnels 127.0.0.1 --min-port 1024\nbore local SVC --local-host 127.0.0.1 --to 127.0.0.1 --port L"
    );
    let _ = writeln!(
        s,
        "# ssh (own host key + authorized key in a temp dir; Port P, ListenAddress 127.0.0.1, UsePAM no)\n/usr/sbin/sshd -D -e -f sshd_config\nssh -F /dev/null -N -T -o BatchMode=yes -o ExitOnForwardFailure=yes -i id -p P -R 127.0.0.1:L:127.0.0.1:SVC USER@127.0.0.1"
    );
    let q = if !cli.relay_tls && cli.relay_serve_args.contains("{plain}") {
        "Q"
    } else {
        "P"
    };
    let sa_q = cli.relay_serve_args.replace("{plain}", "127.0.0.1:Q");
    let (sa, ta) = if cli.relay_tls {
        (String::new(), "--fingerprint FP".to_string())
    } else {
        (sa_q, cli.relay_terminal_args.clone())
    };
    let _ = writeln!(
        s,
        "# relay\necho PW | relay user add dev --db DIR/relay.db --password-stdin\necho PW | relay user add cli --db DIR/relay.db --password-stdin\nrelay serve --listen 127.0.0.1:P --db DIR/relay.db {sa}\nRELAY_PASSWORD=PW relay expose --server 127.0.0.1:{q} {ta} --user dev --service svc=127.0.0.1:SVC\nRELAY_PASSWORD=PW relay connect --server 127.0.0.1:{q} {ta} --user cli dev/svc --listen 127.0.0.1:L"
    );
    let _ = writeln!(
        s,
        "# figures 5 and 6: the store gets N accounts (one cheap argon2id PHC string, one SQL \
         transaction), then\nrelay serve --listen 127.0.0.1:P --db DIR/relay.db {sa} --metrics 127.0.0.1:M\n\
         # the bench's fleet: N x relay-proto Terminal (spare 1) from 127.0.1.1-16 to 127.0.0.1:{q}; \
         done when relay_logged_in_terminals at http://127.0.0.1:M/metrics reaches N\n\
         # figure 6: kill -KILL the relay serve; start the same command again"
    );
    let _ = writeln!(
        s,
        "# load\niperf3 -s -B 127.0.0.1 -p SVC   and   iperf3 -c 127.0.0.1 -p L -t D -P 1|8 -J\nwrk -t1 -c32 -dDs --timeout 3s http://127.0.0.1:L/\n```\n"
    );
    let _ = writeln!(
        s,
        "Latency, sessions, the 1,000 req/s HTTP load and the echo/HTTP services are the bench's \
         own (tokio, one thread each; HdrHistogram). Low rate: {} req/s on one connection; high \
         load: {} connections closed-loop.\n",
        cfg.low_rate, cfg.high_conns
    );
    let _ = writeln!(s, "## Figures\n\n{}", report::tables(res, systems));
    let _ = writeln!(s, "## Not measured here yet\n");
    for (n, why) in &res.idle_unmeasurable {
        let _ = writeln!(s, "- Figure 5 at N = {n}: {why}.");
    }
    let _ = writeln!(
        s,
        "- Figure 6 for the peers: only our relay is restarted under load."
    );
    if !systems.contains(&System::RelaySplice) {
        let _ = writeln!(
            s,
            "- Figure 7 needs `relay-splice` among the systems (it passes `{}` to `relay serve`).",
            cli.relay_splice_args
        );
    }
    s.push('\n');
    if !res.errors.is_empty() {
        let _ = writeln!(s, "## Failures in this run\n");
        for e in &res.errors {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
    s
}

fn relative(target: &Path, md: &Path) -> String {
    let t = fs::canonicalize(target.parent().unwrap_or(Path::new(".")))
        .map(|p| p.join(target.file_name().unwrap_or_default()))
        .unwrap_or_else(|_| target.to_path_buf());
    let base = md
        .parent()
        .and_then(|p| fs::canonicalize(p).ok())
        .unwrap_or_default();
    let tc: Vec<_> = t.components().collect();
    let bc: Vec<_> = base.components().collect();
    let common = tc.iter().zip(&bc).take_while(|(a, b)| a == b).count();
    let mut r = PathBuf::new();
    for _ in common..bc.len() {
        r.push("..");
    }
    for c in &tc[common..] {
        r.push(c);
    }
    r.display().to_string()
}

/// Hand-written sections of the report, carried over from the report being replaced:
/// why the missed targets are missed (read from this run's figures and profiles),
/// relay-host's in-process data path (`relay-host/benches/datapath.rs`) and relay serve's
/// worker threads and memory (two builds compared, /proc/PID/smaps read by hand).
fn kept_sections(md_path: &Path) -> String {
    const KEPT: [&str; 3] = [
        "\n## Why the missed targets are missed",
        "\n## In-process data path",
        "\n## relay serve's threads and memory",
    ];
    let Ok(old) = fs::read_to_string(md_path) else {
        return String::new();
    };
    let mut kept = String::new();
    for heading in KEPT {
        let Some(start) = old.find(heading) else {
            continue;
        };
        let rest = &old[start + 1..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 4);
        kept.push('\n');
        kept.push_str(rest[..end].trim_end());
        kept.push('\n');
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_sections_are_kept_and_generated_ones_are_not() {
        let md = std::env::temp_dir().join(format!("bench-kept-{}.md", std::process::id()));
        fs::write(
            &md,
            "# Benchmarks\n\n## Figures\n\ngenerated\n\n## In-process data path\n\nA\n\n\
             ## relay serve's threads and memory\n\nB\n\n## Why the missed targets are missed\n\nW\n",
        )
        .unwrap();
        let kept = kept_sections(&md);
        let _ = fs::remove_file(&md);
        assert_eq!(
            kept,
            "\n## Why the missed targets are missed\n\nW\n\n## In-process data path\n\nA\n\n\
             ## relay serve's threads and memory\n\nB\n"
        );
    }
}
