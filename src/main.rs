//! The `runtime` binary: parses the command line and dispatches (see the `runtime` library).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use runtime::cli::{Cli, Command, RunArgs, TreeArgs};
use runtime::{check, config, node, shutdown, telemetry};
use tracing::{error, info, warn};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Check(args)) => {
            check::run(&args.config, args.deny_warnings, args.no_environment)
        }
        Some(Command::Tree(args)) => match tree(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
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

async fn tree(args: TreeArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let url = if args.json {
        format!("{base}/actors")
    } else {
        format!("{base}/actors?format=text")
    };
    let response = reqwest::get(&url)
        .await
        .with_context(|| format!("cannot reach the node at {base}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {body}");
    }
    print!("{body}");
    Ok(())
}
