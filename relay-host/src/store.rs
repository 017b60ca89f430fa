//! The account store: accounts with argon2id password hashes, the relay-side access rule,
//! and the persistent server secret that keys resumption credentials.
//!
//! [`AccountStore`] is the interface the server and the CLI use. [`SqliteStore`] is the
//! default implementation (one file, one relay); [`postgres::PgStore`] keeps the same data in
//! PostgreSQL for relays that share one database.
//!
//! The CLI edits the store while `relay serve` runs, so several processes open the same file
//! at once: the SQLite store uses WAL mode (readers never block the writer) and a busy
//! timeout (a writer waits for another writer instead of failing). The server notices edits
//! by polling [`AccountStore::generation`], a counter that triggers bump on every change, so
//! a deleted account's connections can be closed and a changed rule applies to the next
//! demand.
//!
//! All methods block (SQLite I/O, and argon2 in `add`, `set_password` and
//! `verify_password`, which take tens of milliseconds by design): async callers run them on
//! a blocking thread.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use thiserror::Error;
use tokio::sync::Notify;

pub mod postgres;

/// Longest account name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 32;

/// Longest password accepted, in bytes of UTF-8: the protocol's bound (relay-proto's
/// `MAX_PASSWORD`), so every stored password can be sent in a login. Bounded so a login
/// cannot make the relay hash an arbitrarily large input.
pub const MAX_PASSWORD_LEN: usize = 128;

/// Shortest new password `relay user add` and `passwd` accept, in characters (Unicode
/// scalar values): NIST SP 800-63B's minimum for a chosen secret. Existing shorter
/// passwords still log in.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// How long a write waits for another process's write to finish before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite schema this code creates and understands (kept in `PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// A validated account name: 1 to [`MAX_NAME_LEN`] bytes of UTF-8 with no control
/// character, no whitespace and no `/` (which separates target and service in
/// `relay connect TARGET/SERVICE`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName(String);

/// Why a string is not a valid [`AccountName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("an account name must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("an account name is at most {MAX_NAME_LEN} bytes (this one is {0})")]
    TooLong(usize),
    /// The name contains a control character.
    #[error("an account name must not contain control characters")]
    ControlChar,
    /// The name contains whitespace.
    #[error("an account name must not contain whitespace")]
    Whitespace,
    /// The name contains `/`.
    #[error("an account name must not contain '/'")]
    Slash,
    /// The name starts with `@`: those are the relay's own requesters (`@published`, the
    /// requester of published ports, may reach their targets), never an account's.
    #[error("an account name must not start with '@' (reserved for the relay's own requesters)")]
    Reserved,
}

impl AccountName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(name.len()));
        }
        if name.starts_with('@') {
            return Err(NameError::Reserved);
        }
        for c in name.chars() {
            // `is_control` covers the ASCII controls and the C1 controls: neither belongs in
            // a name that is printed in logs and terminals.
            if c.is_control() {
                return Err(NameError::ControlChar);
            }
            if c.is_whitespace() {
                return Err(NameError::Whitespace);
            }
            if c == '/' {
                return Err(NameError::Slash);
            }
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AccountName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AccountName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for AccountName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Which accounts an account may reach with a connection demand (the relay-side access
/// rule; the target terminal may still reject any demand on top of it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessRule {
    /// `None`: any account. `Some(list)`: only the listed accounts (an empty list: none).
    pub allow: Option<Vec<AccountName>>,
}

impl AccessRule {
    /// The default rule: may reach any account.
    pub fn anyone() -> Self {
        Self { allow: None }
    }

    /// May reach only `targets`.
    pub fn only(targets: Vec<AccountName>) -> Self {
        Self {
            allow: Some(targets),
        }
    }

    /// Whether this rule lets its account reach `to`.
    pub fn permits(&self, to: &AccountName) -> bool {
        match &self.allow {
            None => true,
            Some(list) => list.contains(to),
        }
    }
}

impl fmt::Display for AccessRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.allow {
            None => f.write_str("any"),
            Some(list) if list.is_empty() => f.write_str("none"),
            Some(list) => {
                for (i, name) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    f.write_str(name.as_str())?;
                }
                Ok(())
            }
        }
    }
}

