//! The `relay` command line: `serve`, `user …`, `expose`, `connect`, `online`.
//!
//! Every subcommand has `--help`; an error prints one line and exits non-zero (see
//! `main.rs`). Terminal commands take `RELAY_SERVER`, `RELAY_USER`, `RELAY_FINGERPRINT` and
//! `RELAY_CA` as flag defaults, and the password from `--password-file` or
//! `RELAY_PASSWORD` (never from a flag: command lines are visible to every local user).

use std::fmt;
use std::io::{IsTerminal, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Parser, Subcommand};
use rustls::pki_types::ServerName;

use crate::channel::{RelayKey, RelayLink};
use crate::config::{DEFAULT_DB, DEFAULT_PORT, ServeConfig};
use crate::store::{
    AccessRule, AccountName, AccountStore, MAX_PASSWORD_LEN, MIN_PASSWORD_CHARS, SqliteStore,
    postgres::{NodeInfo, PgStore},
};
use crate::tls::{Fingerprint, ServerTrust, client_config};

/// Relay: reach devices behind NAT through a relay server they connect out to.
#[derive(Debug, Parser)]
#[command(name = "relay", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log less: -q warnings and errors only, -qq errors only (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log more: -v debug, -vv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Cli {
    /// Parses `argv` with the client config file's chosen relay as the terminal commands'
    /// flag defaults ([`crate::relays`]); clap's own errors exit as usual.
    pub fn parse_with_client_config(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Self> {
        use clap::{CommandFactory, FromArgMatches};
        let file = match crate::relays::path() {
            Some(path) => crate::relays::ClientFile::load(&path)?,
            None => crate::relays::ClientFile::default(),
        };
        let cmd = crate::relays::with_defaults(Self::command(), &file, &argv)?;
        Ok(Self::from_arg_matches(&cmd.get_matches_from(argv)).unwrap_or_else(|e| e.exit()))
    }

    /// The log level: the command's own default, moved by `-q`/`-v`. Commands whose output
    /// is someone else's input (`connect --stdio` inside ssh, `online`, `user`) log only
    /// warnings by default; long-running ones (`serve`, `expose`, `connect --listen`) say
    /// what they are doing.
    pub fn log_level(&self) -> tracing::Level {
        use tracing::Level;
        let talkative = match &self.command {
            Command::Serve(_) | Command::Expose(_) => true,
            Command::Connect(c) => c.listen.is_some(),
            Command::User(_) | Command::Online(_) | Command::Completions { .. } | Command::Man => {
                false
            }
        };
        let levels = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ];
        let base = if talkative { 2 } else { 1 };
        let at = (base + usize::from(self.verbose)).saturating_sub(usize::from(self.quiet));
        levels[at.min(levels.len() - 1)]
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay server.
    Serve(ServeArgs),
    /// Manage the relay's accounts (works while the relay runs).
    User(UserArgs),
    /// Stay logged in and let other terminals reach local TCP services.
    Expose(ExposeArgs),
    /// Open sessions to another terminal: a local port forward, or stdin/stdout.
    Connect(ConnectArgs),
    /// List the user IDs logged in to the relay.
    Online(OnlineArgs),
    /// Print a shell completion script: `relay completions bash > /etc/bash_completion.d/relay`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `relay man > /usr/local/share/man/man1/relay.1`.
    Man,
}

