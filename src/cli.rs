//! The command line: `runtime [run] --config FILE`, `runtime check`, and the commands that
//! talk to a running node over HTTP: `tree`, `enqueue`, `dlq`, `purge`.

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
    /// Enqueue a task through a running node.
    Enqueue(EnqueueArgs),
    /// List or requeue a queue's dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Drop every ready and delayed entry of a queue (running tasks finish).
    Purge(PurgeArgs),
}

/// How to reach a running node.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Base URL of the node's HTTP server.
    #[arg(long, env = "RT_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token for mutating routes (the value behind the node's `http.admin_token_env`).
    #[arg(long, env = "RT_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `runtime enqueue`
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Task name, as defined under `[tasks.NAME]`.
    pub task: String,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Route to this (defined) queue instead of the task's own.
    #[arg(long)]
    pub queue: Option<String>,
    /// Run no sooner than this many seconds from now.
    #[arg(long, conflicts_with = "eta")]
    pub countdown: Option<f64>,
    /// Run no sooner than this time (RFC 3339).
    #[arg(long)]
    pub eta: Option<String>,
    /// A second enqueue with the same key returns the first task's id.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Print a queue's oldest dead letters.
    List(DlqArgs),
    /// Move dead letters back to the ready queue (attempts reset).
    Requeue(DlqArgs),
}

/// `runtime dlq list|requeue QUEUE`
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// Queue name.
    pub queue: String,
    /// How many.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print JSON instead of a table (list).
    #[arg(long)]
    pub json: bool,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime purge QUEUE --yes`
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queue name.
    pub queue: String,
    /// Confirm: purging cannot be undone.
    #[arg(long)]
    pub yes: bool,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
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