/// One account as listed by [`AccountStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    /// The account's name.
    pub name: AccountName,
    /// When the account was created, in seconds since the Unix epoch.
    pub created: u64,
    /// Which accounts it may reach.
    pub access: AccessRule,
    /// A random stamp, new with the account and with each password change: resumption
    /// tokens are bound to it, so such a change revokes them.
    pub credential: u64,
}

/// The relay's 32-byte secret that keys resumption credentials. Kept in the store so it
/// survives restarts (credentials issued before a restart stay valid). Its `Debug` output
/// never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerSecret([u8; 32]);

impl ServerSecret {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(..)")
    }
}

/// An account store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// `add` of a name that is taken.
    #[error("account '{0}' already exists")]
    AlreadyExists(AccountName),
    /// The named account does not exist.
    #[error("no account named '{0}'")]
    NoSuchAccount(AccountName),
    /// The password is empty or too long.
    #[error("a password must be 1 to {MAX_PASSWORD_LEN} bytes of UTF-8")]
    InvalidPassword,
    /// Hashing a password failed.
    #[error("hashing the password failed: {0}")]
    Hash(#[from] argon2::password_hash::Error),
    /// The store holds data this code cannot read (edited by hand, or damaged).
    #[error("account store is damaged: {0}")]
    Corrupt(String),
    /// The store was written by a newer relay.
    #[error("account store has schema version {found}; this relay understands up to {known}")]
    SchemaTooNew {
        /// The version found in the store.
        found: i64,
        /// The newest version this relay knows.
        known: i64,
    },
    /// Creating or opening the file failed.
    #[error("account store {}: {source}", path.display())]
    Io {
        /// The store's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// SQLite reported an error.
    #[error("account store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL reported an error, or the connection to it failed.
    #[error("account database: {}", postgres::detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The account database cannot be used (a bad URL, no connection in time).
    #[error("account database: {0}")]
    Database(String),
}

/// A password check failed.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// No account has this name.
    #[error("unknown account")]
    UnknownAccount,
    /// The account exists and the password does not match.
    #[error("wrong password")]
    WrongPassword,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The account store as the server and the CLI see it. Implementations are shared between
/// threads; every method blocks (see the module docs).
pub trait AccountStore: Send + Sync + fmt::Debug {
    /// Creates an account; fails with [`StoreError::AlreadyExists`] if the name is taken.
    /// New accounts may reach anyone.
    fn add(&self, name: &AccountName, password: &str) -> Result<(), StoreError>;
    /// Deletes an account and its access rule.
    fn delete(&self, name: &AccountName) -> Result<(), StoreError>;
    /// Replaces an account's password.
    fn set_password(&self, name: &AccountName, password: &str) -> Result<(), StoreError>;
    /// All accounts, sorted by name.
    fn list(&self) -> Result<Vec<AccountInfo>, StoreError>;
    /// Whether the account exists.
    fn exists(&self, name: &AccountName) -> Result<bool, StoreError>;
    /// Checks a password in constant time (through argon2's verifier).
    fn verify_password(&self, name: &AccountName, password: &str) -> Result<(), VerifyError>;
    /// The account's access rule.
    fn access_rule(&self, name: &AccountName) -> Result<AccessRule, StoreError>;
    /// Replaces the account's access rule. Targets need not exist (yet).
    fn set_access_rule(&self, name: &AccountName, rule: &AccessRule) -> Result<(), StoreError>;
    /// Whether `from` may demand a connection to `to`. An account that does not exist (for
    /// example, deleted a moment ago) may reach nobody.
    fn may_reach(&self, from: &AccountName, to: &AccountName) -> Result<bool, StoreError> {
        match self.access_rule(from) {
            Ok(rule) => Ok(rule.permits(to)),
            Err(StoreError::NoSuchAccount(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// The persistent server secret (created with the store).
    fn server_secret(&self) -> Result<ServerSecret, StoreError>;
    /// A number that changes whenever any process changes accounts or access rules. Cheap:
    /// poll it (say, once a second) and reload what you cache when it moves.
    fn generation(&self) -> Result<u64, StoreError>;
    /// Each account's current instance as the relay last recorded it: `Some(id)` (its
    /// tokens may start it) or `None` (logged out: no token may). Accounts never recorded
    /// are absent.
    fn instances(&self) -> Result<HashMap<String, Option<u64>>, StoreError>;
    /// One account's entry of [`Self::instances`].
    fn instance(&self, name: &str) -> Result<Option<Option<u64>>, StoreError>;
    /// Records `name`'s current instance (does not move [`Self::generation`]). Returns the
    /// record's epoch: its place in an order every relay on the store agrees on
    /// (PostgreSQL's `relay.presence_epoch`; 0 where there is one relay, SQLite, or when
    /// the account does not exist).
    fn set_instance(&self, name: &str, instance: Option<u64>) -> Result<u64, StoreError>;
    /// From now on, wakes `wake` soon after any process changes accounts or access rules,
    /// where the store is told of changes (PostgreSQL's LISTEN/NOTIFY). Stores that are not
    /// (SQLite) do nothing here: [`Self::generation`] is polled in any case.
    fn watch_changes(&self, wake: Arc<Notify>) {
        let _ = wake;
    }
    /// From now on, sends on `moved` every reachable instance that *another* relay on the
    /// store records (a newer login there, docs/CLUSTER.md part 4), in the order the
    /// store committed them. Stores with one relay (SQLite) send nothing.
    fn watch_presence(&self, moved: tokio::sync::mpsc::UnboundedSender<Presence>) {
        let _ = moved;
    }
    /// Fencing (docs/CLUSTER.md, part 6): `true` while this relay, a node of a cluster,
    /// has not written its heartbeat for [`postgres::FENCE_AFTER`], so the others may
    /// count it dead; it must then serve no terminal. `None`: not a node of a cluster.
    fn fencing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// A reachable instance another relay recorded ([`AccountStore::watch_presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub account: String,
    pub instance: u64,
    /// Its record's epoch ([`AccountStore::set_instance`]).
    pub epoch: u64,
}

/// The SQLite account store: one file, created on first use with mode 0600.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    /// rusqlite's `Connection` is `Send` but not `Sync`; one connection per process handle is
    /// plenty (each call is short; argon2 runs outside the lock).
    conn: Mutex<Connection>,
}

/// Version 2: the credential stamp tokens are bound to, and each account's current
/// instance (the one its tokens may start; NULL after LOGOUT), written by the relay.
/// Accounts of version 1 get stamp 0: their old tokens fail once, the terminal falls back
/// to its password.
const SCHEMA_V2: &str = "
ALTER TABLE accounts ADD COLUMN credential INTEGER NOT NULL DEFAULT 0;
CREATE TABLE instances (
    account  TEXT PRIMARY KEY NOT NULL,
    instance INTEGER                     -- NULL: logged out
);
";

const SCHEMA_V1: &str = "
CREATE TABLE accounts (
    name       TEXT PRIMARY KEY NOT NULL,
    phc        TEXT NOT NULL,              -- argon2id PHC string
    created    INTEGER NOT NULL,           -- Unix seconds
    restricted INTEGER NOT NULL DEFAULT 0  -- 0: may reach anyone; 1: only targets in access
);
CREATE TABLE access (
    account TEXT NOT NULL,
    target  TEXT NOT NULL,
    PRIMARY KEY (account, target)
);
CREATE TABLE server_secret (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL CHECK (length(secret) = 32)
);
CREATE TABLE generation (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO generation (id, value) VALUES (1, 0);
CREATE TRIGGER accounts_ins AFTER INSERT ON accounts BEGIN UPDATE generation SET value = value + 1; END;
CREATE TRIGGER accounts_upd AFTER UPDATE ON accounts BEGIN UPDATE generation SET value = value + 1; END;
CREATE TRIGGER accounts_del AFTER DELETE ON accounts BEGIN UPDATE generation SET value = value + 1; END;
CREATE TRIGGER access_ins AFTER INSERT ON access BEGIN UPDATE generation SET value = value + 1; END;
CREATE TRIGGER access_upd AFTER UPDATE ON access BEGIN UPDATE generation SET value = value + 1; END;
CREATE TRIGGER access_del AFTER DELETE ON access BEGIN UPDATE generation SET value = value + 1; END;
";

impl SqliteStore {
    /// Opens the store at `path`, creating it (mode 0600, set before any data is written)
    /// and its schema and server secret if it does not exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        // Create the empty file ourselves so its mode is 0600 before SQLite writes a byte;
        // SQLite gives its -wal and -shm files the database file's mode.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => {
                // The umask can only clear bits, but make the mode exact anyway.
                file.set_permissions(fs::Permissions::from_mode(0o600))
                    .map_err(io_err)?;
                tracing::info!(path = %path.display(), "created account store");
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let mode = fs::metadata(path).map_err(io_err)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format_args!("{:o}", mode & 0o777),
                        "account store is readable by other users; chmod 600 it"
                    );
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot switch to WAL journal mode (got {mode})"
            )));
        }
        // NORMAL is durable across application crashes in WAL mode; only a power loss may
        // drop the last commits, which is acceptable for operator edits.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let store = Self {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates or upgrades the schema. `BEGIN IMMEDIATE` takes the write lock first, so two
    /// processes creating the same new store cannot both run it.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        if version == 0 {
            tx.execute_batch(SCHEMA_V1)?;
            let mut secret = [0u8; 32];
            OsRng.fill_bytes(&mut secret);
            tx.execute(
                "INSERT INTO server_secret (id, secret) VALUES (1, ?1)",
                params![&secret[..]],
            )?;
        }
        if version < 2 {
            tx.execute_batch(SCHEMA_V2)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back an
        // unfinished transaction when the statement or transaction object drops).
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The hasher for new passwords: argon2id v19 with the argon2 crate's default cost
/// (19 MiB, 2 passes, 1 lane: the OWASP recommendation). Verification reads the cost from
/// each PHC string, so raising it later keeps old hashes valid.
#[cfg(not(test))]
fn hasher() -> Argon2<'static> {
    Argon2::default()
}