/// `relay serve`: flags override the config file, which overrides the defaults.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file: the keys named below, plus [limits] (docs/relay-host-config.md).
    /// Relative paths in it are relative to its directory. SIGHUP reloads it.
    #[arg(long, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TLS listen address: PORT, HOST:PORT or [IPv6]:PORT (config key `listen`)
    /// [default: 0.0.0.0:7835].
    #[arg(long, value_name = "ADDR", value_parser = any_interface)]
    pub listen: Option<SocketAddr>,
    /// With --database: HOST:PORT where terminals reach this relay, which the other nodes
    /// name in their redirects (config key `advertise`) [default: the listen address;
    /// required when that is 0.0.0.0 or [::]].
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<ServerAddr>,
    /// Account store, relative to the current directory (config key `db`) [default:
    /// relay.db].
    #[arg(long, env = "RELAY_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Keep the accounts in this PostgreSQL database instead: postgres://USER:PASSWORD@HOST/DB
    /// (config key `database`). Relays that name the same database share accounts, access
    /// rules and resumption tokens; the certificate and channel keys stay beside --db.
    #[arg(long, env = "RELAY_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// PEM certificate chain, with --key (config key `cert`); without both, a self-signed
    /// certificate is generated beside the account store.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key, with --cert (config key `key`).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Serve Prometheus /metrics, /healthz and the operator dashboard on this address
    /// (config key `metrics`); PORT alone means 127.0.0.1:PORT.
    #[arg(long, value_name = "ADDR", value_parser = loopback)]
    pub metrics: Option<SocketAddr>,
    /// Also accept plain TCP (no TLS) on this address, for devices without TLS (config
    /// key `allow_plain`). Passwords and data cross it in clear.
    #[arg(long, value_name = "ADDR", value_parser = any_interface)]
    pub allow_plain: Option<SocketAddr>,
    /// Move payload between plain-TCP connections with splice(2) instead of one copy
    /// through user space (config key `splice`; measured slower on loopback).
    #[arg(long, conflicts_with = "no_splice")]
    pub splice: bool,
    /// Copy payload through user space (the default; overrides `splice = true`).
    #[arg(long)]
    pub no_splice: bool,
    /// Threads that run connections (config key `worker_threads`) [default: one per core].
    /// 1 runs everything on the main thread (tokio's current-thread scheduler).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

impl ServeArgs {
    /// The configuration: the file (if any), then these flags on top, validated.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let mut config = match &self.config {
            Some(path) => ServeConfig::load(path)?,
            None => ServeConfig::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if self.advertise.is_some() {
            config.advertise.clone_from(&self.advertise);
        }
        if let Some(db) = &self.db {
            config.db.clone_from(db);
        }
        if self.database.is_some() {
            config.database.clone_from(&self.database);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config.cert = Some(cert.clone());
            config.key = Some(key.clone());
        }
        if self.metrics.is_some() {
            config.metrics = self.metrics;
        }
        if self.allow_plain.is_some() {
            config.allow_plain = self.allow_plain;
        }
        if self.splice {
            config.splice = true;
        }
        if self.no_splice {
            config.splice = false;
        }
        if let Some(n) = self.worker_threads {
            config.worker_threads = Some(usize::from(n));
        }
        config.validate()?;
        Ok(config)
    }
}

/// `relay user`.
#[derive(Debug, Args)]
pub struct UserArgs {
    /// Account store. Without it: the `database` or `db` of --config, else ./relay.db if it
    /// exists.
    #[arg(long, env = "RELAY_DB", value_name = "PATH", global = true)]
    pub db: Option<PathBuf>,
    /// The accounts' PostgreSQL database (postgres://USER:PASSWORD@HOST/DB), as `relay serve
    /// --database` names it.
    #[arg(
        long,
        env = "RELAY_DATABASE",
        value_name = "URL",
        global = true,
        conflicts_with = "db"
    )]
    pub database: Option<String>,
    /// The relay's config file: its `db` is the account store.
    #[arg(long, env = "RELAY_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub action: UserCommand,
}

