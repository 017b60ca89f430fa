//! The account store's behaviour, run on both implementations: every case listed in
//! `on_both!` runs once on SQLite and once on a real PostgreSQL (started by the test:
//! tests/postgres_support.rs), so the two cannot drift apart. Cases that only one of them
//! can have follow.

use std::time::Duration;

use super::postgres::PgStore;
use super::*;
use crate::test_postgres::Postgres;

fn name(s: &str) -> AccountName {
    AccountName::new(s).unwrap()
}

/// A store under test. `open` gives a new handle on the same store each time, as another
/// process (a second relay, `relay user …`) would have.
trait Fixture {
    fn try_open(&self) -> Result<Box<dyn AccountStore>, StoreError>;
    fn open(&self) -> Box<dyn AccountStore> {
        self.try_open().unwrap()
    }
    /// The PHC string stored for `name`, read behind the store's back.
    fn stored_phc(&self, name: &str) -> String;
    /// Marks the store as written by a relay one schema version newer than this one.
    fn claim_newer_schema(&self);
}

struct Sqlite(tempfile::TempDir);

impl Sqlite {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> PathBuf {
        self.0.path().join("relay.db")
    }
}

impl Fixture for Sqlite {
    fn try_open(&self) -> Result<Box<dyn AccountStore>, StoreError> {
        Ok(Box::new(SqliteStore::open(&self.path())?))
    }

    fn stored_phc(&self, name: &str) -> String {
        SqliteStore::open(&self.path())
            .unwrap()
            .lock()
            .query_row("SELECT phc FROM accounts WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .unwrap()
    }

    fn claim_newer_schema(&self) {
        SqliteStore::open(&self.path())
            .unwrap()
            .lock()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
}

struct Pg {
    server: Postgres,
    url: String,
}

impl Pg {
    fn new() -> Self {
        let server = Postgres::start();
        let url = server.create_database("relay");
        Self { server, url }
    }
}

impl Fixture for Pg {
    fn try_open(&self) -> Result<Box<dyn AccountStore>, StoreError> {
        Ok(Box::new(PgStore::open(&self.url)?))
    }

    fn stored_phc(&self, name: &str) -> String {
        let sql = format!("SELECT phc FROM relay.accounts WHERE name = '{name}'");
        self.server.psql("relay", &sql).trim().to_owned()
    }

    fn claim_newer_schema(&self) {
        let sql = format!(
            "INSERT INTO relay.migrations (version) VALUES ({})",
            super::postgres::SCHEMA_VERSION + 1
        );
        self.server.psql("relay", &sql);
    }
}

/// One `#[test]` per case and store: `sqlite::CASE` and `postgres::CASE`.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $case() { super::$case(&super::Sqlite::new()) })*
        }
        mod postgres {
            $(#[test] fn $case() { super::$case(&super::Pg::new()) })*
        }
    };
}

on_both!(
    crud,
    passwords_are_bounded_and_hashed_as_argon2id,
    access_rules,
    two_handles_share_one_store,
    concurrent_writers_wait_instead_of_failing,
    secret_persists_and_schema_is_versioned,
    credential_stamps_and_current_instances,
    snapshot_follows_the_store,
);

