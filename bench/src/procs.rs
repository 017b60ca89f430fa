//! Child processes that die with the benchmark, and what /proc says about them.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed (with its process group) when dropped, also on panic.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd` in its own process group, stdout/stderr to `log` (appended).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure only calls async-signal-safe functions (setpgid, prctl).
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                // If the benchmark dies without unwinding (SIGKILL), take the child along.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name}: {:?}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early ({st})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain syscalls on our own child's process group / pid.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

#[path = "../../tests/ports.rs"]
mod ports;

/// A free TCP port on 127.0.0.1, never one this run handed out before (bound and
/// released ports from `bind(0)` come back at once: see tests/ports.rs).
pub fn free_port() -> Result<u16> {
    Ok(ports::free_port(ports::Lane::Services))
}

/// Polls until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_port(port: u16, timeout: Duration, procs: &mut [Proc]) -> Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if start.elapsed() > timeout {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when nothing listens on 127.0.0.1:port.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(100),
        )
        .is_err()
}

/// Clock ticks per second of /proc/PID/stat's times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (ppid, [utime, stime, cutime, cstime] in ticks) of one process.
fn stat(pid: u32) -> Option<(u32, [u64; 4])> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after the last ')' are plain.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid = field 4; utime..cstime = fields 14..17.
    let ppid = f.get(1)?.parse().ok()?;
    let mut t = [0u64; 4];
    for (i, v) in t.iter_mut().enumerate() {
        *v = f.get(11 + i)?.parse().ok()?;
    }
    Some((ppid, t))
}

/// (user, system) ticks of one process, its reaped children's included.
pub fn user_system_ticks(pid: u32) -> Option<(u64, u64)> {
    stat(pid).map(|(_, [u, s, cu, cs])| (u + cu, s + cs))
}

/// The given processes and all their live descendants.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some((ppid, _)) = stat(pid)
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        if out.contains(&p) || out.len() > 100_000 {
            continue;
        }
        out.push(p);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    out
}

/// CPU seconds (user+system, including reaped children) used so far by the trees at `roots`.
pub fn cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = tree(roots)
        .iter()
        .filter_map(|&p| stat(p))
        .map(|(_, t)| t.iter().sum::<u64>())
        .sum();
    ticks as f64 / clk_tck()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let path = if key == "Pss:" {
        format!("/proc/{pid}/smaps_rollup")
    } else {
        format!("/proc/{pid}/status")
    };
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Sum of VmRSS (KiB) over the trees at `roots`.
pub fn rss_kib(roots: &[u32]) -> u64 {
    tree(roots).iter().map(|&p| status_kib(p, "VmRSS:")).sum()
}

/// Sum of RssAnon (KiB: private anonymous pages, i.e. heap and stacks) over the trees at
/// `roots`.
pub fn rss_anon_kib(roots: &[u32]) -> u64 {
    tree(roots).iter().map(|&p| status_kib(p, "RssAnon:")).sum()
}

/// Sum of PSS (KiB) over the trees at `roots`: shared pages split among sharers, so a
/// forking server (sshd) is not counted once per child.
pub fn pss_kib(roots: &[u32]) -> u64 {
    tree(roots).iter().map(|&p| status_kib(p, "Pss:")).sum()
}

/// Number of open file descriptors over the trees at `roots`.
pub fn fd_count(roots: &[u32]) -> usize {
    tree(roots)
        .iter()
        .filter_map(|p| fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum()
}

/// Kernel TCP socket memory in KiB (/proc/net/sockstat "TCP: ... mem N", N in pages).
pub fn sockstat_tcp_mem_kib() -> u64 {
    let s = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages: u64 = s
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "mem")?;
            f.get(i + 1)?.parse().ok()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page / 1024
}

/// Kernel slab memory in KiB (/proc/meminfo "Slab"): socket, inode, file and epoll objects
/// live there, which sockstat's buffer pages do not count. Machine-wide, so only large
/// differences mean anything.
pub fn slab_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Raises RLIMIT_NOFILE (children inherit it) to at least `want` where allowed (root may
/// raise the hard limit up to fs.nr_open), else to the hard limit. Returns the soft limit.
pub fn raise_fd_limit(want: u64) -> u64 {
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit for the duration of every call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let target = want.min(nr_open);
        if r.rlim_max < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: target,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return target;
            }
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// First line of `prog args` output (stdout or stderr), for version strings.
pub fn version_of(prog: &Path, args: &[&str]) -> String {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            // Prefer a line that names a version (socat and rathole print a banner first).
            lines
                .iter()
                .find(|l| {
                    l.to_lowercase().contains("version") && l.chars().any(|c| c.is_ascii_digit())
                })
                .or(lines.first())
                .copied()
                .unwrap_or("?")
                .to_string()
        }
        Err(_) => "not found".to_string(),
    }
}