/// The `relay user` subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account (it may reach any account until `relay user allow` says otherwise).
    Add {
        /// Account name: 1-32 bytes, no whitespace, control characters or '/'.
        name: AccountName,
        /// Read the password from standard input (one trailing newline is removed) instead
        /// of prompting on the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete an account; its connections to a running relay close.
    Del {
        /// Account name.
        name: AccountName,
    },
    /// Change an account's password (applies to its next login).
    Passwd {
        /// Account name.
        name: AccountName,
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts, their creation time and whom they may reach.
    List {
        /// Print JSON: an array of {"name", "created", "may_reach"} ("any", or the names).
        #[arg(long)]
        json: bool,
    },
    /// Set which accounts an account may reach with a connection demand.
    #[command(group(ArgGroup::new("rule").required(true).args(["targets", "any", "none"])))]
    Allow {
        /// Account name.
        name: AccountName,
        /// Only these accounts (comma-separated).
        #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
        targets: Vec<AccountName>,
        /// Any account (the default for new accounts).
        #[arg(long)]
        any: bool,
        /// No account at all (it can still be reached, per the others' rules).
        #[arg(long)]
        none: bool,
    },
}

/// Flags every terminal command shares.
#[derive(Debug, Args)]
pub struct TerminalArgs {
    /// Relay address: HOST, HOST:PORT or [IPv6]:PORT (port 7835 when omitted). Several
    /// (repeat the flag, or a comma list) for relays sharing one database: the terminal
    /// uses the first, and moves to the next when it loses its relay or cannot reach it.
    #[arg(
        long,
        env = "RELAY_SERVER",
        value_name = "ADDR,...",
        value_delimiter = ',',
        required = true
    )]
    pub server: Vec<ServerAddr>,
    /// This terminal's user ID.
    #[arg(long, env = "RELAY_USER", value_name = "NAME")]
    pub user: AccountName,
    /// Read the password from FILE (one trailing newline is removed; the file must be
    /// mode 600 or stricter). Without this flag or --password-command the password comes
    /// from the RELAY_PASSWORD environment variable.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Run CMD with `sh -c` and take its standard output (one trailing newline removed) as
    /// the password, e.g. "pass show relay/laptop".
    #[arg(long, value_name = "CMD", conflicts_with = "password_file")]
    pub password_command: Option<String>,
    /// Take the defaults of these flags from relay NAME of the client config file
    /// ($XDG_CONFIG_HOME/relay/relays.toml); see docs/QUICKSTART.md.
    #[arg(long, env = "RELAY_NAME", value_name = "NAME")]
    pub relay: Option<String>,
    /// Trust the relay if its certificate chains to a CA in FILE (PEM). Without --ca or
    /// --fingerprint, the system's trust store is used.
    #[arg(
        long,
        env = "RELAY_CA",
        value_name = "FILE",
        conflicts_with = "fingerprint"
    )]
    pub ca: Option<PathBuf>,
    /// Trust exactly the relay certificate with this SHA-256 fingerprint (as `relay serve`
    /// prints it).
    #[arg(long, env = "RELAY_FINGERPRINT", value_name = "SHA256")]
    pub fingerprint: Option<Fingerprint>,
    /// Use the relay's Noise channel instead of TLS, pinning its channel key (base64 or
    /// hex, as `relay serve` prints it: the current or the next key). Needs no CA store.
    #[arg(
        long,
        env = "RELAY_KEY",
        value_name = "KEY",
        conflicts_with_all = ["ca", "fingerprint"]
    )]
    pub relay_key: Option<RelayKey>,
    /// Connect without TLS, to a relay's allow_plain listener. The password and the data
    /// cross the network in clear.
    #[arg(long, conflicts_with_all = ["ca", "fingerprint", "relay_key"])]
    pub plain: bool,
}

impl TerminalArgs {
    /// The password, from `--password-file` or `RELAY_PASSWORD`.
    pub fn password(&self) -> anyhow::Result<String> {
        let password = match (&self.password_file, &self.password_command) {
            (Some(path), _) => strip_one_newline(read_private(path)?),
            (None, Some(command)) => strip_one_newline(password_from(command)?),
            (None, None) => match std::env::var_os("RELAY_PASSWORD") {
                Some(value) => value.into_encoded_bytes(),
                None => bail!("no password: set RELAY_PASSWORD or use --password-file FILE"),
            },
        };
        checked_password(password)
    }

    /// How to trust the relay; `None` for `--plain`.
    pub fn trust(&self) -> Option<ServerTrust> {
        if self.plain {
            None
        } else if let Some(fp) = self.fingerprint {
            Some(ServerTrust::Pinned(fp))
        } else if let Some(ca) = &self.ca {
            Some(ServerTrust::CaFile(ca.clone()))
        } else {
            Some(ServerTrust::SystemRoots)
        }
    }

