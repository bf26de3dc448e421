//! `distrocache`: the command-line client. Everything lives in the library
//! (`distrocache_cli`); this only hands it the arguments and the exit code.

fn main() -> std::process::ExitCode {
    distrocache_cli::main_with(std::env::args_os())
}
