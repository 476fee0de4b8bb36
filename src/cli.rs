//! The command line: `runtime [run] --config FILE`, `runtime check`, and the commands that
//! talk to a running node over HTTP: `inspect` (`tree`, `queues`, `active`, `stats`, `ping`,
//! `events`), `tree` (short for `inspect tree`), `enqueue`, `result`, `revoke`, `dlq`, `purge`,
//! `nodes`, `pools`, `chaos`.
//!
//! Every command's help ends with `Examples:`, lines that start with `runtime` and that the
//! parser accepts (tests/it/help.rs runs `--help` of each command and parses its examples).

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
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  runtime --config config/actors.toml
  runtime check --config config/actors.toml
  runtime enqueue rt_echo --args '[\"hello\"]'
  runtime inspect queues"
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
    #[command(after_help = "Examples:
  runtime run --config config/actors.toml
  runtime run --config config/actors.toml --log-format json")]
    Run(RunArgs),
    /// Compile a config and print every error and warning (exit 78 on errors).
    ///
    /// Reports every mistake in one run: unknown keys, wrong types and missing required
    /// keys (with "did you mean" for a misspelt key), then what the values mean (limits,
    /// references to queues, tasks, resources and pools, with "did you mean" for a
    /// misspelt name), each named by its key path. Then, unless --no-environment, the
    /// environment: secrets, RT_BROKER_URL, and whether the broker answers.
    #[command(after_help = "Examples:
  runtime check --config config/actors.toml
  runtime check --config config/actors.toml --no-environment --deny-warnings")]
    Check(CheckArgs),
    /// Look at a running node: tree, queues, active tasks, stats, ping, events.
    #[command(after_help = "Examples:
  runtime inspect queues
  runtime inspect active --json
  runtime inspect events --follow --url http://127.0.0.1:7070")]
    Inspect(InspectArgs),
    /// Print the supervision tree of a running node (short for `inspect tree`).
    #[command(after_help = "Examples:
  runtime tree
  runtime tree --json --url http://127.0.0.1:7070")]
    Tree(TreeArgs),
    /// Enqueue a task through a running node (with `--wait`, print its result when it ends).
    #[command(after_help = "Examples:
  runtime enqueue rt_echo --args '[\"hello\"]' --wait
  runtime enqueue process_chat_message --kwargs '{\"message_id\": 42}' --countdown 30
  runtime enqueue send_digest --id digest:2026-11-23 --idempotency-key digest:2026-11-23")]
    Enqueue(EnqueueArgs),
    /// Print a task's state and result (with `--wait`, once it has ended). Exit 0 succeeded, 3
    /// dead (failed for good, or revoked), 75 not ended (or `--wait` timed out).
    #[command(after_help = "Examples:
  runtime result 0b9c5d1e-6f7a-4b8c-9d0e-1f2a3b4c5d6e
  runtime result digest:2026-11-23 --wait --timeout 2m --json")]
    Result(ResultArgs),
    /// Revoke a task: queued or delayed, it never runs; running, `--terminate` stops it.
    #[command(after_help = "Examples:
  runtime revoke 0b9c5d1e-6f7a-4b8c-9d0e-1f2a3b4c5d6e
  runtime revoke digest:2026-11-23 --terminate")]
    Revoke(RevokeArgs),
    /// List or requeue a queue's dead letters.
    #[command(
        subcommand,
        after_help = "Examples:
  runtime dlq list chat
  runtime dlq requeue chat --limit 10"
    )]
    Dlq(DlqCommand),
    /// Drop every ready and delayed entry of a queue (running tasks finish).
    #[command(after_help = "Examples:
  runtime purge background --yes")]
    Purge(PurgeArgs),
    /// The nodes consuming from the node's broker: state (running, draining, stopping),
    /// queues, entries held, started, last seen.
    #[command(after_help = "Examples:
  runtime nodes
  runtime nodes --json")]
    Nodes(NodesArgs),
    /// Act on a running node's process pools.
    #[command(
        subcommand,
        after_help = "Examples:
  runtime pools reset voice"
    )]
    Pools(PoolsCommand),
    /// Kill actors of a running node (needs `[chaos] enabled = true`) and report when its
    /// tree is whole again.
    #[command(
        subcommand,
        after_help = "Examples:
  runtime chaos kill root/queues/chat
  runtime chaos kill --kind consumer --every 1s --for 30s --seed 7"
    )]
    Chaos(ChaosCommand),
}

