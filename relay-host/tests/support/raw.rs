//! An in-process relay (`relay_host::server::serve` on loopback) and raw terminals that
//! speak frames over plain TCP: shared by the data path benchmark (benches/datapath.rs)
//! and the data path tests (tests/datapath_locks.rs).

#![allow(dead_code)] // Each includer uses part of it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use relay_host::config::ServeConfig;
use relay_host::store::{AccountName, AccountStore, SqliteStore};
use relay_host::workers::Workers;
use relay_proto::frame::{self, Credential, Demand, Frame, Hello, Login, Parsed, caps};
use relay_proto::ident::{Password, ServiceName, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PASSWORD: &str = "datapath-bench";

#[path = "../../../tests/ports.rs"]
mod ports;

/// A loopback address no other server of this process was given (see tests/ports.rs).
pub fn free_port() -> Result<SocketAddr> {
    Ok(([127, 0, 0, 1], ports::free_port(ports::Lane::Services)).into())
}

/// A fresh store with accounts `r<i>` and `t<i>`. One cheap argon2id hash (8 KiB, one
/// pass) serves every row: the store checks with the parameters in the PHC string, so a
/// login costs microseconds and the setup stays out of the way.
pub fn make_store(db: &Path, pairs: usize) -> Result<SqliteStore> {
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

/// A relay served in this process, on the current tokio runtime, with accounts for
/// `pairs` pairs ([`make_store`]). Stops when dropped.
pub struct Relay {
    /// Its plain-TCP listener.
    pub plain: SocketAddr,
    /// Its `/metrics` listener.
    pub metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Relay {
    pub fn start(pairs: usize) -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("relay.db");
        let store = make_store(&db, pairs)?;
        let (plain, metrics) = (free_port()?, free_port()?);
        let config = ServeConfig {
            listen: free_port()?,
            db: db.clone(),
            allow_plain: Some(plain),
            metrics: Some(metrics),
            ..ServeConfig::default()
        };
        let identity = relay_host::reload::identity(&config)?;
        let again = config.clone();
        let reloader = relay_host::reload::Reloader::new(
            config.clone(),
            &identity,
            Box::new(move || Ok(again.clone())),
        )?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(relay_host::server::serve(
            config,
            Arc::new(store),
            reloader,
            None,
            // One runtime: the test's own.
            Arc::new(Workers::start(tokio::runtime::Handle::current(), 1, 4)?),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Relay {
            plain,
            metrics,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        })
    }

    /// Stops the relay and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }

    /// The value of metric `name` (a counter or gauge without labels) on `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let mut s = connect(self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("no {name} in\n{text}"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} is not a number"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A raw terminal connection: frames in, frames out.
pub struct Wire {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

// One value at a time, on the stack of a terminal's task: no need to box the frame.
#[allow(clippy::large_enum_variant)]
pub enum In {
    Control(Frame),
    Data(usize),
}

impl Wire {
    pub async fn login(relay: SocketAddr, user: &str, caps: u32) -> Result<Wire> {
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

    pub async fn send(&mut self, f: &Frame) -> Result<()> {
        let mut b = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut b).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.tcp.write_all(&b[..n]).await?;
        Ok(())
    }

    /// The next frame; for DATA its payload is consumed and its length returned.
    pub async fn next(&mut self) -> Result<In> {
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
    pub async fn next_data(&mut self) -> Result<usize> {
        loop {
            match self.next().await? {
                In::Data(n) => return Ok(n),
                In::Control(Frame::KeepAliveAck { .. }) => {}
                In::Control(f) => bail!("unexpected {f:?} in a session"),
            }
        }
    }
}

/// Connects to `addr`, where `serve` may still be starting: retried for 10 s.
pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) if Instant::now() > until => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Logs in `r<i>` (requester) and `t<i>` (reachable) and pairs them.
pub async fn open_session(relay: SocketAddr, i: usize) -> Result<(Wire, Wire)> {
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

pub fn data_frame(size: usize) -> Result<Vec<u8>> {
    let mut f = frame::data_header(size)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .to_vec();
    f.resize(frame::HEADER_LEN + size, 0x5A);
    Ok(f)
}
