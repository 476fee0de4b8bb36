//! The `runtime` binary: parses the command line and dispatches.

mod check;
mod cli;
mod config;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Command::Check(args)) => {
            check::run(&args.config, args.deny_warnings, args.no_environment)
        }
        _ => {
            eprintln!("not yet wired");
            ExitCode::FAILURE
        }
    }
}