/// Unit tests hash with a tiny cost: unoptimised argon2 takes most of a second per hash at
/// the real one. The binary (and so the CLI tests) always uses the real cost.
#[cfg(test)]
fn hasher() -> Argon2<'static> {
    let params = argon2::Params::new(64, 1, 1, None).expect("valid test parameters");
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Checks `password` against `name`'s stored PHC string (`None`: no such account), the
/// same way for every store: an unknown account costs a whole verification too, so the
/// answer time does not say which accounts exist. Runs argon2: call it without locks.
pub(crate) fn verify_stored(
    name: &AccountName,
    password: &str,
    phc: Option<String>,
) -> Result<(), VerifyError> {
    let Some(phc) = phc else {
        let _ = verify(password, &dummy_hash()?);
        return Err(VerifyError::UnknownAccount);
    };
    if check_password(password).is_err() {
        return Err(VerifyError::WrongPassword);
    }
    let hash = PasswordHash::new(&phc).map_err(|e| {
        StoreError::Corrupt(format!("password hash of '{name}' is unreadable: {e}"))
    })?;
    verify(password, &hash)
}

/// Checks `password` against `hash`. The verifier takes its parameters from the PHC string,
/// runs on reused memory (so every check costs the same) and compares the digests in
/// constant time.
fn verify(password: &str, hash: &PasswordHash<'_>) -> Result<(), VerifyError> {
    match crate::hashing::verify(password.as_bytes(), hash) {
        Ok(true) => Ok(()),
        Ok(false) => Err(VerifyError::WrongPassword),
        Err(e) => Err(StoreError::Hash(e).into()),
    }
}