fn crud(f: &dyn Fixture) {
    let store = f.open();
    let alice = name("alice");
    let bob = name("bob");
    assert!(store.list().unwrap().is_empty());
    store.add(&bob, "hunter2").unwrap();
    store.add(&alice, "correct horse").unwrap();
    assert!(matches!(
        store.add(&alice, "again"),
        Err(StoreError::AlreadyExists(n)) if n == alice
    ));
    let list = store.list().unwrap();
    let names: Vec<_> = list.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(list[0].created > 1_600_000_000);
    assert_eq!(list[0].access, AccessRule::anyone());
    assert!(store.exists(&alice).unwrap());

    store.verify_password(&alice, "correct horse").unwrap();
    assert!(matches!(
        store.verify_password(&alice, "hunter2"),
        Err(VerifyError::WrongPassword)
    ));
    assert!(matches!(
        store.verify_password(&name("carol"), "x"),
        Err(VerifyError::UnknownAccount)
    ));
    assert!(matches!(
        store.verify_password(&alice, ""),
        Err(VerifyError::WrongPassword)
    ));

    store.set_password(&alice, "new one").unwrap();
    assert!(matches!(
        store.verify_password(&alice, "correct horse"),
        Err(VerifyError::WrongPassword)
    ));
    store.verify_password(&alice, "new one").unwrap();
    assert!(matches!(
        store.set_password(&name("carol"), "x"),
        Err(StoreError::NoSuchAccount(_))
    ));

    store.delete(&bob).unwrap();
    assert!(!store.exists(&bob).unwrap());
    assert!(matches!(
        store.delete(&bob),
        Err(StoreError::NoSuchAccount(_))
    ));
    assert!(matches!(
        store.verify_password(&bob, "hunter2"),
        Err(VerifyError::UnknownAccount)
    ));
    // Names sort by their bytes, whatever the database's collation.
    for n in ["Zed", "äpfel", "_x"] {
        store.add(&name(n), "pw").unwrap();
    }
    let names: Vec<_> = store.list().unwrap().into_iter().map(|a| a.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

fn passwords_are_bounded_and_hashed_as_argon2id(f: &dyn Fixture) {
    let store = f.open();
    assert!(matches!(
        store.add(&name("a"), ""),
        Err(StoreError::InvalidPassword)
    ));
    assert!(matches!(
        store.add(&name("a"), &"x".repeat(MAX_PASSWORD_LEN + 1)),
        Err(StoreError::InvalidPassword)
    ));
    store.add(&name("a"), "pw").unwrap();
    let phc = f.stored_phc("a");
    assert!(phc.starts_with("$argon2id$"), "{phc}");
}

fn access_rules(f: &dyn Fixture) {
    let store = f.open();
    let (a, b, c) = (name("a"), name("b"), name("c"));
    store.add(&a, "pw").unwrap();
    assert!(store.may_reach(&a, &b).unwrap());
    store
        .set_access_rule(&a, &AccessRule::only(vec![b.clone()]))
        .unwrap();
    assert!(store.may_reach(&a, &b).unwrap());
    assert!(!store.may_reach(&a, &c).unwrap());
    assert_eq!(store.access_rule(&a).unwrap().to_string(), "b");
    // Repeated targets count once; the list reads back sorted.
    store
        .set_access_rule(&a, &AccessRule::only(vec![c.clone(), b.clone(), c.clone()]))
        .unwrap();
    assert_eq!(store.access_rule(&a).unwrap().to_string(), "b,c");
    store
        .set_access_rule(&a, &AccessRule::only(vec![]))
        .unwrap();
    assert!(!store.may_reach(&a, &b).unwrap());
    assert_eq!(store.access_rule(&a).unwrap().to_string(), "none");
    store.set_access_rule(&a, &AccessRule::anyone()).unwrap();
    assert!(store.may_reach(&a, &c).unwrap());
    // Unknown accounts may reach nobody; setting their rule is an error.
    assert!(!store.may_reach(&c, &a).unwrap());
    assert!(matches!(
        store.access_rule(&c),
        Err(StoreError::NoSuchAccount(_))
    ));
    assert!(matches!(
        store.set_access_rule(&c, &AccessRule::anyone()),
        Err(StoreError::NoSuchAccount(_))
    ));
    // A deleted and re-created account starts with the default rule again.
    store
        .set_access_rule(&a, &AccessRule::only(vec![b.clone()]))
        .unwrap();
    store.delete(&a).unwrap();
    store.add(&a, "pw").unwrap();
    assert_eq!(store.access_rule(&a).unwrap(), AccessRule::anyone());
}

fn two_handles_share_one_store(f: &dyn Fixture) {
    let one = f.open();
    let two = f.open();
    assert_eq!(one.server_secret().unwrap(), two.server_secret().unwrap());
    let g0 = one.generation().unwrap();
    two.add(&name("dev"), "pw").unwrap();
    let g1 = one.generation().unwrap();
    assert!(g1 > g0, "a change by another handle moves the generation");
    one.verify_password(&name("dev"), "pw").unwrap();
    two.set_access_rule(&name("dev"), &AccessRule::only(vec![]))
        .unwrap();
    let g2 = one.generation().unwrap();
    assert!(g2 > g1);
    assert!(!one.may_reach(&name("dev"), &name("x")).unwrap());
    one.delete(&name("dev")).unwrap();
    assert!(!two.exists(&name("dev")).unwrap());
    assert!(two.generation().unwrap() > g2);
    // Reads and instance records do not move it.
    let g3 = one.generation().unwrap();
    one.list().unwrap();
    one.set_instance("dev", Some(1)).unwrap();
    assert_eq!(g3, one.generation().unwrap());
}

fn concurrent_writers_wait_instead_of_failing(f: &dyn Fixture) {
    std::thread::scope(|s| {
        for t in 0..4 {
            let store = f.open();
            s.spawn(move || {
                for i in 0..5 {
                    let n = name(&format!("t{t}-{i}"));
                    store.add(&n, "pw").unwrap();
                    store
                        .set_access_rule(&n, &AccessRule::only(vec![name("peer")]))
                        .unwrap();
                }
            });
        }
    });
    let list = f.open().list().unwrap();
    assert_eq!(list.len(), 20);
    assert!(list.iter().all(|a| a.access.to_string() == "peer"));
}

fn secret_persists_and_schema_is_versioned(f: &dyn Fixture) {
    let secret = f.open().server_secret().unwrap();
    let again = f.open();
    assert_eq!(secret, again.server_secret().unwrap());
    assert_ne!(secret.as_bytes(), &[0u8; 32]);
    assert_eq!(format!("{secret:?}"), "ServerSecret(..)");
    drop(again);
    f.claim_newer_schema();
    assert!(matches!(
        f.try_open(),
        Err(StoreError::SchemaTooNew { found, known }) if found == known + 1
    ));
}

/// What revokes tokens: a new credential stamp on a password change and on re-creation;
/// the current instance, kept per account and gone with it.
fn credential_stamps_and_current_instances(f: &dyn Fixture) {
    let store = f.open();
    let cam = name("cam");
    store.add(&cam, "pw").unwrap();
    let stamp = |s: &dyn AccountStore| s.list().unwrap()[0].credential;
    let first = stamp(store.as_ref());
    store.set_password(&cam, "pw2").unwrap();
    let second = stamp(store.as_ref());
    assert_ne!(first, second);
    let g = store.generation().unwrap();
    store.set_instance("cam", Some(7)).unwrap();
    assert_eq!(
        store.generation().unwrap(),
        g,
        "instances do not reload accounts"
    );
    assert_eq!(
        store.set_instance("ghost", Some(1)).unwrap(),
        0,
        "no account, no record"
    );
    // Epochs grow where there are any (PostgreSQL; SQLite, one relay, has none).
    let (e1, e2) = (
        store.set_instance("cam", Some(7)).unwrap(),
        store.set_instance("cam", Some(7)).unwrap(),
    );
    assert!(e2 > e1 || (e1, e2) == (0, 0), "epochs {e1} then {e2}");
    assert_eq!(
        store.instances().unwrap(),
        HashMap::from([("cam".to_owned(), Some(7))])
    );
    assert_eq!(store.instance("cam").unwrap(), Some(Some(7)));
    assert_eq!(store.instance("ghost").unwrap(), None);
    // Every bit of an instance id survives (they are random u64s, stored signed).
    store.set_instance("cam", Some(u64::MAX - 1)).unwrap();
    assert_eq!(f.open().instances().unwrap()["cam"], Some(u64::MAX - 1));
    store.set_instance("cam", None).unwrap();
    assert_eq!(store.instances().unwrap()["cam"], None);
    assert_eq!(store.instance("cam").unwrap(), Some(None));
    store.delete(&cam).unwrap();
    assert!(store.instances().unwrap().is_empty());
    assert_eq!(store.instance("cam").unwrap(), None);
    store.add(&cam, "pw").unwrap();
    assert_ne!(stamp(store.as_ref()), second);
}

fn snapshot_follows_the_store(f: &dyn Fixture) {
    let store = f.open();
    let (a, b) = (name("a"), name("b"));
    store.add(&a, "pw").unwrap();
    store.add(&b, "pw").unwrap();
    let first = AccountsSnapshot::load(store.as_ref()).unwrap();
    assert!(first.exists("a") && !first.exists("c"));
    assert!(first.may_reach("a", "b") && first.may_reach("a", "anyone"));
    assert!(!first.may_reach("c", "a"));
    assert_eq!(first.generation(), store.generation().unwrap());

    store
        .set_access_rule(&a, &AccessRule::only(vec![b.clone()]))
        .unwrap();
    store.delete(&b).unwrap();
    assert_ne!(first.generation(), store.generation().unwrap());
    let second = AccountsSnapshot::load(store.as_ref()).unwrap();
    assert!(second.may_reach("a", "b") && !second.may_reach("a", "c"));
    assert_eq!(first.removed(&second), ["b"]);
    assert!(second.removed(&first).is_empty());
    // A re-created account (new creation time) counts as removed too.
    let mut recreated = second.clone();
    recreated.accounts.get_mut("a").unwrap().0 += 1;
    assert_eq!(second.removed(&recreated), ["a"]);
}

// SQLite only.

#[test]
fn sqlite_created_with_mode_0600() {
    let f = Sqlite::new();
    let store = f.open();
    store.add(&name("alice"), "pw").unwrap();
    for file in ["relay.db", "relay.db-wal", "relay.db-shm"] {
        let path = f.0.path().join(file);
        if path.exists() {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }
    assert!(f.0.path().join("relay.db-wal").exists(), "WAL mode is on");
    drop(store);
}

#[test]
fn sqlite_version_1_store_is_upgraded() {
    let f = Sqlite::new();
    {
        let conn = Connection::open(f.path()).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute(
            "INSERT INTO server_secret (id, secret) VALUES (1, zeroblob(32))",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO accounts (name, phc, created) VALUES ('old', 'x', 0)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let store = f.open();
    assert_eq!(store.list().unwrap()[0].credential, 0);
    store.set_instance("old", Some(3)).unwrap();
    assert_eq!(store.instances().unwrap()["old"], Some(3));
}

#[test]
fn sqlite_missing_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(&dir.path().join("no/such/relay.db")).unwrap_err();
    assert!(err.to_string().contains("no/such/relay.db"), "{err}");
}

// PostgreSQL only.

/// Nodes that start together on a new database migrate it once: the advisory lock makes
/// the second wait, then find the schema current.
#[test]
fn postgres_migrations_run_once_when_nodes_start_together() {
    let f = Pg::new();
    let secrets: Vec<ServerSecret> = std::thread::scope(|s| {
        let opening: Vec<_> = (0..4)
            .map(|_| s.spawn(|| PgStore::open(&f.url).unwrap().server_secret().unwrap()))
            .collect();
        opening.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(secrets.windows(2).all(|w| w[0] == w[1]), "one key for all");
    let versions = f.server.psql(
        "relay",
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM relay.migrations",
    );
    let expected: Vec<String> = (1..=super::postgres::SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect();
    assert_eq!(versions.trim(), expected.join(","));
}

/// A connection failure names the database, never its password.
#[test]
fn postgres_unreachable_database_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://relay:s3cret@127.0.0.1:{port}/relay");
    let err = PgStore::open(&url).unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}/relay")) && !err.contains("s3cret"),
        "{err}"
    );
}

/// Changes made through another handle wake the watcher by NOTIFY, with no polling: its
/// poll interval here is an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_reach_the_watcher_without_polling() {
    let f = Pg::new();
    let store: Arc<dyn AccountStore> = Arc::from(f.open());
    let mut rx = crate::listen::watch_accounts(store, Duration::from_secs(3600)).unwrap();
    let cli = f.open();
    // The listener may connect after the first edit: repeat edits until one is seen.
    let added = async {
        let mut i = 0;
        loop {
            let n = name(&format!("cam{i}"));
            let cli_add = tokio::task::block_in_place(|| cli.add(&n, "pw"));
            cli_add.unwrap();
            let seen = tokio::time::timeout(
                Duration::from_secs(1),
                rx.wait_for(|s| s.exists(n.as_str())),
            )
            .await;
            if seen.is_ok() {
                return n;
            }
            i += 1;
        }
    };
    let n = tokio::time::timeout(Duration::from_secs(20), added)
        .await
        .expect("an added account reached the watcher");
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| cli.delete(&n)).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| !s.exists(n.as_str())),
    )
    .await
    .expect("the deletion reached the watcher")
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a deletion took {:?} to arrive",
        started.elapsed()
    );
}

/// `@published` is the relay's own requester for published ports, allowed to reach their
/// targets: an account of that name would hand its terminals the same reach, so names
/// starting with `@` are refused (by `relay user add` and at login alike).
#[test]
fn names_starting_with_at_are_the_relays_own() {
    assert_eq!(
        AccountName::new(crate::published::REQUESTER),
        Err(NameError::Reserved)
    );
    assert_eq!(AccountName::new("@x"), Err(NameError::Reserved));
    assert!(AccountName::new("cam@site").is_ok());
}