    /// Each relay address, in order, with how connections to it are protected (`None`
    /// for `--plain`).
    pub fn relays(&self) -> anyhow::Result<Vec<(ServerAddr, Option<RelayLink>)>> {
        let tls = match (self.relay_key, self.trust()) {
            (None, Some(trust)) => Some(client_config(&trust)?),
            _ => None,
        };
        let link = |server: &ServerAddr| -> anyhow::Result<Option<RelayLink>> {
            Ok(match (self.relay_key, &tls) {
                (Some(key), _) => Some(RelayLink::Channel(key)),
                (None, Some(config)) => Some(RelayLink::Tls(config.clone(), server.server_name()?)),
                (None, None) => None,
            })
        };
        self.server
            .iter()
            .map(|server| Ok((server.clone(), link(server)?)))
            .collect()
    }

    /// Resolves everything a terminal needs before it connects (password, TLS trust), so
    /// mistakes show before any network traffic.
    fn prepare(&self) -> anyhow::Result<()> {
        let _password = self.password()?;
        match self.relays()?.first() {
            Some((_, Some(_))) => {}
            _ => tracing::warn!(
                server = ?self.server,
                "--plain: the password and all data cross the network unencrypted"
            ),
        }
        Ok(())
    }
}

/// `relay expose`.
#[derive(Debug, Args)]
pub struct ExposeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub terminal: TerminalArgs,
    /// A local service others may open: NAME=HOST:PORT (repeat for more).
    #[arg(long = "service", value_name = "NAME=HOST:PORT", required = true)]
    pub services: Vec<ServiceSpec>,
    /// Idle connections kept open so the terminal stays reachable while sessions run.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub spare: u16,
    /// Accept demands only from these user IDs (comma-separated); default: anyone the
    /// relay lets through.
    #[arg(long, value_name = "USER,...", value_delimiter = ',')]
    pub allow: Vec<AccountName>,
}

/// `relay connect`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["listen", "stdio"])))]
pub struct ConnectArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub terminal: TerminalArgs,
    /// The terminal to reach, and optionally which of its services: TARGET[/SERVICE].
    pub target: TargetSpec,
    /// Accept local TCP connections here; each becomes one session (a port forward).
    /// PORT alone means 127.0.0.1:PORT.
    #[arg(long, value_name = "ADDR", value_parser = loopback)]
    pub listen: Option<SocketAddr>,
    /// One session on standard input and output (for ssh's ProxyCommand).
    #[arg(long)]
    pub stdio: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub patience: Patience,
}

/// `relay online`.
#[derive(Debug, Args)]
pub struct OnlineArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub terminal: TerminalArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub patience: Patience,
    /// Print a JSON array of user IDs instead of one a line.
    #[arg(long)]
    pub json: bool,
}

/// How long a command that does one thing waits for the relay.
#[derive(Debug, Args)]
pub struct Patience {
    /// Give up with an error if not logged in to the relay by then (ssh would otherwise
    /// wait forever on an unreachable relay): "5s", "1m".
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// A listen address as people type it: `PORT`, `HOST:PORT` (a name is resolved, first
/// address wins) or `[IPv6]:PORT`; `PORT` alone binds `ip`.
fn listen_addr(s: &str, ip: IpAddr) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = |why: String| format!("'{s}' is not PORT, HOST:PORT or [IPv6]:PORT ({why})");
    s.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no address".into()))
}

/// `PORT` alone binds every interface (a server's listener).
fn any_interface(s: &str) -> Result<SocketAddr, String> {
    listen_addr(s, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// `PORT` alone binds loopback (a local forward, the admin listener).
fn loopback(s: &str) -> Result<SocketAddr, String> {
    listen_addr(s, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

/// A relay address as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl ServerAddr {
    /// The name TLS verifies (and sends as SNI when it is a host name).
    pub fn server_name(&self) -> anyhow::Result<ServerName<'static>> {
        ServerName::try_from(self.host.clone())
            .with_context(|| format!("'{}' is not a valid TLS server name", self.host))
    }
}

impl FromStr for ServerAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not HOST, HOST:PORT or [IPv6]:PORT");
        if s.parse::<IpAddr>().is_ok() {
            return Ok(Self {
                host: s.to_owned(),
                port: DEFAULT_PORT,
            });
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (host, port)
        } else {
            match s.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => DEFAULT_PORT,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// Written as it is typed (the config file's `advertise`).
impl<'de> serde::Deserialize<'de> for ServerAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for ServerAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `NAME=HOST:PORT`: a local service `relay expose` offers under NAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The name requesters ask for (same rules as account names).
    pub name: String,
    /// Where the service listens, as HOST:PORT (resolved at each session).
    pub addr: String,
}

impl FromStr for ServiceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not NAME=HOST:PORT"))?;
        let name = service_name(name)?;
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("'{addr}' is not HOST:PORT"));
        }
        Ok(Self {
            name,
            addr: addr.to_owned(),
        })
    }
}