/// `runtime chaos …`
#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Kill one actor by path, or a random one of a kind, once or every `--every` for `--for`.
    #[command(after_help = "Examples:
  runtime chaos kill root/queues/chat
  runtime chaos kill --kind task --every 500ms --for 10s")]
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
    #[command(after_help = "Examples:
  runtime pools reset voice --token \"$RT_ADMIN_TOKEN\"")]
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
    /// Print a queue's oldest dead letters: time, task, attempts, id, reason.
    #[command(after_help = "Examples:
  runtime dlq list chat
  runtime dlq list chat --limit 5 --json")]
    List(DlqListArgs),
    /// Move dead letters back to the ready queue, oldest first (attempts reset; malformed
    /// ones stay).
    #[command(after_help = "Examples:
  runtime dlq requeue chat
  runtime dlq requeue chat --limit 10 --json")]
    Requeue(DlqRequeueArgs),
}

/// `runtime dlq list QUEUE`
#[derive(Debug, Args)]
pub struct DlqListArgs {
    /// Queue name.
    pub queue: String,
    /// How many dead letters to print, oldest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print the node's JSON answer (`GET /dlq/QUEUE`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The node.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `runtime dlq requeue QUEUE`
#[derive(Debug, Args)]
pub struct DlqRequeueArgs {
    /// Queue name.
    pub queue: String,
    /// How many dead letters to move back, oldest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print the node's JSON answer (`{"queue", "requeued"}`) instead of a sentence.
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
    /// Once the node serves HTTP, write its address (`IP:PORT`, then a newline) to this file:
    /// how a script or a test learns the port the system chose for `http.bind` port 0. The
    /// file appears whole (written aside, then renamed).
    #[arg(long, env = "RT_ADDRESS_FILE", value_name = "PATH")]
    pub address_file: Option<PathBuf>,
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
    /// Check the file alone: read no environment variable (RT_BROKER_URL is not applied,
    /// secrets and the admin token are not looked up) and do not connect to the broker.
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
    /// Print JSON for scripts instead of the text for people.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `runtime inspect` subcommands.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// The supervision tree: status, restarts, uptime and last error of every actor.
    ///
    /// With --json: the `GET /actors` tree.
    #[command(after_help = "Examples:
  runtime inspect tree
  runtime inspect tree --json")]
    Tree,
    /// Every queue's depths (ready, delayed, in flight, dead) and its running tasks.
    ///
    /// With --json: `{"queues": [{"queue", "ready", "delayed", "in_flight", "dead",
    /// "running", "waiting", "concurrency"}]}`.
    #[command(after_help = "Examples:
  runtime inspect queues
  runtime inspect queues --json")]
    Queues,
    /// The tasks running on the node right now, with their elapsed time.
    ///
    /// Longest-running first. With --json: `{"active": [{"queue", "id", "task", "attempt",
    /// "elapsed_ms", "deadline_in_ms"}]}`.
    #[command(after_help = "Examples:
  runtime inspect active
  runtime inspect active --json")]
    Active,
    /// Per queue: tasks processed, failed, retried and dead-lettered on this node, and depths.
    ///
    /// Counted since the node started. With --json: `{"queues": [{"queue", "processed",
    /// "succeeded", "failed", "retried", "dead_lettered", "deferred", "running", "ready",
    /// "delayed", "in_flight", "dead"}]}`.
    #[command(after_help = "Examples:
  runtime inspect stats
  runtime inspect stats --json")]
    Stats,
    /// Whether the node answers and is healthy (exit 1 when it is not).
    ///
    /// With --json: `{"url", "healthy", "status", "latency_ms", "problems"}`.
    #[command(after_help = "Examples:
  runtime inspect ping
  runtime inspect ping --url http://10.0.0.7:7070")]
    Ping,
    /// The latest events; with `--follow`, new ones as they happen.
    ///
    /// One line per event: time, kind, what it is about, details. With --json: one event
    /// per line, exactly the `data` of the `GET /events` stream.
    #[command(after_help = "Examples:
  runtime inspect events -n 50
  runtime inspect events --follow --types retried,dead
  runtime inspect events --after 0 --json")]
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
