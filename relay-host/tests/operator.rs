//! The operator's and the laptop user's command line (issue 14), run as a user would: the
//! account store is hard to lose, errors are one line with one cause, the addresses people
//! type are accepted, help and docs agree with the binary.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

/// `relay` with none of the environment that would change its defaults, run in `cwd`.
fn relay(cwd: &Path) -> Command {
    let mut cmd = Command::cargo_bin("relay").unwrap();
    for var in [
        "RUST_LOG",
        "RELAY_SERVER",
        "RELAY_USER",
        "RELAY_PASSWORD",
        "RELAY_FINGERPRINT",
        "RELAY_CA",
        "RELAY_DB",
        "RELAY_DATABASE",
        "RELAY_CONFIG",
        "XDG_CONFIG_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(cwd);
    cmd
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Finding 3: without `--db`, `RELAY_DB` or a config, `relay user …` refuses and creates
/// nothing (it used to create an empty `relay.db` in the current directory and exit 0).
#[test]
fn user_commands_without_a_store_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["user", "list"][..], &["user", "del", "cam-1"]] {
        relay(dir.path())
            .args(args)
            .assert()
            .failure()
            .stderr(predicate::str::contains("--db").and(predicate::str::contains("RELAY_DB")));
    }
    relay(dir.path())
        .args(["user", "add", "cam-1", "--password-stdin"])
        .write_stdin("long enough pw")
        .assert()
        .failure();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A named store that does not exist is only created by `user add`: `list` says there
    // is nobody, `del` that there is no store.
    let db = dir.path().join("typo.db");
    relay(dir.path())
        .args(["user", "list", "--db"])
        .arg(&db)
        .assert()
        .success()
        .stderr(predicate::str::contains("relay user add"));
    relay(dir.path())
        .args(["user", "del", "cam-1", "--db"])
        .arg(&db)
        .assert()
        .failure()
        .stderr(predicate::str::contains("no account store"));
    assert!(!db.exists());
}

/// Finding 3: `RELAY_DB`, `RELAY_CONFIG` and `relay user --config FILE` name the store.
#[test]
fn the_store_comes_from_the_environment_or_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("env.db");
    relay(dir.path())
        .env("RELAY_DB", &db)
        .args(["user", "add", "cam-1", "--password-stdin"])
        .write_stdin("long enough pw")
        .assert()
        .success();
    assert!(db.exists());

    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let config = etc.join("relay.toml");
    std::fs::write(&config, format!("db = {:?}\n", db.to_str().unwrap())).unwrap();
    relay(dir.path())
        .args(["user", "list", "--config"])
        .arg(&config)
        .assert()
        .success()
        .stdout(predicate::str::starts_with("cam-1\t"));
    relay(dir.path())
        .env("RELAY_CONFIG", &config)
        .args(["user", "list"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("cam-1\t"));
}

/// Finding 2: the QUICKSTART's first command on a fresh machine: one line, the cause once,
/// and a hint (it printed "No such file or directory" twice).
#[test]
fn a_missing_state_directory_is_one_line_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("var/lib/relay/relay.db");
    let out = relay(dir.path())
        .args(["user", "add", "cam-1", "--password-stdin", "--db"])
        .arg(&db)
        .write_stdin("long enough pw")
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("mkdir"), "no hint in: {err}");
}

/// Finding 6: an error's cause is printed once ("file is not a database: file is not a
/// database: …" before).
#[test]
fn causes_are_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("garbage.db");
    std::fs::write(&db, vec![b'x'; 4096]).unwrap();
    std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = relay(dir.path())
        .args(["user", "list", "--db"])
        .arg(&db)
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("relay: error: "), "{err}");
    assert_eq!(last.matches("file is not a database").count(), 1, "{err}");
}

/// Finding 6: `serve --help` names the config key of each flag that has one, and the
/// documented keys are the real ones.
#[test]
fn serve_help_and_config_keys_agree() {
    let help = relay(Path::new("."))
        .args(["serve", "--help"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let help = String::from_utf8(help).unwrap();
    assert!(!help.contains("of the same name"), "{help}");
    let doc = std::fs::read_to_string(repo_root().join("docs/relay-host-config.md")).unwrap();
    for flag in help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
    {
        if ["help", "version", "config", "no-splice", "quiet", "verbose"].contains(&flag) {
            continue;
        }
        let key = flag.replace('-', "_");
        assert!(
            help.contains(&format!("config key `{key}`")),
            "--{flag}: no config key named in serve --help"
        );
        assert!(
            doc.contains(&format!("{key} = ")),
            "--{flag}: key {key} not in docs/relay-host-config.md"
        );
    }
}

/// Finding 7: `--listen PORT` and `--listen HOST:PORT` with a host name are accepted.
#[test]
fn listen_takes_a_port_or_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    for listen in ["8080", "localhost:8080"] {
        relay(dir.path())
            .args([
                "connect",
                "--server",
                "127.0.0.1",
                "--user",
                "me",
                "--plain",
            ])
            .args(["cam/ssh", "--listen", listen, "--help"])
            .assert()
            .success();
        // `serve` gets past parsing (exit 1, not clap's 2) to the store it cannot open.
        relay(dir.path())
            .args(["serve", "--db"])
            .arg(dir.path().join("none/relay.db"))
            .args(["--listen", listen])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("none/relay.db"));
    }
}

/// Finding 7: the README's `cargo run … serve` leaves its store and key in the repository
/// root: they are ignored by git.
#[test]
fn the_readme_run_leaves_nothing_for_git() {
    let root = repo_root();
    for file in [
        "relay.db",
        "relay.db-wal",
        "relay-cert.pem",
        "relay-key.pem",
    ] {
        let ignored = std::process::Command::new("git")
            .args(["check-ignore", "-q", file])
            .current_dir(&root)
            .status()
            .expect("git");
        assert!(ignored.success(), "{file} is not git-ignored");
    }
}

/// Conventions: completions and a man page generated from the clap definitions, and
/// `relay user list --json`.
#[test]
fn completions_man_page_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let bash = relay(dir.path())
        .args(["completions", "bash"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let bash = String::from_utf8(bash).unwrap();
    assert!(
        bash.contains("complete -F") && bash.contains("expose"),
        "{bash}"
    );
    relay(dir.path())
        .arg("man")
        .assert()
        .success()
        .stdout(predicate::str::starts_with(".ie").or(predicate::str::contains(".TH relay")));

    let db = dir.path().join("relay.db");
    relay(dir.path())
        .args(["user", "add", "cam-1", "--password-stdin", "--db"])
        .arg(&db)
        .write_stdin("long enough pw")
        .assert()
        .success();
    relay(dir.path())
        .args(["user", "allow", "cam-1", "--targets", "laptop", "--db"])
        .arg(&db)
        .assert()
        .success();
    let out = relay(dir.path())
        .args(["user", "list", "--json", "--db"])
        .arg(&db)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(rows[0]["name"], "cam-1");
    assert_eq!(rows[0]["may_reach"], serde_json::json!(["laptop"]));
    assert!(rows[0]["created"].as_str().unwrap().ends_with('Z'));
}