/// `TARGET[/SERVICE]`: whom `relay connect` reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// The target terminal's user ID.
    pub target: AccountName,
    /// The service asked for, if any.
    pub service: Option<String>,
}

impl FromStr for TargetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (target, service) = match s.split_once('/') {
            Some((t, svc)) => (t, Some(service_name(svc)?)),
            None => (s, None),
        };
        let target = AccountName::new(target).map_err(|e| format!("target '{target}': {e}"))?;
        Ok(Self { target, service })
    }
}

/// Service names follow the account name rules (printable, short, no '/').
fn service_name(name: &str) -> Result<String, String> {
    AccountName::new(name)
        .map(|n| n.as_str().to_owned())
        .map_err(|e| {
            format!(
                "service name '{name}': {}",
                e.to_string().replace("an account name", "it")
            )
        })
}

/// The standard output of `sh -c command`, which must succeed.
fn password_from(command: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("password command '{command}'"))?;
    if !out.status.success() {
        bail!("password command '{command}' failed ({})", out.status);
    }
    Ok(out.stdout)
}

/// Removes one trailing `\n` or `\r\n`, as `echo` and editors add one.
fn strip_one_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

/// A new password for `name`: from standard input with `--password-stdin`, otherwise typed
/// twice on the terminal.
fn new_password(from_stdin: bool, name: &AccountName) -> anyhow::Result<String> {
    let password = if from_stdin {
        let mut raw = Vec::new();
        std::io::stdin()
            .read_to_end(&mut raw)
            .context("reading the password from standard input")?;
        strip_one_newline(raw)
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("New password for {name}: "))?;
        let again = rpassword::prompt_password("Repeat it: ")?;
        if first != again {
            bail!("the two passwords differ; nothing changed");
        }
        first.into_bytes()
    } else {
        bail!("standard input is not a terminal: give the password with --password-stdin");
    };
    let password = checked_password(password)?;
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        bail!(
            "the password has {chars} character{}; at least {MIN_PASSWORD_CHARS} are required",
            if chars == 1 { "" } else { "s" }
        );
    }
    Ok(password)
}

/// The contents of a password file that only its owner can use: one that its group or
/// others may read or write is refused (its password is as good as public on a shared
/// host).
fn read_private(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("password file {}", path.display()))?;
    let mode = file
        .metadata()
        .with_context(|| format!("password file {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "password file {} is open to other users (mode {mode:o}); chmod 600 it",
            path.display()
        );
    }
    let mut raw = Vec::new();
    (&file)
        .read_to_end(&mut raw)
        .with_context(|| format!("password file {}", path.display()))?;
    Ok(raw)
}

/// A password as the protocol carries it: 1 to [`MAX_PASSWORD_LEN`] bytes of UTF-8.
fn checked_password(bytes: Vec<u8>) -> anyhow::Result<String> {
    let password =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("the password is not UTF-8"))?;
    if password.is_empty() {
        bail!("the password is empty");
    }
    if password.len() > MAX_PASSWORD_LEN {
        bail!("the password is longer than {MAX_PASSWORD_LEN} bytes");
    }
    Ok(password)
}

/// Where a command's accounts are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreAt {
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL database URL.
    Database(String),
}

impl StoreAt {
    /// Where `config` keeps them: its `database`, else its `db`.
    fn of(config: &ServeConfig) -> Self {
        match &config.database {
            Some(url) => Self::Database(url.clone()),
            None => Self::File(config.db.clone()),
        }
    }

