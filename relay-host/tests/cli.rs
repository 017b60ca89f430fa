//! The `relay` binary's account commands, run as a user would, on a store in a temp dir.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;
use relay_host::store::{AccessRule, AccountName, AccountStore, SqliteStore, VerifyError};

fn relay(db: &Path) -> Command {
    let mut cmd = Command::cargo_bin("relay").unwrap();
    cmd.env_remove("RUST_LOG")
        .env_remove("RELAY_SERVER")
        .env_remove("RELAY_USER")
        .env_remove("RELAY_PASSWORD")
        .env_remove("RELAY_FINGERPRINT")
        .env_remove("RELAY_CA")
        .args(["user", "--db"])
        .arg(db);
    cmd
}

fn name(s: &str) -> AccountName {
    AccountName::new(s).unwrap()
}

#[test]
fn add_list_passwd_allow_del() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");

    relay(&db)
        .arg("list")
        .assert()
        .success()
        .stdout("")
        .stderr(predicate::str::contains("relay user add NAME"));

    relay(&db)
        .args(["add", "cam-1", "--password-stdin"])
        .write_stdin("s3cret-pw\n")
        .assert()
        .success()
        .stdout("added account 'cam-1'\n");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // --db after the subcommand works too.
    Command::cargo_bin("relay")
        .unwrap()
        .args(["user", "add", "alice", "--password-stdin", "--db"])
        .arg(&db)
        .write_stdin("alice-pw")
        .assert()
        .success();

    relay(&db)
        .args(["add", "cam-1", "--password-stdin"])
        .write_stdin("other\n")
        .assert()
        .failure()
        .stderr("relay: error: account 'cam-1' already exists\n");

    // The binary hashes at the real cost (unit tests use a tiny one).
    let phc: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT phc FROM accounts WHERE name = 'cam-1'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");

    let store = SqliteStore::open(&db).unwrap();
    // The trailing newline is not part of the password.
    store.verify_password(&name("cam-1"), "s3cret-pw").unwrap();
    assert!(matches!(
        store.verify_password(&name("cam-1"), "s3cret-pw\n"),
        Err(VerifyError::WrongPassword)
    ));

    relay(&db)
        .arg("list")
        .assert()
        .success()
        .stdout(
            predicate::str::is_match(
                "^alice\tcreated [0-9T:-]+Z\tmay reach: any\ncam-1\tcreated [0-9T:-]+Z\tmay reach: any\n$",
            )
            .unwrap(),
        );

    relay(&db)
        .args(["passwd", "cam-1", "--password-stdin"])
        .write_stdin("n3w-passwd\r\n")
        .assert()
        .success();
    assert!(matches!(
        store.verify_password(&name("cam-1"), "s3cret-pw"),
        Err(VerifyError::WrongPassword)
    ));
    store.verify_password(&name("cam-1"), "n3w-passwd").unwrap();

    relay(&db)
        .args(["allow", "alice", "--targets", "cam-1,cam-2"])
        .assert()
        .success()
        .stdout("'alice' may reach: cam-1,cam-2\n");
    assert_eq!(
        store.access_rule(&name("alice")).unwrap(),
        AccessRule::only(vec![name("cam-1"), name("cam-2")])
    );
    relay(&db)
        .args(["allow", "alice", "--none"])
        .assert()
        .success();
    assert!(!store.may_reach(&name("alice"), &name("cam-1")).unwrap());
    relay(&db)
        .args(["allow", "alice", "--any"])
        .assert()
        .success();
    assert!(store.may_reach(&name("alice"), &name("cam-1")).unwrap());

    relay(&db)
        .args(["del", "cam-1"])
        .assert()
        .success()
        .stdout("deleted account 'cam-1'\n");
    assert!(!store.exists(&name("cam-1")).unwrap());
    relay(&db)
        .args(["del", "cam-1"])
        .assert()
        .failure()
        .stderr("relay: error: no account named 'cam-1'\n");
}

