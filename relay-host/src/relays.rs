//! The terminal's own config file: named relays, so that `relay connect cam-1/ssh` needs no
//! flags. `$XDG_CONFIG_HOME/relay/relays.toml` (else `~/.config/relay/relays.toml`), or
//! the file `RELAY_CLIENT_CONFIG` names:
//!
//! ```toml
//! default = "home"                     # optional when there is only one relay
//!
//! [relays.home]
//! server = "relay.example.org"         # --server (or a list: ["a.example", "b.example"])
//! fingerprint = "3A:9F:…:C4"           # --fingerprint (or ca = "/path/ca.pem", or plain = true)
//! user = "laptop"                      # --user
//! password_command = "pass show relay" # --password-command (or password_file = "…")
//! ```
//!
//! A relay's entries become the defaults of the terminal commands' flags, below flags and
//! the `RELAY_*` environment: a flag always wins. `--relay NAME` (or `RELAY_NAME`) picks
//! one relay; without it, `default`, or the only relay there is.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The relay used without `--relay`.
    pub default: Option<String>,
    /// Relays by name.
    #[serde(default)]
    pub relays: BTreeMap<String, RelayEntry>,
}

/// One named relay: each key is the default of the flag of the same name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayEntry {
    server: Servers,
    fingerprint: Option<String>,
    ca: Option<PathBuf>,
    #[serde(default)]
    plain: bool,
    user: Option<String>,
    password_file: Option<PathBuf>,
    password_command: Option<String>,
}

/// `server`: one address, or several (relays sharing one database), as `--server` takes
/// them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Servers {
    One(String),
    Several(Vec<String>),
}

impl Default for Servers {
    fn default() -> Self {
        Servers::One(String::new())
    }
}

impl Servers {
    /// The flag's value: a comma list.
    fn flag(&self) -> String {
        match self {
            Servers::One(s) => s.clone(),
            Servers::Several(list) => list.join(","),
        }
    }
}

/// Where the file is, if there is a place for it.
pub fn path() -> Option<PathBuf> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("RELAY_CLIENT_CONFIG") {
        return Some(p);
    }
    let base = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config")))?;
    Some(base.join("relay").join("relays.toml"))
}

impl ClientFile {
    /// Reads `path`; a file that does not exist is an empty configuration.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("client config {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("client config {}", path.display()))
    }

    /// The relay `name` names, else the default one, else the only one.
    fn pick(&self, name: Option<&str>) -> anyhow::Result<Option<&RelayEntry>> {
        let name = match name.or(self.default.as_deref()) {
            Some(n) => n,
            None if self.relays.len() == 1 => return Ok(self.relays.values().next()),
            None => return Ok(None),
        };
        match self.relays.get(name) {
            Some(r) => Ok(Some(r)),
            None => bail!("no relay named '{name}' in the client config"),
        }
    }
}

/// `--relay NAME` or `--relay=NAME` in `argv`, else `RELAY_NAME`: needed before clap runs,
/// since it decides clap's defaults.
fn named_relay(argv: &[OsString]) -> Option<String> {
    let mut args = argv.iter().filter_map(|a| a.to_str());
    while let Some(a) = args.next() {
        if a == "--" {
            break;
        }
        if a == "--relay" {
            return args.next().map(str::to_owned);
        }
        if let Some(v) = a.strip_prefix("--relay=") {
            return Some(v.to_owned());
        }
    }
    std::env::var("RELAY_NAME").ok().filter(|v| !v.is_empty())
}

/// The `relay` command with the chosen relay's entries as flag defaults.
pub fn with_defaults(
    mut cmd: clap::Command,
    file: &ClientFile,
    argv: &[OsString],
) -> anyhow::Result<clap::Command> {
    let Some(relay) = file.pick(named_relay(argv).as_deref())? else {
        return Ok(cmd);
    };
    let mut defaults = vec![("server", relay.server.flag())];
    let text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    for (id, value) in [
        ("fingerprint", relay.fingerprint.clone()),
        ("ca", text(&relay.ca)),
        ("user", relay.user.clone()),
        ("password_file", text(&relay.password_file)),
        ("password_command", relay.password_command.clone()),
    ] {
        defaults.extend(value.map(|v| (id, v)));
    }
    if relay.plain {
        defaults.push(("plain", "true".to_owned()));
    }
    for sub in ["expose", "connect", "online"] {
        for (id, value) in &defaults {
            cmd = cmd.mut_subcommand(sub, |c| {
                c.mut_arg(*id, |a| a.default_value(value.clone()).required(false))
            });
        }
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ClientFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn picks_the_named_the_default_or_the_only_relay() {
        let two = file(
            "default = \"b\"\n[relays.a]\nserver = \"a.example\"\n[relays.b]\nserver = \"b.example\"\n",
        );
        assert_eq!(two.pick(None).unwrap().unwrap().server.flag(), "b.example");
        assert_eq!(
            two.pick(Some("a")).unwrap().unwrap().server.flag(),
            "a.example"
        );
        assert!(two.pick(Some("c")).is_err());
        let one = file("[relays.a]\nserver = \"a.example\"\n");
        assert_eq!(one.pick(None).unwrap().unwrap().server.flag(), "a.example");
        assert!(file("").pick(None).unwrap().is_none());
        assert!(toml::from_str::<ClientFile>("[relays.a]\nserver = \"x\"\nusr = \"u\"\n").is_err());
    }

    /// `server` takes a list, which becomes the addresses of `--server` in order.
    #[test]
    fn several_servers_become_the_flags_addresses() {
        use clap::{CommandFactory, FromArgMatches};
        let f = file("[relays.a]\nserver = [\"a.example\", \"b.example:99\"]\nplain = true\n");
        let argv: Vec<OsString> = ["relay", "online", "--user", "me"]
            .iter()
            .map(OsString::from)
            .collect();
        let cmd = with_defaults(crate::cli::Cli::command(), &f, &argv).unwrap();
        let cli = crate::cli::Cli::from_arg_matches(&cmd.get_matches_from(&argv)).unwrap();
        let crate::cli::Command::Online(args) = cli.command else {
            panic!("not online")
        };
        let servers: Vec<String> = args.terminal.server.iter().map(|s| s.to_string()).collect();
        assert_eq!(servers, ["a.example:7835", "b.example:99"]);
    }

    #[test]
    fn relay_flag_is_found_before_clap() {
        let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            named_relay(&argv(&["relay", "connect", "--relay", "x", "c/ssh"])),
            Some("x".into())
        );
        assert_eq!(
            named_relay(&argv(&["relay", "online", "--relay=y"])),
            Some("y".into())
        );
    }
}
