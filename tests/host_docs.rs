//! Docs that cannot drift: docs/QUICKSTART.md's command blocks run as written (loopback
//! ports and a temporary root substituted) and print what the page shows; the systemd
//! units start what the install blocks installed.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn quickstart() -> String {
    std::fs::read_to_string(repo().join("docs/QUICKSTART.md")).unwrap()
}

/// The fenced block whose opening line is "```sh TAG", and the plain block after it (the
/// output the page shows), if the next block is one.
fn block(doc: &str, tag: &str) -> (String, Option<String>) {
    let open = format!("```sh {tag}\n");
    let start = doc.find(&open).unwrap_or_else(|| panic!("no {open:?}")) + open.len();
    let end = start + doc[start..].find("```").unwrap();
    let rest = &doc[end + 3..];
    let shown = rest.find("```").and_then(|i| {
        let after = &rest[i + 3..];
        let body = after.strip_prefix('\n')?;
        Some(body[..body.find("```")?].to_owned())
    });
    (doc[start..end].to_owned(), shown)
}

/// `relay` on PATH as the binary the tests built.
fn path_with_relay() -> String {
    let bin = relay_bin();
    format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `script` with sh in its own process group, killed with everything it started when
/// the returned guard drops. Its output is read by threads from the start, so that a
/// process that outlives the kill (and keeps the pipes open) cannot hang the test, and its
/// temporary files go to `tmp` (`TMPDIR`), so that a failure can show them.
struct Script {
    child: std::process::Child,
    out: std::sync::mpsc::Receiver<(bool, String)>,
    tmp: tempfile::TempDir,
}

impl Script {
    fn run(script: &str) -> Script {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new("sh")
            .args(["-e", "-c", script])
            .current_dir(repo())
            .env("PATH", path_with_relay())
            .env("TMPDIR", tmp.path())
            .env_remove("RELAY_CONFIG")
            .env_remove("RELAY_DB")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let (tx, out) = std::sync::mpsc::channel();
        for (is_err, mut pipe) in [
            (
                false,
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            (true, Box::new(child.stderr.take().unwrap())),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut text = Vec::new();
                let _ = pipe.read_to_end(&mut text);
                let _ = tx.send((is_err, String::from_utf8_lossy(&text).into_owned()));
            });
        }
        Script { child, out, tmp }
    }

    /// Waits up to `4 T` for the script's end, stops what it left running, and returns
    /// (success, stdout, stderr). A script that did not end, or left a process holding its
    /// output after the kill, fails with what it printed so far and its temporary files.
    fn finish(mut self) -> (bool, String, String) {
        let started = std::time::Instant::now();
        let mut status = None;
        while status.is_none() && started.elapsed() < 4 * T {
            std::thread::sleep(Duration::from_millis(50));
            status = self.child.try_wait().unwrap();
        }
        self.stop_group();
        let (mut out, mut err) = (String::new(), String::new());
        for _ in 0..2 {
            match self.out.recv_timeout(T) {
                Ok((false, text)) => out = text,
                Ok((true, text)) => err = text,
                Err(_) => err.push_str("\n[a process kept the script's output open]"),
            }
        }
        if status.is_none() {
            err.push_str(&format!(
                "\n[the script did not end within {:?}]{}",
                4 * T,
                files_under(self.tmp.path())
            ));
        }
        (status.is_some_and(|s| s.success()), out, err)
    }

    /// Stops the script and every background job it started (its process group): SIGTERM,
    /// and SIGKILL for whatever is left a few seconds later.
    fn stop_group(&mut self) {
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !signal("-TERM") {
            return;
        }
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            // `kill -0` fails once no process of the group is left.
            if !signal("-0") {
                return;
            }
        }
        signal("-KILL");
    }
}

/// Every file under `dir` with its contents, for a failure message.
fn files_under(dir: &Path) -> String {
    let mut text = String::new();
    for entry in walk(dir) {
        let body = std::fs::read(&entry).unwrap_or_default();
        let body = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
        text.push_str(&format!("\n--- {}\n{body}", entry.display()));
    }
    text
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else if p.extension().is_none_or(|x| x != "db") {
            files.push(p);
        }
    }
    files
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stop_group();
        let _ = self.child.wait();
    }
}

