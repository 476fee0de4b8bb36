//! The `runtime` binary: parses the command line and dispatches (see the `runtime` library).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use actors::handler::native::Natives;
use clap::Parser;
use runtime::cli::{Cli, Command, RunArgs};
use runtime::node::{Node, NodeError};
use runtime::{check, client, config, shutdown, telemetry};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// jemalloc instead of glibc's malloc: a task's path allocates and frees many small buffers
/// (envelopes, commands, replies) across threads, where glibc's allocator spent a quarter of
/// the node's CPU in a drain (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    let bind = loaded.config.http.bind;
    let listener = match TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(err) => {
            error!(bind = %bind, error = %err, "cannot listen (http.bind)");
            return ExitCode::FAILURE;
        }
    };
    let node = match Node::start(loaded.config, Natives::builtin(), listener).await {
        Ok(node) => node,
        Err(err) => return exit_code(&err),
    };
    info!("http listening on http://{}", node.addr());
    if let Some(path) = &args.address_file
        && let Err(err) = write_address(path, node.addr())
    {
        error!(path = %path.display(), error = %err, "cannot write the address file (--address-file)");
        return ExitCode::FAILURE;
    }
    let shutdown = async move {
        let name = signals.recv().await;
        signals.exit_on_second();
        name
    };
    match node.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit_code(&err),
    }
}

/// A node's error (already logged by the node) as its exit code: 78 (`EX_CONFIG`) for what
/// the config asks and this binary cannot build, 1 for the rest.
fn exit_code(err: &NodeError) -> ExitCode {
    match err {
        NodeError::Config(_) => ExitCode::from(check::EX_CONFIG),
        _ => ExitCode::FAILURE,
    }
}

/// Writes `addr` and a newline to `path`, through a file beside it renamed into place, so a
/// reader never sees it half written.
fn write_address(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    std::fs::write(&aside, format!("{addr}\n"))?;
    std::fs::rename(&aside, path)
}
