//! The `relay` binary: parses the command line, sets up logging, runs the command, and turns
//! an error into one line on standard error and exit status 1.

use std::process::ExitCode;

use relay_host::cli::{Cli, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::parse_with_client_config(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("relay: error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    // Logs go to standard error: `relay connect --stdio` owns standard output. RUST_LOG
    // overrides the level the command and -q/-v chose.
    let level = cli.log_level();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.as_str().to_ascii_lowercase()))
        // tokio-postgres logs each query's parameters at debug: password hashes and the
        // token key among them. Never, whatever RUST_LOG says.
        .add_directive(
            "tokio_postgres::query=info"
                .parse()
                .expect("a valid directive"),
        );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person watching: log files and test harnesses get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// "what failed: why: deeper why" on one line. A cause whose text its parent already
/// quotes (thiserror's `"…: {source}"` with `#[source]`) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
