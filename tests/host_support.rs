//! Helpers for the end-to-end tests of the `relay` binary: processes with captured logs,
//! a relay with its account store in a temporary directory, small TCP services.
//! Everything binds 127.0.0.1 and is stopped when its value is dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse";

/// The `relay` binary, built once per test run with the profile of the tests.
pub fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "relay-host", "--bin", "relay"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the relay binary");
        assert!(status.success(), "building the relay binary failed");
        dir.join("relay")
    })
    .clone()
}

#[path = "ports.rs"]
#[allow(clippy::duplicate_mod)]
// host_cluster also loads it through postgres_support.rs: the lanes keep the copies apart
mod ports;

/// A loopback port no other test server in this process is given (see tests/ports.rs).
pub fn free_port() -> u16 {
    ports::free_port(ports::Lane::Services)
}

/// `N` distinct free loopback ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// A child process whose standard error is collected; killed when dropped.
/// Polls `done` every 20 ms until it holds; fails with `fail()` after `timeout`.
fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool, fail: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{}", fail());
        thread::sleep(Duration::from_millis(20));
    }
}

pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stderr(Stdio::piped());
        if cmd.get_program() != "sh" {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        let tag = name.to_owned();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RELAY_TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until the log holds `needle` `n` times.
    pub fn wait_for_n(&self, needle: &str, n: usize, timeout: Duration) {
        let what = format!("no {n}x {needle:?}");
        poll_until(
            timeout,
            || self.count(needle) >= n,
            || self.failed(&what, timeout),
        );
    }

    /// The message of a wait that timed out, with the log.
    fn failed(&self, what: &str, timeout: Duration) -> String {
        format!(
            "{}: {what} within {timeout:?}; log:\n{}",
            self.name,
            self.log()
        )
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        self.wait_for_n(needle, 1, timeout);
    }

    /// Waits for the process to exit; returns (success, log).
    pub fn wait_exit(&mut self, timeout: Duration) -> (bool, String) {
        let mut status = None;
        let (log, name) = (self.log.clone(), &self.name);
        let child = &mut self.child;
        poll_until(
            timeout,
            || {
                status = child.try_wait().expect("try_wait");
                status.is_some()
            },
            || {
                let log = log.lock().unwrap();
                format!("{name}: did not exit within {timeout:?}; log:\n{log}")
            },
        );
        // The last lines of its log may still be on their way through the pipe.
        thread::sleep(Duration::from_millis(50));
        (status.is_some_and(|s| s.success()), self.log())
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay with its own store and ports.
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub tls_port: u16,
    pub plain_port: u16,
    pub fingerprint: String,
    /// The channel's current and next public keys, as `relay serve` prints them.
    pub channel_keys: [String; 2],
    pub proc: Option<Proc>,
    pub config: String,
}

impl Relay {
    /// A relay whose `[limits]` section is `limits` (TOML lines).
    pub fn start(limits: &str) -> Relay {
        Relay::start_with("", limits)
    }

    /// A relay whose config file has `top` (TOML lines before any section) and the
    /// `[limits]` section `limits`.
    pub fn start_with(top: &str, limits: &str) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!("{top}\n[limits]\n{limits}\n");
        let [tls_port, plain_port] = free_ports();
        let mut r = Relay {
            dir,
            tls_port,
            plain_port,
            fingerprint: String::new(),
            channel_keys: Default::default(),
            proc: None,
            config,
        };
        std::fs::write(r.dir.path().join("relay.toml"), &r.config).unwrap();
        r.launch();
        r
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("relay.db")
    }

    pub fn launch(&mut self) {
        let mut cmd = Command::new(relay_bin());
        cmd.arg("serve")
            .arg("--db")
            .arg(self.db())
            .arg("--config")
            .arg(self.dir.path().join("relay.toml"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.tls_port))
            .arg("--allow-plain")
            .arg(format!("127.0.0.1:{}", self.plain_port));
        let p = Proc::spawn("relay", cmd);
        p.wait_for_n("listening", 2, Duration::from_secs(20));
        let log = p.log();
        self.fingerprint = log
            .split("fingerprint=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("fingerprint in the relay log")
            .to_owned();
        self.channel_keys = ["channel_key=", "channel_next="].map(|field| {
            log.split(field)
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .expect("channel keys in the relay log")
                .to_owned()
        });
        self.proc = Some(p);
    }

    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("relay running")
    }

    /// Stops the relay with SIGTERM and checks it exits 0.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal("-TERM");
            let (ok, log) = p.wait_exit(Duration::from_secs(15));
            assert!(ok, "relay did not exit 0 on SIGTERM:\n{log}");
        }
    }

    pub fn add_user(&self, name: &str) {
        let mut child = Command::new(relay_bin())
            .args(["user", "add", name, "--password-stdin", "--db"])
            .arg(self.db())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("relay user add");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(PASSWORD.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "user add {name}");
    }

    pub fn user_cmd(&self, args: &[&str]) {
        let ok = Command::new(relay_bin())
            .arg("user")
            .args(args)
            .arg("--db")
            .arg(self.db())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "relay user {args:?}");
    }

    /// A terminal command (`expose`, `connect`, `online`) with the given arguments, over
    /// TLS pinned to the relay's certificate.
    pub fn terminal(&self, user: &str, args: &[&str]) -> Command {
        let server = format!("127.0.0.1:{}", self.tls_port);
        terminal_cmd(&[&server, "--fingerprint", &self.fingerprint], user, args)
    }

    /// The same over the plain listener.
    pub fn terminal_plain(&self, user: &str, args: &[&str]) -> Command {
        let server = format!("127.0.0.1:{}", self.plain_port);
        terminal_cmd(&[&server, "--plain"], user, args)
    }

    /// `relay online` as `user` (over the plain listener): the user IDs it printed, sorted.
    pub fn online_list(&self, user: &str) -> Vec<String> {
        let out = self
            .terminal_plain(user, &["online"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "relay online as {user}");
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// A terminal command as `user` over the device channel, pinning `key`.
    pub fn terminal_channel(&self, key: &str, user: &str, args: &[&str]) -> Command {
        let server = format!("127.0.0.1:{}", self.tls_port);
        terminal_cmd(&[&server, "--relay-key", key], user, args)
    }

    /// `relay expose` for `user`, waited until logged in.
    pub fn expose(&self, user: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["expose"];
        args.extend_from_slice(extra);
        let p = Proc::spawn(&format!("expose {user}"), self.terminal(user, &args));
        p.wait_for("logged in to the relay", Duration::from_secs(20));
        p
    }

    /// `relay connect --listen` for `user` to `target`; returns it and the local port.
    pub fn forward(&self, user: &str, target: &str) -> (Proc, u16) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let p = Proc::spawn(
            &format!("connect {user}"),
            self.terminal(user, &["connect", target, "--listen", &listen]),
        );
        p.wait_for("forwarding local connections", Duration::from_secs(20));
        (p, port)
    }
}

