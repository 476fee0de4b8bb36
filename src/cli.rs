//! The command line: `runtime [run] --config FILE`, `runtime check`, and the commands that
//! talk to a running node over HTTP: `inspect` (`tree`, `queues`, `active`, `stats`, `ping`,
//! `events`), `tree` (short for `inspect tree`), `enqueue`, `result`, `revoke`, `dlq`, `purge`,
//! `nodes`, `pools`, `chaos`.

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
    /// Look at a running node: tree, queues, active tasks, stats, ping, events.
    Inspect(InspectArgs),
    /// Print the supervision tree of a running node (short for `inspect tree`).
    Tree(TreeArgs),
    /// Enqueue a task through a running node (with `--wait`, print its result when it ends).
    Enqueue(EnqueueArgs),
    /// Print a task's state and result (with `--wait`, once it has ended). Exit 0 succeeded, 3
    /// dead (failed for good, or revoked), 75 not ended (or `--wait` timed out).
    Result(ResultArgs),
    /// Revoke a task: queued or delayed, it never runs; running, `--terminate` stops it.
    Revoke(RevokeArgs),
    /// List or requeue a queue's dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Drop every ready and delayed entry of a queue (running tasks finish).
    Purge(PurgeArgs),
    /// The nodes consuming from the node's broker: queues, entries held, started, last seen.
    Nodes(NodesArgs),
    /// Act on a running node's process pools.
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// Kill actors of a running node (needs `[chaos] enabled = true`) and report when its
    /// tree is whole again.
    #[command(subcommand)]
    Chaos(ChaosCommand),
}

/// `runtime chaos …`
#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Kill one actor by path, or a random one of a kind, once or every `--every` for `--for`.
    Kill(ChaosKillArgs),
}

/// `runtime chaos kill [PATH] [--kind KIND] [--every D --for D] [--seed N]`
#[derive(Debug, Args)]
pub struct ChaosKillArgs {
    /// The actor to kill (`root/queues/chat` or `queues/chat`), or a running task
    /// (`root/queues/chat/<task id>`). Exclusive with `--kind`.
    #[arg(required_unless_present = "kind", conflicts_with = "kind")]
    pub path: Option<String>,
    /// Kill a random actor of this kind (a `kind` of `/actors`: `consumer`, `broker`,
    /// `resource` kinds such as `zep`, `pool`, `scheduler`, `heartbeat`, `supervisor`; or
    /// `agent`: SIGKILL a random pool agent process, which must run on this machine; or
    /// `task`: kill a random running task's actor through its consumer — the attempt counts
    /// as a retryable failure, an `exec` command's process group is SIGKILLed). The root is
    /// never picked. With `--every`, a moment with no task running skips that kill.
    #[arg(long)]
    pub kind: Option<String>,
    /// Kill again at this interval (`100ms`, `1s`); needs `--for`.
    #[arg(long, value_parser = humantime::parse_duration, requires = "duration")]
    pub every: Option<std::time::Duration>,
    /// How long to keep killing with `--every` (`10s`).
    #[arg(long = "for", id = "duration", value_parser = humantime::parse_duration, requires = "every")]
    pub duration: Option<std::time::Duration>,
    /// Seed of the random picks (the same seed picks the same sequence on the same tree).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Longest wait for the tree to be whole again after the last kill (exit 1 past it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub whole_timeout: std::time::Duration,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime pools …`
#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// Take a `fatal` (or backing-off) pool out of that state once its cause is fixed: it
    /// starts agents again at once. A healthy pool is left alone.
    Reset(PoolResetArgs),
}

/// `runtime pools reset NAME`
#[derive(Debug, Args)]
pub struct PoolResetArgs {
    /// The pool, as named under `[pools.NAME]`.
    pub name: String,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime nodes`
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Print the JSON answer of `GET /nodes` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
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
    /// Run no sooner than this many seconds from now (at most 365 days).
    #[arg(long, conflicts_with = "eta", value_parser = countdown)]
    pub countdown: Option<f64>,
    /// Run no sooner than this time (RFC 3339).
    #[arg(long)]
    pub eta: Option<String>,
    /// A second enqueue with the same key returns the first task's id.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The task's id (a UUID is generated otherwise): at most 256 bytes, no control
    /// characters; while a task with this id is queued, running, or ended less than
    /// `broker.result_ttl` ago, the enqueue is a duplicate and nothing runs again.
    #[arg(long)]
    pub id: Option<String>,
    /// After printing the id, wait until the task ends and print its state and result (exit
    /// status as `runtime result`).
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with `--wait` (exit 75 past it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", requires = "wait")]
    pub timeout: std::time::Duration,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime result ID [--wait [--timeout D]] [--json]`
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The task id (as `enqueue` printed it).
    pub id: String,
    /// Wait until the task has ended (succeeded or dead).
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with `--wait` (exit 75 past it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", requires = "wait")]
    pub timeout: std::time::Duration,
    /// Print the record as JSON (`GET /tasks/{id}`) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime revoke ID [--terminate]`
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The task id.
    pub id: String,
    /// Also stop it if it runs: the soft signal at once, the hard stop after
    /// `runtime.terminate_grace`.
    #[arg(long)]
    pub terminate: bool,
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

/// `runtime inspect …`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// What to look at.
    #[command(subcommand)]
    pub what: InspectCommand,
    /// Base URL of the node's HTTP server.
    #[arg(
        long,
        env = "RT_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub url: String,
    /// Print JSON for scripts instead of tables (`events`: one event per line).
    #[arg(long, global = true)]
    pub json: bool,
}

/// `runtime inspect` subcommands.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// The supervision tree: status, restarts, uptime and last error of every actor.
    Tree,
    /// Every queue's depths (ready, delayed, in flight, dead) and its running tasks.
    Queues,
    /// The tasks running on the node right now, with their elapsed time.
    Active,
    /// Per queue: tasks processed, failed, retried and dead-lettered on this node, and depths.
    Stats,
    /// Whether the node answers and is healthy (exit 1 when it is not).
    Ping,
    /// The latest events; with `--follow`, new ones as they happen.
    Events(EventsArgs),
}

/// `runtime inspect events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    /// Only these kinds, comma-separated (`started,succeeded`; `actor_` or `pool_*` for
    /// prefixes).
    #[arg(long)]
    pub types: Option<String>,
    /// How many of the latest events to print first (at most 1000).
    #[arg(long, short = 'n', default_value_t = 20)]
    pub limit: usize,
    /// Start after this event id instead of with the latest events (`0`: the oldest kept).
    #[arg(long)]
    pub after: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--countdown`: seconds ≥ 0 within the cap on delays (`actors::caps::MAX_DELAY`), refused
/// here rather than sent — `inf` or `NaN` has no JSON form and would arrive as no countdown.
fn countdown(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|e| format!("`{text}` is not a number of seconds: {e}"))?;
    actors::caps::checked(secs, actors::caps::Unit::Seconds, actors::caps::MAX_DELAY)
        .map_err(|e| e.to_string())?;
    Ok(secs)
}
