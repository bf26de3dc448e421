//! The `distrocache` command-line client: argument parsing ([`args`]), the
//! commands run through the ring-aware `distrocache-client` ([`commands`],
//! [`bench`]) and their printing ([`table`]); installed as
//! `kubectl-distrocache`, the kubectl plugin ([`plugin`]). Every failure ends here as
//! one line on stderr and exit status 1; clap's usage errors exit 2.

pub mod args;
pub mod bench;
pub mod commands;
pub mod plugin;
pub mod table;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Runs the CLI on `args` (the program name first) and returns the exit
/// status. Started as `kubectl-distrocache` (by its file name), it is the
/// kubectl plugin ([`plugin`]).
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    if args
        .first()
        .is_some_and(|argv0| plugin::invoked_as_plugin(argv0))
    {
        return match plugin::PluginCli::try_parse_from(args) {
            Ok(cli) => block_on(plugin::run(cli)),
            Err(e) => usage(e),
        };
    }
    match args::Cli::try_parse_from(args) {
        Ok(cli) => block_on(commands::run(cli)),
        Err(e) => usage(e),
    }
}

/// clap's answer: help or version (exit 0), or a usage error (exit 2).
fn usage(e: clap::Error) -> ExitCode {
    let code = if e.use_stderr() { 2 } else { 0 };
    let _ = e.print();
    ExitCode::from(code)
}

/// Runs a command to its end: success, or one line on stderr and exit 1.
fn block_on(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
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
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined, no backtrace.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::from(1)
        }
    }
}