    /// Opens (and creates, or migrates) the store.
    fn open(&self) -> anyhow::Result<Box<dyn AccountStore>> {
        Ok(match self {
            Self::File(path) => Box::new(SqliteStore::open(path)?),
            Self::Database(url) => Box::new(open_database(url)?),
        })
    }

    /// The SQLite file, if it is one and does not exist: only `user add` creates it.
    fn missing_file(&self) -> Option<&Path> {
        match self {
            Self::File(path) if !path.exists() => Some(path),
            _ => None,
        }
    }
}

fn open_database(url: &str) -> anyhow::Result<PgStore> {
    crate::config::check_database_url(url)?;
    Ok(PgStore::open(url)?)
}

/// Which account store a `relay user` command means: `--database`/`RELAY_DATABASE`, else
/// `--db`/`RELAY_DB`, else the `database` or `db` of `--config`/`RELAY_CONFIG`, else
/// `./relay.db` if it exists. Never a new empty SQLite file by accident: only `user add`
/// creates one, and only where it was named.
fn user_store(args: &UserArgs) -> anyhow::Result<StoreAt> {
    let named = match (&args.database, &args.db, &args.config) {
        (Some(url), ..) => return Ok(StoreAt::Database(url.clone())),
        (None, Some(db), _) => StoreAt::File(db.clone()),
        (None, None, Some(config)) => StoreAt::of(&ServeConfig::load(config)?),
        (None, None, None) => {
            if Path::new(DEFAULT_DB).exists() {
                return Ok(StoreAt::File(PathBuf::from(DEFAULT_DB)));
            }
            bail!(
                "which account store? give --db PATH (or set RELAY_DB), --database URL (or \
                 RELAY_DATABASE), or the relay's --config FILE (or RELAY_CONFIG); there is no \
                 {DEFAULT_DB} here"
            );
        }
    };
    // `add` creates the store; `list` of a store that does not exist lists nobody.
    let may_be_missing = matches!(
        args.action,
        UserCommand::Add { .. } | UserCommand::List { .. }
    );
    if let Some(db) = named.missing_file() {
        let dir = db.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            bail!(
                "account store {}: directory {} does not exist (No such file or directory); \
                 create it first: mkdir -p -m 0700 {}",
                db.display(),
                dir.display(),
                dir.display()
            );
        }
        if !may_be_missing {
            bail!(
                "no account store at {}; `relay user add NAME --db {}` creates one",
                db.display(),
                db.display()
            );
        }
    }
    Ok(named)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::User(args) => run_user(args),
        Command::Serve(args) => run_serve(&args),
        Command::Expose(args) => {
            args.terminal.prepare()?;
            let exposed = crate::client::Exposed {
                services: args.services.clone(),
                allow: args.allow.iter().map(|a| a.as_str().to_owned()).collect(),
            };
            let spare = u8::try_from(args.spare).unwrap_or(u8::MAX);
            crate::client::expose(&args.terminal, spare, exposed)
        }
        Command::Connect(args) => {
            args.terminal.prepare()?;
            let target = args.target.target.as_str();
            let service = args.target.service.as_deref();
            let patience = args.patience.timeout;
            match args.listen {
                Some(listen) => {
                    crate::client::connect_listen(&args.terminal, target, service, listen, patience)
                }
                None => crate::client::connect_stdio(&args.terminal, target, service, patience),
            }
        }
        Command::Online(args) => {
            args.terminal.prepare()?;
            let users = crate::client::online(&args.terminal, args.patience.timeout)?;
            match args.json {
                true => println!("{}", serde_json::to_string(&users)?),
                false => users.iter().for_each(|u| println!("{u}")),
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "relay", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            Ok(page.render(&mut std::io::stdout())?)
        }
    }
}