/// `relay SUBCOMMAND --server ADDR [how to reach it] --user USER [rest]`, password in
/// the environment. `args[0]` is the subcommand; `server` starts with the address.
fn terminal_cmd(server: &[&str], user: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.arg(args[0])
        .arg("--server")
        .args(server)
        .arg("--user")
        .arg(user)
        .args(&args[1..])
        .env("RELAY_PASSWORD", PASSWORD);
    cmd
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.proc.take();
    }
}

/// A TCP echo service on 127.0.0.1; returns its port. Runs until the test process ends.
pub fn echo_service() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// A minimal HTTP/1.1 server answering every GET with `body`; returns its port.
pub fn http_service(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let mut w = s;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// A service that reads until EOF and answers with the length and checksum it saw.
pub fn checksum_service() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut sum = Checksum::default();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sum.update(&buf[..n]),
                    }
                }
                let mut w = s;
                let _ = writeln!(w, "{} {:016x}", sum.len, sum.value());
            });
        }
    });
    port
}

/// An order-sensitive 64-bit checksum (FNV-1a over 8-byte words), cheap in debug builds.
#[derive(Default)]
pub struct Checksum {
    pub len: u64,
    h: u64,
    tail: Vec<u8>,
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.len == data.len() as u64 {
            self.h = 0xcbf2_9ce4_8422_2325;
        }
        if !self.tail.is_empty() {
            let need = 8 - self.tail.len();
            let take = need.min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..].try_into().unwrap());
                self.mix(w);
                self.tail.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(5);
    }
    pub fn value(&self) -> u64 {
        let mut h = self.h;
        for &b in &self.tail {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// Deterministic pseudo-random bytes (xorshift), to fill transfers.
pub fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Connects to 127.0.0.1:`port`, sends `data`, half-closes, returns everything read back.
pub fn round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    out
}

/// Runs `curl` on `url`; `None` with a loud message when curl is not installed.
pub fn curl(url: &str) -> Option<(bool, String)> {
    let out = match Command::new("curl")
        .args(["-sS", "--max-time", "20", url])
        .output()
    {
        Ok(o) => o,
        Err(_) => {
            eprintln!("!!! SKIPPED: curl is not installed (apt-get install curl)");
            return None;
        }
    };
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// An OpenSSH server on 127.0.0.1 for the current user, with a client key it accepts
/// (`dir/client_key`); stopped when dropped. `None` when sshd, ssh or ssh-keygen is
/// missing.
pub struct Sshd {
    pub port: u16,
    pub user: String,
    pub dir: tempfile::TempDir,
    _proc: Proc,
}

impl Sshd {
    pub fn start() -> Option<Sshd> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let tools = Command::new("ssh").arg("-V").output().is_ok()
            && Command::new("ssh-keygen").arg("-?").output().is_ok();
        if !tools {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .unwrap()
                .success();
            assert!(ok, "ssh-keygen");
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 PidFile {pid}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 PermitRootLogin prohibit-password\nLogLevel ERROR\n",
                hk = d.join("host_key").display(),
                ak = d.join("authorized_keys").display(),
                pid = d.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        // sshd run as root insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let mut cmd = Command::new(sshd);
        cmd.arg("-D").arg("-e").arg("-f").arg(d.join("sshd_config"));
        let proc = Proc::spawn("sshd", cmd);
        poll_until(
            Duration::from_secs(20),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            || "sshd did not start".into(),
        );
        Some(Sshd {
            port,
            user,
            dir,
            _proc: proc,
        })
    }

    /// `ssh` with the client key, no host key checks, batch mode.
    pub fn client(&self) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(self.dir.path().join("client_key"));
        ssh
    }
}
