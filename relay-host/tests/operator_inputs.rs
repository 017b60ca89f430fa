//! Issue 11, finding 7: weak operator inputs were accepted silently: a one-character
//! password, `relay user allow --targets` naming no account, a password file that other
//! users can read.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;

fn relay_user(db: &Path) -> Command {
    let mut cmd = Command::cargo_bin("relay").unwrap();
    cmd.env_remove("RUST_LOG").args(["user", "--db"]).arg(db);
    cmd
}

#[test]
fn finding7_a_short_password_is_refused_with_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    for sub in [&["add", "cam"][..], &["passwd", "cam"]] {
        relay_user(&db)
            .args(sub)
            .arg("--password-stdin")
            .write_stdin("x\n")
            .assert()
            .failure()
            .stderr(predicate::str::contains(
                "the password has 1 character; at least 8 are required",
            ));
        if sub[0] == "add" {
            relay_user(&db)
                .args(["add", "cam", "--password-stdin"])
                .write_stdin("12345678\n")
                .assert()
                .success();
        }
    }
}

#[test]
fn finding7_allow_warns_about_targets_that_are_no_account() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    for name in ["me", "cam"] {
        relay_user(&db)
            .args(["add", name, "--password-stdin"])
            .write_stdin("long enough")
            .assert()
            .success();
    }
    relay_user(&db)
        .args(["allow", "me", "--targets", "cam,nosuch"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "warning: no account named 'nosuch' (yet)",
        ))
        .stderr(predicate::str::contains("'cam'").not());
}

#[test]
fn finding7_a_password_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        Command::cargo_bin("relay")
            .unwrap()
            .env("RELAY_SERVER", "127.0.0.1:1")
            .env("RELAY_USER", "me")
            .args(["online", "--plain", "--password-file"])
            .arg(&pw)
            // Before the fix it tried to connect (and retried forever).
            .timeout(Duration::from_secs(10))
            .assert()
            .failure()
            .stderr(predicate::str::contains(format!(
                "is open to other users (mode {mode:o}); chmod 600 it"
            )));
    }
}
