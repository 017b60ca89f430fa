//! A real PostgreSQL server for tests, from Debian's `postgresql` package (.ci/install):
//! `initdb` in a temporary directory, `fsync=off`, listening on a free loopback port only,
//! stopped (and its directory removed) when the value is dropped. Tests that need it FAIL
//! when PostgreSQL is missing; they never skip.
//!
//! `initdb` refuses to run as root, and CI runs as root: there the server's files belong
//! to the `postgres` user (created by the package) and its programs run as that user
//! through `runuser`. Connections use `trust` authentication, which is safe here: the
//! server listens on 127.0.0.1 and on a socket in its own 0700 directory, for the life of
//! one test.
//!
//! Shared by relay-host's unit tests (`#[path]` from relay-host/src/lib.rs) and the
//! end-to-end tests here, so there is one harness; it uses std and tempfile only.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The server's superuser, who owns the test databases.
pub const SUPERUSER: &str = "postgres";

/// A running PostgreSQL server; stopped when dropped.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` user when we are root and must run as it.
    run_as: Option<(u32, u32)>,
}

impl Postgres {
    /// Initialises and starts a server. Panics (failing the test) with the reason when
    /// PostgreSQL is not installed or does not start.
    pub fn start() -> Self {
        let bin = bindir();
        let run_as = match is_root() {
            true => Some(postgres_user()),
            false => None,
        };
        let dir = tempfile::Builder::new()
            .prefix("relay-pg-")
            .tempdir()
            .expect("temporary directory for PostgreSQL");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("giving the PostgreSQL directory to the postgres user");
        }
        let mut pg = Self {
            dir,
            bin,
            port: 0,
            run_as,
        };
        let data = pg.data();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                data.to_str().expect("UTF-8 temporary path"),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        // A port found free may be taken before the server binds it: try a few.
        for attempt in 1..=3 {
            pg.port = free_port();
            let options = format!(
                "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                pg.port,
                pg.dir.path().display()
            );
            let log = pg.dir.path().join("server.log");
            let out = pg.run(
                "pg_ctl",
                &[
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    data.to_str().expect("UTF-8 path"),
                    "-l",
                    log.to_str().expect("UTF-8 path"),
                    "-o",
                    &options,
                ],
            );
            if out.status.success() {
                return pg;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                attempt < 3 && log.contains("could not bind"),
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        unreachable!("the loop returns or fails")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's main process id (for tests that pause or kill it).
    pub fn pid(&self) -> u32 {
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("postmaster.pid of a running server");
        pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid on the first line of postmaster.pid")
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs `sql` in database `db` with psql and returns its unaligned, tuples-only output.
    /// Panics with psql's message if it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(db),
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD")
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 from psql")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the server's programs, as the postgres user when we are root.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", SUPERUSER, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        // The programs change to no directory of their own: give them one they may read.
        cmd.args(args).current_dir(self.dir.path());
        cmd.output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
    }

    fn run_ok(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        // Immediate: the test is over, nothing in the database is kept.
        let _ = self.run(
            "pg_ctl",
            &[
                "stop",
                "-w",
                "-m",
                "immediate",
                "-D",
                data.to_str().unwrap_or_default(),
            ],
        );
    }
}

/// The directory of PostgreSQL's programs: `RELAY_TEST_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/VERSION/bin` (Debian's layout).
fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RELAY_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok();
    let newest = versions
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             apt-get install postgresql (as .ci/install does), or set RELAY_TEST_PG_BINDIR"
        ),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The `postgres` user's uid and gid, from /etc/passwd (the package creates the user).
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).expect("reading /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&SUPERUSER))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .expect(
            "no postgres user: initdb refuses to run as root; apt-get install postgresql \
             creates the user",
        )
}

#[path = "ports.rs"]
#[allow(clippy::duplicate_mod)]
// host_cluster also loads it through host_support.rs: the lanes keep the copies apart
mod ports;

fn free_port() -> u16 {
    ports::free_port(ports::Lane::Postgres)
}
