//! Where the relay role's CPU goes per request (figure 3c): user and system time and
//! context switches (each one a wake-up: a thread went to sleep in epoll or a futex and
//! was woken again) from /proc, and the system calls by kind from `strace -c`.
//!
//! These are the profile behind the HTTP figures: a path that makes more system calls or
//! more wake-ups per request than another pays for them in system time, whatever its
//! user-space code does. `strace` slows the traced process (each call stops it twice), so
//! it runs in a separate short phase after the timed one, and only its *counts* per
//! request are reported, never its times.

use anyhow::{Context as _, Result, bail};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs;

/// CPU time and context switches of a set of process trees, at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User-space CPU seconds (utime + cutime).
    pub user: f64,
    /// Kernel CPU seconds on the processes' behalf (stime + cstime).
    pub system: f64,
    /// Voluntary and involuntary context switches of every live thread.
    pub switches: u64,
}

impl Usage {
    /// The usage of the trees at `roots` so far.
    pub fn of(roots: &[u32]) -> Usage {
        let tck = procs::clk_tck();
        let mut u = Usage::default();
        for pid in procs::tree(roots) {
            if let Some((user, system)) = procs::user_system_ticks(pid) {
                u.user += user as f64 / tck;
                u.system += system as f64 / tck;
            }
            u.switches += thread_switches(pid);
        }
        u
    }

    /// What was used between `before` and `self`, per `n` requests: (user µs, system µs,
    /// switches).
    pub fn per(&self, before: &Usage, n: f64) -> (f64, f64, f64) {
        let n = n.max(1.0);
        (
            (self.user - before.user) * 1e6 / n,
            (self.system - before.system) * 1e6 / n,
            self.switches.saturating_sub(before.switches) as f64 / n,
        )
    }
}

/// The status file of every live thread of `pid` (/proc/PID/task/*/status); `None` once
/// the process is gone.
fn thread_statuses(pid: u32) -> Option<impl Iterator<Item = String>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("status")).ok()),
    )
}

/// The first number after `key` in a status file.
fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Context switches of every thread of `pid`. Threads that ended since are not counted:
/// the relay roles keep their threads for the whole run.
fn thread_switches(pid: u32) -> u64 {
    thread_statuses(pid).map_or(0, |all| {
        all.map(|s| {
            ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
                .iter()
                .filter_map(|k| status_field(&s, k))
                .sum::<u64>()
        })
        .sum()
    })
}

/// System calls by kind (strace's names), counted over one phase.
#[derive(Debug, Default)]
pub struct Syscalls {
    pub calls: BTreeMap<String, u64>,
}

impl Syscalls {
    /// All calls.
    pub fn total(&self) -> u64 {
        self.calls.values().sum()
    }

    /// Calls whose name is one of `names`.
    pub fn of(&self, names: &[&str]) -> u64 {
        names.iter().filter_map(|n| self.calls.get(*n)).sum()
    }
}

/// Socket reads, socket writes and waits, as strace names them.
pub const READS: &[&str] = &["read", "readv", "recvfrom", "recvmsg", "recvmmsg"];
pub const WRITES: &[&str] = &["write", "writev", "sendto", "sendmsg", "sendmmsg", "splice"];
pub const WAITS: &[&str] = &[
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
];
pub const FUTEX: &[&str] = &["futex"];

/// Counts the system calls of every thread of the trees at `roots` while `load` runs.
/// Fails with the reason when strace cannot attach (not installed, ptrace not allowed).
pub fn count_syscalls<T>(
    strace: &Path,
    roots: &[u32],
    out: &Path,
    load: impl FnOnce() -> Result<T>,
) -> Result<(Syscalls, T)> {
    let pids = procs::tree(roots);
    let mut c = Command::new(strace);
    // -f with -p attaches every thread of each process (and follows new ones).
    c.args(["-c", "-f", "-qq", "-o"]).arg(out);
    for p in &pids {
        c.args(["-p", &p.to_string()]);
    }
    let _ = fs::remove_file(out);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", strace.display()))?;
    let attached = wait_traced(&pids, &mut child, Duration::from_secs(10));
    let loaded = attached.and_then(|()| load());
    // SIGINT: strace detaches and writes its summary.
    // SAFETY: kill has no memory-safety preconditions; the pid is our live child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    let value = loaded?;
    let text = fs::read_to_string(out).unwrap_or_default();
    let calls = parse_summary(&text);
    if calls.calls.is_empty() {
        bail!("strace printed no summary (exit {status}): {}", text.trim());
    }
    Ok((calls, value))
}

/// Waits until every thread of `pids` has a tracer (TracerPid ≠ 0 in its status): then
/// strace counts from the first call of the phase.
fn wait_traced(pids: &[u32], strace: &mut Child, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = strace.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = strace.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("strace exited ({status}) before attaching: {}", err.trim());
        }
        if pids.iter().all(|&p| all_traced(p)) {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("strace did not attach within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_traced(pid: u32) -> bool {
    // A process that is gone has nothing left to trace.
    thread_statuses(pid)
        .is_none_or(|mut all| all.all(|s| status_field(&s, "TracerPid:").is_some_and(|t| t != 0)))
}

/// Parses `strace -c`'s table: after the dashes, `% time  seconds  usecs/call  calls
/// [errors]  syscall`, up to the dashes before the total.
fn parse_summary(text: &str) -> Syscalls {
    let mut s = Syscalls::default();
    let rows = text
        .lines()
        .skip_while(|l| !l.starts_with("------"))
        .skip(1)
        .take_while(|l| !l.starts_with("------"));
    for l in rows {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(calls), Some(name)) = (f.get(3).and_then(|c| c.parse::<u64>().ok()), f.last())
        {
            *s.calls.entry((*name).to_string()).or_default() += calls;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_summary_rows_are_counted_with_and_without_errors() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                    ------ ----------- ----------- --------- --------- ----------------\n \
                    37.99    0.871623        1370       636        91 futex\n \
                    14.82    0.339936          13     25049           recvfrom\n \
                    12.49    0.286442          22     12515           writev\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    2.294087          43     38200        91 total\n";
        let s = parse_summary(text);
        assert_eq!(s.calls.get("futex"), Some(&636));
        assert_eq!(s.of(READS), 25049);
        assert_eq!(s.of(WRITES), 12515);
        assert_eq!(s.total(), 38200);
        assert!(!s.calls.contains_key("total"));
    }
}