/// A hash of a random password with [`hasher`]'s parameters (those of every new account),
/// made once: what a login for an unknown account is checked against.
fn dummy_hash() -> Result<PasswordHash<'static>, StoreError> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = match DUMMY.get() {
        Some(phc) => phc,
        None => {
            let mut secret = [0u8; 16];
            OsRng.fill_bytes(&mut secret);
            let phc = hash_password(&format!("{secret:02x?}"))?;
            DUMMY.get_or_init(|| phc)
        }
    };
    PasswordHash::new(phc).map_err(|e| StoreError::Corrupt(format!("dummy hash: {e}")))
}

/// Hashes `password` as an argon2id PHC string with a fresh random salt.
fn hash_password(password: &str) -> Result<String, StoreError> {
    check_password(password)?;
    let salt = SaltString::generate(&mut OsRng);
    Ok(hasher()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn check_password(password: &str) -> Result<(), StoreError> {
    if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return Err(StoreError::InvalidPassword);
    }
    Ok(())
}

/// A fresh credential stamp ([`AccountInfo::credential`]).
fn credential_stamp() -> i64 {
    OsRng.next_u64() as i64
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn stored_name(name: String) -> Result<AccountName, StoreError> {
    AccountName::new(&name).map_err(|e| StoreError::Corrupt(format!("stored name {name:?}: {e}")))
}

fn read_rule(
    conn: &Connection,
    name: &AccountName,
    restricted: bool,
) -> Result<AccessRule, StoreError> {
    if !restricted {
        return Ok(AccessRule::anyone());
    }
    let mut stmt =
        conn.prepare_cached("SELECT target FROM access WHERE account = ?1 ORDER BY target")?;
    let targets = stmt
        .query_map(params![name.as_str()], |r| r.get::<_, String>(0))?
        .map(|t| stored_name(t?))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccessRule::only(targets))
}

impl AccountStore for SqliteStore {
    fn add(&self, name: &AccountName, password: &str) -> Result<(), StoreError> {
        // Hash before taking the lock: argon2 is deliberately slow.
        let phc = hash_password(password)?;
        let conn = self.lock();
        match conn.execute(
            "INSERT INTO accounts (name, phc, created, credential) VALUES (?1, ?2, ?3, ?4)",
            params![name.as_str(), phc, now_unix() as i64, credential_stamp()],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Err(StoreError::AlreadyExists(name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, name: &AccountName) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM access WHERE account = ?1",
            params![name.as_str()],
        )?;
        tx.execute(
            "DELETE FROM instances WHERE account = ?1",
            params![name.as_str()],
        )?;
        let n = tx.execute(
            "DELETE FROM accounts WHERE name = ?1",
            params![name.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        tx.commit()?;
        Ok(())
    }

    fn set_password(&self, name: &AccountName, password: &str) -> Result<(), StoreError> {
        let phc = hash_password(password)?;
        let n = self.lock().execute(
            "UPDATE accounts SET phc = ?2, credential = ?3 WHERE name = ?1",
            params![name.as_str(), phc, credential_stamp()],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<AccountInfo>, StoreError> {
        let mut conn = self.lock();
        // One read transaction so the accounts and their rules are one consistent snapshot.
        let tx = conn.transaction()?;
        let rows = {
            let mut stmt = tx.prepare_cached(
                "SELECT name, created, restricted, credential FROM accounts ORDER BY name",
            )?;
            stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (name, created, restricted, credential) in rows {
            let name = stored_name(name)?;
            let access = read_rule(&tx, &name, restricted)?;
            out.push(AccountInfo {
                name,
                created: u64::try_from(created).unwrap_or(0),
                access,
                credential: credential as u64,
            });
        }
        tx.commit()?;
        Ok(out)
    }

    fn exists(&self, name: &AccountName) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .prepare_cached("SELECT 1 FROM accounts WHERE name = ?1")?
            .exists(params![name.as_str()])?)
    }

    fn verify_password(&self, name: &AccountName, password: &str) -> Result<(), VerifyError> {
        let phc: Option<String> = self
            .lock()
            .prepare_cached("SELECT phc FROM accounts WHERE name = ?1")
            .map_err(StoreError::from)?
            .query_row(params![name.as_str()], |r| r.get(0))
            .optional()
            .map_err(StoreError::from)?;
        // The lock is released here: argon2 runs without it.
        verify_stored(name, password, phc)
    }

    fn access_rule(&self, name: &AccountName) -> Result<AccessRule, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let restricted: Option<bool> = tx
            .prepare_cached("SELECT restricted FROM accounts WHERE name = ?1")?
            .query_row(params![name.as_str()], |r| r.get(0))
            .optional()?;
        let Some(restricted) = restricted else {
            return Err(StoreError::NoSuchAccount(name.clone()));
        };
        let rule = read_rule(&tx, name, restricted)?;
        tx.commit()?;
        Ok(rule)
    }

    fn set_access_rule(&self, name: &AccountName, rule: &AccessRule) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE accounts SET restricted = ?2 WHERE name = ?1",
            params![name.as_str(), rule.allow.is_some()],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchAccount(name.clone()));
        }
        tx.execute(
            "DELETE FROM access WHERE account = ?1",
            params![name.as_str()],
        )?;
        if let Some(targets) = &rule.allow {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO access (account, target) VALUES (?1, ?2)")?;
            for target in targets {
                stmt.execute(params![name.as_str(), target.as_str()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn server_secret(&self) -> Result<ServerSecret, StoreError> {
        let bytes: Vec<u8> =
            self.lock()
                .query_row("SELECT secret FROM server_secret WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt("server secret is not 32 bytes".into()))?;
        Ok(ServerSecret(bytes))
    }

    fn instances(&self) -> Result<HashMap<String, Option<u64>>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT account, instance FROM instances")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        rows.map(|r| Ok(r.map(|(name, i)| (name, i.map(|i| i as u64)))?))
            .collect()
    }

    fn instance(&self, name: &str) -> Result<Option<Option<u64>>, StoreError> {
        Ok(self
            .lock()
            .prepare_cached("SELECT instance FROM instances WHERE account = ?1")?
            .query_row(params![name], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .map(|i| i.map(|i| i as u64)))
    }

    fn set_instance(&self, name: &str, instance: Option<u64>) -> Result<u64, StoreError> {
        // Only for accounts that exist: a late write must not outlive a deletion.
        self.lock().execute(
            "INSERT OR REPLACE INTO instances (account, instance)
             SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM accounts WHERE name = ?1)",
            params![name, instance.map(|i| i as i64)],
        )?;
        Ok(0)
    }

    fn generation(&self) -> Result<u64, StoreError> {
        let value: i64 =
            self.lock()
                .query_row("SELECT value FROM generation WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
        Ok(value as u64)
    }
}

/// An in-memory copy of the accounts and their access rules, for the questions the relay
/// asks on its I/O path (may A reach B? does this account still exist?) without touching
/// the store there. Reload it when [`AccountStore::generation`] moves; [`Self::removed`]
/// then names the accounts whose connections must close.
#[derive(Debug, Clone, Default)]
pub struct AccountsSnapshot {
    generation: u64,
    /// Name → (creation time, rule, credential stamp). The creation time tells a
    /// deleted-and-re-created account from the old one.
    accounts: HashMap<String, (u64, AccessRule, u64)>,
}

impl AccountsSnapshot {
    /// Reads the store. The generation is read first, so a change that lands during the
    /// read moves it again and the next poll reloads.
    pub fn load(store: &dyn AccountStore) -> Result<Self, StoreError> {
        let generation = store.generation()?;
        let accounts = store
            .list()?
            .into_iter()
            .map(|a| {
                let name = a.name.as_str().to_owned();
                (name, (a.created, a.access, a.credential))
            })
            .collect();
        Ok(Self {
            generation,
            accounts,
        })
    }

    /// The store generation this copy was read at.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `name` is an account.
    pub fn exists(&self, name: &str) -> bool {
        self.accounts.contains_key(name)
    }

    /// `name`'s credential stamp, if it is an account.
    pub fn credential(&self, name: &str) -> Option<u64> {
        self.accounts.get(name).map(|(.., credential)| *credential)
    }

    /// Whether `from` may demand a connection to `to` (an unknown `from`: no).
    pub fn may_reach(&self, from: &str, to: &str) -> bool {
        self.accounts.get(from).is_some_and(|(_, rule, _)| {
            rule.allow
                .as_ref()
                .is_none_or(|list| list.iter().any(|n| n.as_str() == to))
        })
    }

    /// Accounts in `self` that `newer` no longer has, or has as a new account of the same
    /// name: their logged-in terminals must be disconnected.
    pub fn removed(&self, newer: &Self) -> Vec<String> {
        let mut gone: Vec<String> = self
            .accounts
            .iter()
            .filter(|(name, (created, ..))| {
                newer.accounts.get(*name).is_none_or(|(c, ..)| c != created)
            })
            .map(|(name, _)| name.clone())
            .collect();
        gone.sort();
        gone
    }
}

#[cfg(test)]
mod tests;