/// Item 6: "Trying it on one machine" runs as written (its ports moved to free ones) and
/// prints what the page shows.
#[test]
fn quickstart_one_machine_block_prints_what_the_page_shows() {
    let (script, shown) = block(&quickstart(), "one-machine");
    let mut script = script;
    for port in ["7835", "8000", "8080"] {
        script = script.replace(port, &free_port().to_string());
    }
    assert!(
        !script.contains("0.0.0.0"),
        "the block binds every interface"
    );
    // The background jobs the page leaves running stop with the script's process group.
    let (ok, stdout, stderr) = Script::run(&script).finish();
    assert!(ok, "the block failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout, shown.expect("an output block after the commands"));
}

/// The install block rewritten for a temporary root: no useradd, systemctl or journalctl
/// (the test checks the units instead), no sudo, paths under `root`, and the password
/// prompts answered on standard input.
fn rooted(script: &str, root: &Path) -> String {
    let r = root.display().to_string();
    script
        .lines()
        .filter(|l| {
            !["sudo useradd", "sudo systemctl", "journalctl"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            let l = l
                .replace("sudo -u relay ", "")
                .replace("sudo ", "")
                .replace(" -o relay -g relay", "");
            let l = l
                .replace("/etc/", &format!("{r}/etc/"))
                .replace("/var/lib/relay", &format!("{r}/var/lib/relay"))
                .replace("/usr/local/share", &format!("{r}/usr/local/share"));
            match l.strip_prefix("relay user add ") {
                Some(rest) => {
                    let name = rest.split_whitespace().next().unwrap();
                    format!(
                        "echo 'the password of {name}' | relay user add {rest} --password-stdin"
                    )
                }
                None => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of `key=` in a unit file.
fn unit_key(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

/// Finding 2: the relay's install block works on a fresh machine (here a temporary root),
/// and docs/relay.service then starts the relay it installed; the device's block and
/// docs/relay-expose.service log the device in.
#[test]
fn install_blocks_and_units_work_as_written() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // What a fresh Debian machine has: systemd's unit directory.
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    let doc = quickstart();
    let (ok, out, err) = Script::run(&rooted(&block(&doc, "install-relay").0, r)).finish();
    assert!(ok, "install-relay failed:\n{out}\n{err}");

    let unit = std::fs::read_to_string(repo().join("docs/relay.service")).unwrap();
    let useradd = block(&doc, "install-relay").0;
    assert!(useradd.contains(&format!(
        "--user-group --home-dir /var/lib/relay --shell /usr/sbin/nologin {}",
        unit_key(&unit, "User")
    )));
    assert_eq!(unit_key(&unit, "Documentation"), "man:relay(1)");
    let man = std::fs::read_to_string(r.join("usr/local/share/man/man1/relay.1")).unwrap();
    assert!(man.contains("relay"), "{man}");
    assert!(
        r.join(unit_key(&unit, "WorkingDirectory").trim_start_matches('/'))
            .is_dir()
    );
    assert!(r.join("etc/systemd/system/relay.service").exists());

    let exec = unit_key(&unit, "ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/relay"));
    let port = free_port();
    let mut serve = Command::new(relay_bin());
    for w in words {
        serve.arg(w.replace("/etc/", &format!("{}/etc/", r.display())));
    }
    serve.args(["--listen", &format!("127.0.0.1:{port}")]);
    let relay = Proc::spawn("relay.service", serve);
    relay.wait_for("listening", T);
    let fingerprint = relay
        .log()
        .split("fingerprint=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(r.join("var/lib/relay/relay.db").exists());
    assert!(!relay.log().contains("no accounts"), "{}", relay.log());

    let (ok, out, err) = Script::run(&rooted(&block(&doc, "install-device").0, r)).finish();
    assert!(ok, "install-device failed:\n{out}\n{err}");
    let env_file = std::fs::read_to_string(r.join("etc/relay/expose.env")).unwrap();
    let expose_unit = std::fs::read_to_string(repo().join("docs/relay-expose.service")).unwrap();
    assert_eq!(
        unit_key(&expose_unit, "EnvironmentFile"),
        "/etc/relay/expose.env"
    );
    let exec = unit_key(&expose_unit, "ExecStart");
    let mut expose = Command::new(relay_bin());
    let mut args = Vec::new();
    for w in exec.split_whitespace().skip(1) {
        match w {
            "$RELAY_EXPOSE_ARGS" => {
                let line = env_file
                    .lines()
                    .find_map(|l| l.strip_prefix("RELAY_EXPOSE_ARGS="))
                    .unwrap();
                args.extend(line.split_whitespace().map(str::to_owned));
            }
            w => args.push(w.replace(
                "${CREDENTIALS_DIRECTORY}/password",
                &r.join("etc/relay/expose.password").display().to_string(),
            )),
        }
    }
    expose.args(&args);
    for line in env_file.lines() {
        let (k, v) = line.split_once('=').unwrap();
        match k {
            "RELAY_SERVER" => expose.env(k, format!("127.0.0.1:{port}")),
            "RELAY_FINGERPRINT" => expose.env(k, &fingerprint),
            "RELAY_EXPOSE_ARGS" => &mut expose,
            _ => expose.env(k, v),
        };
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(r.join("etc/relay/expose.password"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let device = Proc::spawn("relay-expose.service", expose);
    device.wait_for("logged in to the relay", T);
    assert!(
        device.log().contains("ssh=127.0.0.1:22"),
        "{}",
        device.log()
    );
    let _ = std::io::stderr().flush();
}

/// Item 6: README's "Run the relay" block (the binary the tests built in place of `cargo
/// run`, a loopback port, a temporary directory as the current one) does what the README
/// says: a fingerprint, the hint to add an account, `relay.db` created 0600 beside the
/// generated certificate and key.
#[test]
fn readme_run_block_does_what_it_says() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("## Run the relay").unwrap();
    let (script, _) = block(
        &format!(
            "```sh x\n{}",
            &readme[start..].split_once("```sh\n").unwrap().1
        ),
        "x",
    );
    let line = script.trim();
    let args = line
        .strip_prefix("cargo run --release -p relay-host --bin relay -- ")
        .expect("the README runs the relay with cargo run");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(relay_bin());
    cmd.args(args.split_whitespace())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .current_dir(dir.path());
    let mut relay = Proc::spawn("README relay", cmd);
    relay.wait_for("listening", T);
    let log = relay.log();
    assert!(
        log.contains("fingerprint=") && log.contains("relay user add NAME"),
        "{log}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("relay.db"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    for file in ["relay-cert.pem", "relay-key.pem"] {
        assert!(dir.path().join(file).exists(), "{file}");
        assert!(readme.contains(file), "README does not name {file}");
    }
    relay.signal("-TERM");
    let (ok, log) = relay.wait_exit(T);
    assert!(ok, "{log}");
}
