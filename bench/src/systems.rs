//! The systems under test and how each one's path is built on loopback:
//! client program -> (its local side) -> relay -> (device side) -> service.

use crate::procs::{Proc, free_port, port_is_free, wait_port};
use anyhow::{Context, Result, bail};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum System {
    Direct,
    Socat,
    Rathole,
    Bore,
    Ssh,
    /// OpenSSH terminal to terminal: `ssh -L` on the client's side through sshd to an
    /// `ssh -R` on the device's side, the shape of our three-hop path.
    SshChain,
    Relay,
    /// Our relay's two-hop path: a published port of `relay serve` (`[[published]]` in its
    /// config) straight to `relay expose`, the shape of rathole, bore and `ssh -R`.
    RelayPublished,
    /// The same two-hop path with `relay serve --worker-threads 1` (issue 13 item 5: the
    /// server's figures with one worker thread next to one per core).
    #[value(name = "relay-published-1t")]
    RelayPublished1t,
    /// Our relay with its splice(2) data path switched on (figure 7; the default copies).
    RelaySplice,
}

impl System {
    pub const PEERS: [System; 6] = [
        System::Direct,
        System::Socat,
        System::Rathole,
        System::Bore,
        System::Ssh,
        System::SshChain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Socat => "socat",
            System::Rathole => "rathole",
            System::Bore => "bore",
            System::Ssh => "ssh",
            System::SshChain => "ssh-chain",
            System::Relay => "relay",
            System::RelayPublished => "relay-published",
            System::RelayPublished1t => "relay-published-1t",
            System::RelaySplice => "relay-splice",
        }
    }

    pub fn is_relay(self) -> bool {
        matches!(
            self,
            System::Relay | System::RelayPublished | System::RelayPublished1t | System::RelaySplice
        )
    }

    /// Our relay's two-hop paths: a published port of `relay serve`.
    pub fn is_published(self) -> bool {
        matches!(self, System::RelayPublished | System::RelayPublished1t)
    }

    /// The path, hop by hop, and the number of forwarding processes on it.
    pub fn hops(self) -> (&'static str, u32) {
        match self {
            System::Direct => ("client → service", 0),
            System::Socat => ("client → socat (fork per connection) → service", 1),
            System::Rathole => (
                "client → rathole server (public port) → rathole client → service",
                2,
            ),
            System::Bore => (
                "client → bore server (public port) → bore local → service",
                2,
            ),
            System::Ssh => (
                "client → sshd (-R listener, encrypted channel) → ssh -N -R → service",
                2,
            ),
            System::SshChain => (
                "client → ssh -N -L → sshd (-L session → its own -R listener) → ssh -N -R → service",
                3,
            ),
            System::Relay | System::RelaySplice => (
                "client → relay connect --listen → relay serve → relay expose → service",
                3,
            ),
            System::RelayPublished | System::RelayPublished1t => (
                "client → relay serve (published port) → relay expose → service",
                2,
            ),
        }
    }

    /// Paths with a forwarding process on the client's side as well as the device's
    /// (terminal to terminal): compared with each other, not with the two-hop peers.
    pub fn three_hops(self) -> bool {
        self.hops().1 == 3
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where every external program is.
#[derive(Debug, Clone)]
pub struct Tools {
    pub socat: PathBuf,
    pub iperf3: PathBuf,
    pub wrk: PathBuf,
    /// Counts the relay roles' system calls (figure 3c).
    pub strace: PathBuf,
    pub sshd: PathBuf,
    pub ssh: PathBuf,
    pub ssh_keygen: PathBuf,
    pub rathole: PathBuf,
    pub bore: PathBuf,
    pub relay: Option<PathBuf>,
}

fn which(name: &str, extra: &[&Path]) -> PathBuf {
    for d in extra {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    for d in ["/usr/sbin", "/usr/bin", "/sbin"] {
        let p = Path::new(d).join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// The bench crate's folder (bench/).
pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Tools {
    pub fn locate() -> Tools {
        // Where install.sh put rathole and bore (RELAY_BENCH_TOOLS, else bench/out/tools).
        let tools_bin = std::env::var_os("RELAY_BENCH_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| bench_dir().join("out/tools"))
            .join("bin");
        let t = [tools_bin.as_path()];
        let relay = std::env::var_os("RELAY_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let ws = bench_dir().join("..");
                let target = std::env::var_os("RELAY_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| ws.join("target"));
                Some(target.join("release/relay"))
            })
            .filter(|p| p.is_file());
        Tools {
            socat: which("socat", &[]),
            iperf3: which("iperf3", &[]),
            wrk: which("wrk", &[]),
            strace: which("strace", &[]),
            sshd: which("sshd", &[Path::new("/usr/sbin")]),
            ssh: which("ssh", &[]),
            ssh_keygen: which("ssh-keygen", &[]),
            rathole: which("rathole", &t),
            bore: which("bore", &t),
            relay,
        }
    }

    /// Why `sys` cannot run here, if it cannot.
    pub fn missing(&self, sys: System) -> Option<String> {
        let need: Vec<&Path> = match sys {
            System::Direct => vec![],
            System::Socat => vec![&self.socat],
            System::Rathole => vec![&self.rathole],
            System::Bore => vec![&self.bore],
            System::Ssh | System::SshChain => vec![&self.sshd, &self.ssh, &self.ssh_keygen],
            System::Relay
            | System::RelayPublished
            | System::RelayPublished1t
            | System::RelaySplice => match &self.relay {
                Some(p) => vec![p.as_path()],
                None => {
                    return Some(
                        "not available: no relay binary (set RELAY_BIN or build target/release/relay)"
                            .into(),
                    );
                }
            },
        };
        need.iter().find(|p| !p.is_file()).map(|p| {
            format!(
                "not available: {} not found (run bench/install.sh)",
                p.display()
            )
        })
    }
}

/// How our relay is started (its CLI is being written alongside this harness).
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// Extra `relay serve` flags: the explicit plain-TCP flag, unless `tls`.
    pub serve_args: Vec<String>,
    /// Extra flags of `relay expose` / `relay connect`: plain TCP, unless `tls`.
    pub terminal_args: Vec<String>,
    /// Extra `relay serve` flags for the relay-splice system (default `--splice`).
    pub splice_args: Vec<String>,
    /// Use TLS with the generated certificate and pin it with `--fingerprint`.
    pub tls: bool,
}

#[derive(Debug)]
pub struct Ctx {
    pub tools: Tools,
    pub work: PathBuf,
    pub relay: RelayOpts,
    seq: u32,
}

impl Ctx {
    pub fn new(tools: Tools, work: PathBuf, relay: RelayOpts) -> Result<Ctx> {
        fs::create_dir_all(&work)?;
        Ok(Ctx {
            tools,
            work,
            relay,
            seq: 0,
        })
    }

    fn dir(&mut self, sys: System) -> Result<PathBuf> {
        self.seq += 1;
        let d = self.work.join(format!("{}-{}", sys.name(), self.seq));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d)?;
        Ok(d)
    }
}

/// One running path. Dropping it stops every process of it (last started first).
#[derive(Debug)]
pub struct PathUp {
    pub system: System,
    /// Where the client program connects.
    pub port: u16,
    /// Every process of the path, in start order.
    pub procs: Vec<Proc>,
    /// The "relay" role (rathole server, bore server, sshd, socat, relay serve).
    pub server: Vec<u32>,
}

impl PathUp {
    /// Every forwarding process (CPU accounting).
    pub fn forwarders(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

impl Drop for PathUp {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

const READY: Duration = Duration::from_secs(15);

fn cmd(prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

fn run_ok(mut c: Command, input: Option<&str>) -> Result<()> {
    let prog = format!("{:?}", c.get_program());
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("run {prog}"))?;
    if let Some(i) = input
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin.write_all(i.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `sys`'s path in front of the service at 127.0.0.1:`target`.
pub fn start(sys: System, target: u16, ctx: &mut Ctx) -> Result<PathUp> {
    let dir = ctx.dir(sys)?;
    let log = dir.join("log.txt");
    let t = ctx.tools.clone();
    let mut up = PathUp {
        system: sys,
        port: target,
        procs: Vec::new(),
        server: Vec::new(),
    };
    match sys {
        System::Direct => {}
        System::Socat => {
            let l = free_port()?;
            let listen = format!("TCP-LISTEN:{l},bind=127.0.0.1,reuseaddr,fork,backlog=1024");
            let to = format!("TCP:127.0.0.1:{target}");
            up.procs
                .push(Proc::spawn("socat", cmd(&t.socat, &[&listen, &to]), &log)?);
            up.port = l;
        }
        System::Rathole => {
            let (ctl, l) = (free_port()?, free_port()?);
            let server = dir.join("server.toml");
            let client = dir.join("client.toml");
            fs::write(&server, rathole_server_toml(ctl, &[l]))?;
            fs::write(&client, rathole_client_toml(ctl, &[target]))?;
            let s = Proc::spawn(
                "rathole server",
                cmd(&t.rathole, &["-s", path_str(&server)?]),
                &log,
            )?;
            up.procs.push(s);
            wait_port(ctl, READY, &mut up.procs)?;
            up.procs.push(Proc::spawn(
                "rathole client",
                cmd(&t.rathole, &["-c", path_str(&client)?]),
                &log,
            )?);
            up.port = l;
        }
        System::Bore => {
            let s = bore_server(&t, &log)?;
            up.procs.push(s);
            wait_port(BORE_CONTROL_PORT, READY, &mut up.procs)?;
            let l = free_port()?;
            up.procs.push(bore_local(&t, target, l, &log)?);
            up.port = l;
        }
        System::Ssh => {
            let p = sshd_up(&t, &dir, &mut up)?;
            let l = free_port()?;
            up.procs
                .push(ssh_reverse(&t, &dir, p, &[(l, target)], &log)?);
            up.port = l;
        }
        System::SshChain => {
            let p = sshd_up(&t, &dir, &mut up)?;
            let public = free_port()?;
            up.procs
                .push(ssh_reverse(&t, &dir, p, &[(public, target)], &log)?);
            wait_port(public, READY, &mut up.procs)?;
            let l = free_port()?;
            up.procs.push(ssh_local(&t, &dir, p, &[(l, public)], &log)?);
            up.port = l;
        }
        System::Relay | System::RelayPublished | System::RelayPublished1t | System::RelaySplice => {
            let relay = t
                .relay
                .clone()
                .context("relay binary not available (RELAY_BIN)")?;
            let p = free_port()?;
            let db = dir.join("relay.db");
            relay_users(&relay, &db, &dir)?;
            let published = match sys.is_published() {
                true => Some(free_port()?),
                false => None,
            };
            let extra = match published {
                Some(port) => {
                    let cfg = dir.join("relay.toml");
                    fs::write(&cfg, published_toml(port))?;
                    vec!["--config".to_string(), path_str(&cfg)?.to_string()]
                }
                None => Vec::new(),
            };
            let serve = relay_serve(ctx, p, path_str(&db)?, sys, &extra)?;
            up.procs.push(Proc::spawn(
                "relay serve",
                serve.command(&relay, &dir),
                &log,
            )?);
            serve.wait(&mut up.procs)?;
            let (terminals, l) =
                relay_terminals(ctx, &relay, &serve, target, &dir, &log, published.is_none())?;
            up.procs.extend(terminals);
            up.port = published.or(l).context("no public port")?;
        }
    }
    if let Some(first) = up.procs.first() {
        up.server = vec![first.pid()];
    }
    wait_port(up.port, READY, &mut up.procs)
        .with_context(|| format!("{sys}: public port; log: {}", log.display()))?;
    Ok(up)
}

/// sshd of a path, started and listening: its port.
fn sshd_up(t: &Tools, dir: &Path, up: &mut PathUp) -> Result<u16> {
    let (sshd, p) = sshd_start(t, dir, 16)?;
    up.procs.push(sshd);
    wait_port(p, READY, &mut up.procs)?;
    Ok(p)
}

/// The two accounts of every relay path: `dev` (exposes the service) and `cli` (connects),
/// made with the relay's own CLI (full argon2 cost), which also creates the store.
pub fn relay_users(relay: &Path, db: &Path, dir: &Path) -> Result<()> {
    for user in ["dev", "cli"] {
        let mut c = cmd(
            relay,
            &[
                "user",
                "add",
                user,
                "--db",
                path_str(db)?,
                "--password-stdin",
            ],
        );
        c.current_dir(dir);
        run_ok(c, Some("bench-password\n")).with_context(|| format!("relay user add {user}"))?;
    }
    Ok(())
}

/// How `relay serve` is started: the same flags again after a restart (figure 6).
#[derive(Debug, Clone)]
pub struct RelayServe {
    pub args: Vec<String>,
    /// The TLS listener (127.0.0.1:P).
    pub tls: String,
    /// Where terminals connect: the plain listener, or the TLS one with `--relay-tls`.
    pub listen: String,
}

impl RelayServe {
    pub fn command(&self, relay: &Path, dir: &Path) -> Command {
        let mut c = Command::new(relay);
        c.args(&self.args).current_dir(dir);
        c
    }

    /// Waits until both listeners accept connections.
    pub fn wait(&self, procs: &mut [Proc]) -> Result<()> {
        for a in [&self.tls, &self.listen] {
            let port = a
                .rsplit(':')
                .next()
                .and_then(|x| x.parse::<u16>().ok())
                .with_context(|| format!("no port in {a}"))?;
            wait_port(port, READY, procs)?;
        }
        Ok(())
    }
}

/// `relay serve` with the TLS listener on 127.0.0.1:`tls_port` and `extra` flags. In plain
/// mode, `{plain}` in the serve args becomes a fresh 127.0.0.1 port (the relay's
/// `--allow-plain ADDR` listener) and terminals go there.
pub fn relay_serve(
    ctx: &Ctx,
    tls_port: u16,
    db: &str,
    sys: System,
    extra: &[String],
) -> Result<RelayServe> {
    let tls = format!("127.0.0.1:{tls_port}");
    let mut args: Vec<String> = ["serve", "--listen", &tls, "--db", db]
        .map(String::from)
        .to_vec();
    let mut listen = tls.clone();
    if !ctx.relay.tls {
        let mut plain = None;
        for a in &ctx.relay.serve_args {
            if a.contains("{plain}") {
                let addr = plain.get_or_insert(format!("127.0.0.1:{}", free_port()?));
                args.push(a.replace("{plain}", addr));
            } else {
                args.push(a.clone());
            }
        }
        if let Some(addr) = plain {
            listen = addr;
        }
    }
    match sys {
        System::RelaySplice => args.extend(ctx.relay.splice_args.iter().cloned()),
        System::RelayPublished1t => args.extend(["--worker-threads".into(), "1".into()]),
        _ => {}
    }
    args.extend(extra.iter().cloned());
    Ok(RelayServe { args, tls, listen })
}

/// The relay config of the two-hop path: 127.0.0.1:`port` published to dev's service,
/// open to loopback only, and the per-account limits raised (every published connection
/// counts against the relay's own requester, and the bench opens hundreds at once).
fn published_toml(port: u16) -> String {
    format!(
        "[[published]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"dev\"\nservice = \"svc\"\n\
         allow = [\"127.0.0.0/8\"]\n\n[limits]\nmax_connections_per_account = 20000\n\
         max_sessions_per_account = 20000\n"
    )
}

/// `relay expose` (user dev, service svc -> 127.0.0.1:`target`) and, when `connect`,
/// `relay connect` (user cli, dev/svc, listening on a fresh port), started against
/// `serve`. Returns them and the port the client program connects to (`relay connect`'s).
pub fn relay_terminals(
    ctx: &Ctx,
    relay: &Path,
    serve: &RelayServe,
    target: u16,
    dir: &Path,
    log: &Path,
    connect: bool,
) -> Result<(Vec<Proc>, Option<u16>)> {
    let mut term_args: Vec<String> = vec!["--server".into(), serve.listen.clone()];
    if ctx.relay.tls {
        let fp = relay_fingerprint(log)?;
        term_args.extend(["--fingerprint".into(), fp]);
    } else {
        term_args.extend(ctx.relay.terminal_args.iter().cloned());
    }
    let svc = format!("svc=127.0.0.1:{target}");
    let mut expose = cmd(relay, &["expose"]);
    expose
        .args(&term_args)
        .args(["--user", "dev", "--service", &svc])
        .env("RELAY_PASSWORD", "bench-password")
        .current_dir(dir);
    let mut procs = vec![Proc::spawn("relay expose", expose, log)?];
    if !connect {
        return Ok((procs, None));
    }
    let l = free_port()?;
    let l_addr = format!("127.0.0.1:{l}");
    let mut connect = cmd(relay, &["connect"]);
    connect
        .args(&term_args)
        .args(["--user", "cli", "dev/svc", "--listen", &l_addr])
        .env("RELAY_PASSWORD", "bench-password")
        .current_dir(dir);
    procs.push(Proc::spawn("relay connect", connect, log)?);
    Ok((procs, Some(l)))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// bore's control port is fixed in bore-cli (no flag): 7835, which is also our relay's
/// default port. The bench gives our relay another port; bore gets 7835 on 127.0.0.1.
pub const BORE_CONTROL_PORT: u16 = 7835;

pub fn bore_server(t: &Tools, log: &Path) -> Result<Proc> {
    if !port_is_free(BORE_CONTROL_PORT) {
        bail!(
            "bore: its control port 127.0.0.1:{BORE_CONTROL_PORT} (fixed in bore-cli) is taken by another program"
        );
    }
    Proc::spawn(
        "bore server",
        cmd(
            &t.bore,
            &[
                "server",
                "--bind-addr",
                "127.0.0.1",
                "--bind-tunnels",
                "127.0.0.1",
                "--min-port",
                "1024",
            ],
        ),
        log,
    )
}

pub fn bore_local(t: &Tools, target: u16, public: u16, log: &Path) -> Result<Proc> {
    Proc::spawn(
        "bore local",
        cmd(
            &t.bore,
            &[
                "local",
                &target.to_string(),
                "--local-host",
                "127.0.0.1",
                "--to",
                "127.0.0.1",
                "--port",
                &public.to_string(),
            ],
        ),
        log,
    )
}

pub fn rathole_server_toml(ctl: u16, publics: &[u16]) -> String {
    let mut s = format!("[server]\nbind_addr = \"127.0.0.1:{ctl}\"\ndefault_token = \"bench\"\n\n");
    for (i, p) in publics.iter().enumerate() {
        s.push_str(&format!(
            "[server.services.svc{i}]\nbind_addr = \"127.0.0.1:{p}\"\n\n"
        ));
    }
    s
}

pub fn rathole_client_toml(ctl: u16, targets: &[u16]) -> String {
    let mut s =
        format!("[client]\nremote_addr = \"127.0.0.1:{ctl}\"\ndefault_token = \"bench\"\n\n");
    for (i, t) in targets.iter().enumerate() {
        s.push_str(&format!(
            "[client.services.svc{i}]\nlocal_addr = \"127.0.0.1:{t}\"\n\n"
        ));
    }
    s
}

fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// Host key, client key and authorized_keys in `dir/keys` (made once per dir).
fn ssh_keys(t: &Tools, dir: &Path) -> Result<PathBuf> {
    let keys = dir.join("keys");
    if keys.join("id").is_file() {
        return Ok(keys);
    }
    fs::create_dir_all(&keys)?;
    for name in ["host", "id"] {
        let f = keys.join(name);
        run_ok(
            cmd(
                &t.ssh_keygen,
                &["-q", "-t", "ed25519", "-N", "", "-f", path_str(&f)?],
            ),
            None,
        )?;
    }
    fs::copy(keys.join("id.pub"), keys.join("authorized_keys"))?;
    Ok(keys)
}

/// sshd on a fresh loopback port with its own host key; `-D` keeps it in the foreground.
pub fn sshd_start(t: &Tools, dir: &Path, max_sessions: usize) -> Result<(Proc, u16)> {
    let keys = ssh_keys(t, dir)?;
    let p = free_port()?;
    // sshd's privilege separation directory (Debian's package creates it at boot only).
    let _ = fs::create_dir_all("/run/sshd");
    let cfg = dir.join("sshd_config");
    let m = max_sessions.max(10) * 2;
    fs::write(
        &cfg,
        format!(
            "Port {p}\nListenAddress 127.0.0.1\nHostKey {k}/host\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {k}/authorized_keys\nStrictModes no\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nGatewayPorts no\n\
             UseDNS no\nLogLevel ERROR\nMaxStartups {m}:30:{m2}\nMaxSessions {m}\n",
            k = keys.display(),
            d = dir.display(),
            m2 = m * 2,
        ),
    )?;
    let log = dir.join("sshd.log");
    let sshd = Proc::spawn(
        "sshd",
        cmd(&t.sshd, &["-D", "-e", "-f", path_str(&cfg)?]),
        &log,
    )?;
    Ok((sshd, p))
}

/// `ssh -N -R` from the device side: each (public, target) pair is one reverse tunnel.
pub fn ssh_reverse(
    t: &Tools,
    dir: &Path,
    sshd_port: u16,
    fwds: &[(u16, u16)],
    log: &Path,
) -> Result<Proc> {
    ssh_forward(t, dir, sshd_port, "-R", fwds, log)
}

/// `ssh -N -L` from the client's side: each (local, remote) pair is one local forward,
/// whose far end sshd opens on 127.0.0.1.
pub fn ssh_local(
    t: &Tools,
    dir: &Path,
    sshd_port: u16,
    fwds: &[(u16, u16)],
    log: &Path,
) -> Result<Proc> {
    ssh_forward(t, dir, sshd_port, "-L", fwds, log)
}

/// `ssh -N` with one `flag` (`-R` or `-L`) per (listen, to) pair, key-only, no prompts.
fn ssh_forward(
    t: &Tools,
    dir: &Path,
    sshd_port: u16,
    flag: &str,
    fwds: &[(u16, u16)],
    log: &Path,
) -> Result<Proc> {
    let keys = ssh_keys(t, dir)?;
    let mut c = Command::new(&t.ssh);
    c.args(["-F", "/dev/null", "-N", "-T"])
        .args(["-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "ExitOnForwardFailure=yes"])
        .args(["-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(keys.join("id"))
        .args(["-p", &sshd_port.to_string()]);
    for (listen, to) in fwds {
        c.arg(flag)
            .arg(format!("127.0.0.1:{listen}:127.0.0.1:{to}"));
    }
    c.arg(format!("{}@127.0.0.1", current_user()));
    Proc::spawn(if flag == "-R" { "ssh -R" } else { "ssh -L" }, c, log)
}

/// The SHA-256 fingerprint `relay serve` prints on start: the first run of 64 hex digits
/// (colons allowed between byte pairs) in its log.
fn relay_fingerprint(log: &Path) -> Result<String> {
    for _ in 0..100 {
        let s = fs::read_to_string(log).unwrap_or_default();
        for line in s
            .lines()
            .filter(|l| l.to_lowercase().contains("fingerprint"))
        {
            for word in line.split(|c: char| !(c.is_ascii_hexdigit() || c == ':')) {
                let hex: String = word.chars().filter(|c| *c != ':').collect();
                if hex.len() == 64 {
                    return Ok(word.to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "no SHA-256 fingerprint in relay serve's log {}",
        log.display()
    )
}