#[test]
fn mistakes_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");

    // No TTY and no --password-stdin: refuses instead of hanging on a prompt.
    relay(&db)
        .args(["add", "dev"])
        .write_stdin("")
        .assert()
        .failure()
        .stderr(predicate::str::contains("--password-stdin"));
    relay(&db)
        .args(["add", "dev", "--password-stdin"])
        .write_stdin("\n")
        .assert()
        .failure()
        .stderr("relay: error: the password is empty\n");
    relay(&db)
        .args(["passwd", "ghost", "--password-stdin"])
        .write_stdin("pw")
        .assert()
        .failure()
        .stderr("relay: error: no account named 'ghost'\n");
    relay(&db)
        .args(["allow", "ghost", "--any"])
        .assert()
        .failure()
        .stderr("relay: error: no account named 'ghost'\n");
    relay(&db)
        .args(["add", "a/b", "--password-stdin"])
        .assert()
        .failure()
        .code(2)
        .stderr(predicate::str::contains("must not contain '/'"));
    relay(&db).args(["allow", "dev"]).assert().failure().code(2);
    relay(&dir.path().join("missing/relay.db"))
        .arg("list")
        .assert()
        .failure()
        .stderr(
            predicate::str::starts_with("relay: error: account store ")
                .and(predicate::str::contains("missing/relay.db")),
        );
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        &["serve"][..],
        &["user"],
        &["user", "add"],
        &["user", "del"],
        &["user", "passwd"],
        &["user", "list"],
        &["user", "allow"],
        &["expose"],
        &["connect"],
        &["online"],
    ] {
        Command::cargo_bin("relay")
            .unwrap()
            .args(sub)
            .arg("--help")
            .assert()
            .success()
            .stdout(predicate::str::contains("Usage: relay"));
    }
}

#[test]
fn terminal_commands_check_their_inputs_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::cargo_bin("relay").unwrap();
    cmd.env_remove("RELAY_PASSWORD")
        .env("RELAY_SERVER", "127.0.0.1")
        .env("RELAY_USER", "me")
        .args(["online", "--ca"])
        .arg(dir.path().join("none.pem"));
    cmd.assert()
        .failure()
        .stderr("relay: error: no password: set RELAY_PASSWORD or use --password-file FILE\n");

    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    Command::cargo_bin("relay")
        .unwrap()
        .env("RELAY_SERVER", "127.0.0.1")
        .env("RELAY_USER", "me")
        .args(["online", "--password-file"])
        .arg(&pw)
        .arg("--ca")
        .arg(dir.path().join("none.pem"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("none.pem"));
}

/// The LOGIN a terminal command sends first, read by a stand-in relay on loopback.
fn first_login(args: &[&str]) -> relay_proto::frame::Login {
    use relay_proto::frame::{Frame, Parsed, parse};
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("relay"))
        .args(&args[..1])
        .args(["--server", &server, "--plain", "--user", "me"])
        .args(&args[1..])
        .env("RELAY_PASSWORD", "secret")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let login = loop {
        if let Some((Parsed::Control(Frame::Login(l)), _)) = parse(&got).unwrap() {
            break l;
        }
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{args:?}: closed before a whole LOGIN");
        got.extend_from_slice(&buf[..n]);
    };
    let _ = child.kill();
    let _ = child.wait();
    login
}

#[test]
fn connect_and_online_log_in_as_requesters_and_expose_as_reachable() {
    use relay_proto::frame::caps;
    // Requesters also follow a redirect to another node of a cluster; a device does not.
    let requester = caps::ALL | caps::REQUESTER | caps::REDIRECT;
    for args in [
        &["connect", "cam/echo", "--stdio"][..],
        &["connect", "cam/echo", "--listen", "127.0.0.1:0"],
        &["online"],
    ] {
        assert_eq!(first_login(args).hello.caps, requester, "{args:?}");
    }
    let expose = first_login(&["expose", "--service", "echo=127.0.0.1:7"]);
    assert_eq!(expose.hello.caps, caps::ALL);
}
