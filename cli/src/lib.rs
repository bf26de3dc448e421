//! The `distrocache` command-line client: argument parsing ([`args`]), the
//! commands run through the ring-aware `distrocache-client` ([`commands`],
//! [`bench`]) and their printing ([`table`]). Every failure ends here as
//! one line on stderr and exit status 1; clap's usage errors exit 2.

pub mod args;
pub mod bench;
pub mod commands;
pub mod table;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Runs the CLI on `args` (the program name first) and returns the exit
/// status.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match args::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined, no backtrace.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::from(1)
        }
    }
}
