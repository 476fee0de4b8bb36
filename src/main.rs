//! The `runtime` binary: parses the command line and dispatches (see the `runtime` library).

use std::process::ExitCode;

use clap::Parser;
use runtime::cli::{Cli, Command, RunArgs};
use runtime::{check, client, config, node, shutdown, telemetry};
use tracing::{error, info, warn};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Check(args)) => {
            check::run(&args.config, args.deny_warnings, args.no_environment).await
        }
        Some(Command::Inspect(args)) => report(client::inspect::run(args).await),
        Some(Command::Tree(args)) => report(client::tree(args).await),
        Some(Command::Enqueue(args)) => ended(client::enqueue(args).await),
        Some(Command::Result(args)) => ended(client::result(args).await),
        Some(Command::Revoke(args)) => report(client::revoke(args).await),
        Some(Command::Dlq(command)) => report(client::dlq(command).await),
        Some(Command::Purge(args)) => report(client::purge(args).await),
        Some(Command::Nodes(args)) => report(client::nodes(args).await),
        Some(Command::Pools(command)) => report(client::pools(command).await),
        Some(Command::Chaos(command)) => report(client::chaos::run(command).await),
    }
}

/// Exit 0 on success; 69 (`EX_UNAVAILABLE`) when the node could not be reached; 1 for any
/// other error (the node refused, answered unhealthy, bad arguments).
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<client::Unreachable>().is_some() {
                ExitCode::from(client::EX_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `result` and `enqueue --wait`: the exit status says how the task ended (0 succeeded, 3
/// dead, 75 not yet); an error is reported as by [`report`].
fn ended(result: anyhow::Result<client::Ended>) -> ExitCode {
    match result {
        Ok(ended) => ExitCode::from(ended.exit_status()),
        Err(err) => report(Err(err)),
    }
}

async fn run(args: RunArgs) -> ExitCode {
    telemetry::init(args.log_format);
    let mut signals = match shutdown::Signals::register() {
        Ok(signals) => signals,
        Err(err) => {
            error!(error = %err, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(err) => {
            error!("{}: invalid config:\n{err}", args.config.display());
            return ExitCode::from(check::EX_CONFIG);
        }
    };
    for warning in &loaded.warnings {
        warn!("{}: {warning}", args.config.display());
    }
    info!(config = %args.config.display(), version = env!("CARGO_PKG_VERSION"), "starting node");
    let shutdown = async move {
        let name = signals.recv().await;
        signals.exit_on_second();
        name
    };
    node::run(loaded.config, shutdown).await
}
