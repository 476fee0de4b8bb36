//! The command line: `runtime [run] --config FILE`, `runtime check`, `runtime tree`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default config file, relative to the working directory.
pub const DEFAULT_CONFIG: &str = "config/actors.toml";

/// Actor-based supervision runtime: one supervised process per node, Redis as the broker.
#[derive(Debug, Parser)]
#[command(
    name = "runtime",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a subcommand the node runs (`runtime --config FILE`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, accepted without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (the default).
    Run(RunArgs),
    /// Compile a config and print every error and warning (exit 78 on errors).
    Check(CheckArgs),
    /// Print the supervision tree of a running node.
    Tree(TreeArgs),
}

/// `runtime run`
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Config file.
    #[arg(long, short, env = "RT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Log line format (filter with RUST_LOG, e.g. `RUST_LOG=info,actors=debug`).
    #[arg(long, value_enum, env = "RT_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `runtime check`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config file.
    #[arg(long, short, env = "RT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Exit 78 on warnings too.
    #[arg(long)]
    pub deny_warnings: bool,
    /// Skip the checks that look outside the file (environment variables, broker reachability).
    #[arg(long)]
    pub no_environment: bool,
}

/// `runtime tree`
#[derive(Debug, Args)]
pub struct TreeArgs {
    /// Base URL of the node's HTTP server.
    #[arg(long, env = "RT_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Print the JSON tree instead of the text rendering.
    #[arg(long)]
    pub json: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
