//! The `relay` binary: parses the command line, sets up logging, runs the command, and turns
//! an error into one line on standard error and exit status 1.

use std::process::ExitCode;

use clap::Parser;
use relay_host::cli::{Cli, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to standard error: `relay connect --stdio` owns standard output. RUST_LOG
    // overrides the default level.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person watching: log files and test harnesses get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain on one line: "what failed: why".
            eprintln!("relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