fn run_user(args: UserArgs) -> anyhow::Result<()> {
    let at = user_store(&args)?;
    match args.action {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            let store = at.open()?;
            // Fail before prompting if the name is taken.
            if store.exists(&name)? {
                bail!("account '{name}' already exists");
            }
            let password = new_password(password_stdin, &name)?;
            store.add(&name, &password)?;
            println!("added account '{name}'");
        }
        UserCommand::Del { name } => {
            at.open()?.delete(&name)?;
            println!("deleted account '{name}'");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let store = at.open()?;
            if !store.exists(&name)? {
                bail!("no account named '{name}'");
            }
            let password = new_password(password_stdin, &name)?;
            store.set_password(&name, &password)?;
            println!("changed the password of '{name}'");
        }
        UserCommand::List { json } => {
            let accounts = match at.missing_file() {
                None => at.open()?.list()?,
                Some(_) => Vec::new(),
            };
            if accounts.is_empty() {
                eprintln!("no accounts; add one with: relay user add NAME");
            }
            let rows = accounts.iter().map(|a| {
                let created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(a.created);
                (a, humantime::format_rfc3339_seconds(created).to_string())
            });
            if json {
                let rows: Vec<_> = rows
                    .map(|(a, created)| {
                        let may_reach = match &a.access.allow {
                            None => serde_json::json!("any"),
                            Some(names) => serde_json::json!(
                                names.iter().map(AccountName::as_str).collect::<Vec<_>>()
                            ),
                        };
                        serde_json::json!({"name": a.name.as_str(), "created": created, "may_reach": may_reach})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for (a, created) in rows {
                    println!("{}\tcreated {created}\tmay reach: {}", a.name, a.access);
                }
            }
        }
        UserCommand::Allow {
            name,
            targets,
            any,
            none,
        } => {
            let rule = if any {
                AccessRule::anyone()
            } else if none {
                AccessRule::only(Vec::new())
            } else {
                AccessRule::only(targets)
            };
            let store = at.open()?;
            store.set_access_rule(&name, &rule)?;
            println!("'{name}' may reach: {rule}");
            for target in rule.allow.iter().flatten() {
                if !store.exists(target)? {
                    eprintln!(
                        "warning: no account named '{target}' (yet); the rule counts once it exists"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Everything `relay serve` can do before the protocol core runs: configuration, account
/// store, certificate, listeners' warnings.
fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    if config.database.is_some() {
        // Before anything is opened: the other nodes would redirect terminals there.
        config.check_advertised()?;
    }
    let (store, database): (Arc<dyn AccountStore>, _) = match &config.database {
        Some(url) => {
            let pg = Arc::new(open_database(url)?);
            (pg.clone(), Some(pg))
        }
        None => (Arc::new(SqliteStore::open(&config.db)?), None),
    };
    if store.list()?.is_empty() {
        let (what, flag) = match &config.database {
            Some(_) => ("database", "--database URL".to_owned()),
            None => ("store", format!("--db {}", config.db.display())),
        };
        tracing::warn!(
            "the account {what} has no accounts; add one with: relay user add NAME {flag}"
        );
    }
    let identity = crate::reload::identity(&config)?;
    tracing::info!(fingerprint = %identity.fingerprint(), "relay certificate (terminals pin it with --fingerprint)");
    // With a database, this relay is a node of the cluster while it runs (relay.nodes).
    let node = NodeInfo {
        address: config.advertised(),
        fingerprint: identity.fingerprint().to_string(),
    };
    let membership = database
        .as_ref()
        .map(|pg| pg.join(node).map(Arc::new))
        .transpose()?;
    let presence = database.as_ref().map(|pg| pg.follow_presence());
    let channel = crate::channel::ChannelKeys::load_or_generate(&config.db)?;
    tracing::info!(channel_key = %channel.current(), channel_next = %channel.next(), "relay channel keys (devices and terminals pin one with --relay-key)");
    if let Some(plain) = config.allow_plain {
        tracing::warn!(%plain, "PLAIN TCP ENABLED: passwords and data on this listener are not encrypted");
    }
    let again = args.clone();
    let reloader =
        crate::reload::Reloader::new(config.clone(), &identity, Box::new(move || again.resolve()))?;
    let draining = membership.clone();
    let on_stop = Box::new(move || draining.iter().for_each(|m| m.drain()));
    crate::server::run(config, store, reloader, presence, on_stop)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_addresses() {
        let p = |s: &str| s.parse::<ServerAddr>();
        assert_eq!(
            p("relay.example").unwrap().to_string(),
            "relay.example:7835"
        );
        assert_eq!(p("relay.example:443").unwrap().port, 443);
        assert_eq!(p("127.0.0.1").unwrap().to_string(), "127.0.0.1:7835");
        assert_eq!(p("::1").unwrap().to_string(), "[::1]:7835");
        assert_eq!(p("[::1]:9").unwrap().host, "::1");
        assert_eq!(p("[::1]").unwrap().port, 7835);
        for bad in [
            "",
            ":7835",
            "host:port",
            "[::1",
            "[::1]x",
            "a b:1",
            "host:99999",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(p("relay.example").unwrap().server_name().is_ok());
    }

    #[test]
    fn services_and_targets() {
        let s: ServiceSpec = "ssh=127.0.0.1:22".parse().unwrap();
        assert_eq!((s.name.as_str(), s.addr.as_str()), ("ssh", "127.0.0.1:22"));
        assert_eq!(
            "web=[::1]:80".parse::<ServiceSpec>().unwrap().addr,
            "[::1]:80"
        );
        assert!("ssh".parse::<ServiceSpec>().is_err());
        assert!("ssh=host".parse::<ServiceSpec>().is_err());
        assert!("a b=h:1".parse::<ServiceSpec>().is_err());
        let t: TargetSpec = "cam-1/ssh".parse().unwrap();
        assert_eq!(t.target.as_str(), "cam-1");
        assert_eq!(t.service.as_deref(), Some("ssh"));
        assert_eq!("cam-1".parse::<TargetSpec>().unwrap().service, None);
        assert!("cam-1/".parse::<TargetSpec>().is_err());
        assert!("cam-1/a/b".parse::<TargetSpec>().is_err());
    }

    #[test]
    fn serve_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:1000\"\ndb = \"a.db\"\nworker_threads = 4\n\
             [limits]\nmax_sessions_per_account = 3\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "relay",
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:2000",
            "--worker-threads",
            "1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:2000");
        assert_eq!(c.worker_threads, Some(1));
        assert!(Cli::try_parse_from(["relay", "serve", "--worker-threads", "0"]).is_err());
        // A relative path in the file is beside the file.
        assert_eq!(c.db, dir.path().join("a.db"));
        assert_eq!(c.limits.max_sessions_per_account, 3);
    }

    #[test]
    fn terminal_flags() {
        let fp = Fingerprint([7; 32]).to_string();
        let cli = Cli::try_parse_from([
            "relay",
            "connect",
            "--server",
            "r.example",
            "--user",
            "me",
            "--fingerprint",
            &fp,
            "cam/ssh",
            "--stdio",
        ])
        .unwrap();
        let Command::Connect(args) = cli.command else {
            panic!("not connect")
        };
        assert_eq!(
            args.terminal.trust(),
            Some(ServerTrust::Pinned(Fingerprint([7; 32])))
        );
        // Several relays: the flag repeated and comma lists, in order.
        let cli = Cli::try_parse_from([
            "relay", "online", "--server", "a,b:9", "--server", "c", "--user", "me",
        ])
        .unwrap();
        let Command::Online(args) = cli.command else {
            panic!("not online")
        };
        let servers: Vec<String> = args.terminal.server.iter().map(|s| s.to_string()).collect();
        assert_eq!(servers, ["a:7835", "b:9", "c:7835"]);
        // --listen and --stdio exclude each other, and one is needed.
        for argv in [
            &["relay", "connect", "--server", "r", "--user", "me", "cam"][..],
            &[
                "relay",
                "connect",
                "--server",
                "r",
                "--user",
                "me",
                "cam",
                "--stdio",
                "--listen",
                "127.0.0.1:1",
            ],
            &["relay", "expose", "--server", "r", "--user", "me"],
            &[
                "relay", "online", "--server", "r", "--user", "me", "--plain", "--ca", "x",
            ],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn newline_stripping() {
        assert_eq!(strip_one_newline(b"pw\n".to_vec()), b"pw");
        assert_eq!(strip_one_newline(b"pw\r\n".to_vec()), b"pw");
        assert_eq!(strip_one_newline(b"pw\n\n".to_vec()), b"pw\n");
        assert_eq!(strip_one_newline(b"pw".to_vec()), b"pw");
    }
}
