//! Configuration: the TOML file → raw serde structs → one `compile()` → a validated [`Config`].
//!
//! # Layout
//! - `raw` — the file as written (serde, `deny_unknown_fields`, declaration order kept); its
//!   `///` comments are the user documentation of every key.
//! - `compile` — raw → [`Config`]: defaults, the limits precedence (task → queue → runtime,
//!   most specific wins), cross-references, environment; every error and warning in one pass.
//! - `duration` — `"120s"`-style durations.
//! - `diagnostic` — [`Diagnostic`]: one error or warning, named by its key path.
//!
//! Tables keyed by name (`queues`, `tasks`, …) are [`IndexMap`]s in declaration order, which
//! is the order the tree starts them in.
//!
//! The compiled types below are what the rest of the program reads. Secrets are resolved from
//! the environment at load time and never printed: the `Debug` of every type holding one
//! redacts it.
//!
//! Nothing in this module runs anything: queues, pools and schedules are data until the
//! actors that run them exist.

// The run path that reads most of these fields is wired separately; until then they are only
// read by `runtime check` and the tests.
#![allow(dead_code)]

mod compile;
mod diagnostic;
mod duration;
mod raw;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actors::supervisor::{Backoff, Intensity, Strategy};
use indexmap::IndexMap;
use regex::Regex;
use reqwest::Url;
use serde::Deserialize;

pub(crate) use compile::Environment;
pub(crate) use diagnostic::{Diagnostic, Diagnostics};

/// The environment variable that overrides `broker.url`.
pub(crate) const BROKER_URL_ENV: &str = "RT_BROKER_URL";

/// A config that compiled, with the warnings found on the way.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The validated configuration.
    pub(crate) config: Config,
    /// Warnings: the config is usable, but they deserve a look (log them).
    pub(crate) warnings: Vec<Diagnostic>,
}

/// A config that cannot be used: unreadable, not TOML, or with errors.
#[derive(Debug)]
pub(crate) struct ConfigError {
    /// Every diagnostic: the single read or parse error, or every compile error and warning.
    pub(crate) diagnostics: Diagnostics,
}

impl fmt::Display for ConfigError {
    /// Every error, then every warning, one per line, as `runtime check` prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.diagnostics.fmt(f)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and compiles `path` against the process environment.
pub(crate) fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let lookup = |name: &str| std::env::var(name).ok();
    load_with(path, Environment::Lookup(&lookup))
}

/// Reads and compiles `path` against `env`.
pub(crate) fn load_with(path: &Path, env: Environment<'_>) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        let mut diagnostics = Diagnostics::default();
        diagnostics.error(path.display().to_string(), format!("cannot read: {err}"));
        ConfigError { diagnostics }
    })?;
    compile_str(&text, env)
}

/// Parses and compiles TOML text against `env`.
pub(crate) fn compile_str(text: &str, env: Environment<'_>) -> Result<Loaded, ConfigError> {
    let raw = raw::parse(text).map_err(|diagnostic| ConfigError {
        diagnostics: Diagnostics {
            errors: vec![diagnostic],
            warnings: Vec::new(),
        },
    })?;
    compile::compile(raw, env).map_err(|diagnostics| ConfigError { diagnostics })
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// `[runtime]`
    pub(crate) runtime: RuntimeSettings,
    /// `[broker]`
    pub(crate) broker: BrokerSettings,
    /// `[http]`
    pub(crate) http: HttpSettings,
    /// `[supervision]`
    pub(crate) supervision: SupervisionSettings,
    /// `[queues.NAME]`, in declaration order.
    pub(crate) queues: IndexMap<String, QueueSettings>,
    /// `[tasks.NAME]`, in declaration order.
    pub(crate) tasks: IndexMap<String, TaskSettings>,
    /// `[resources.NAME]`, in declaration order.
    pub(crate) resources: IndexMap<String, ResourceSettings>,
    /// `[pools.NAME]`, in declaration order.
    pub(crate) pools: IndexMap<String, PoolSettings>,
    /// `[schedules.NAME]`, in declaration order.
    pub(crate) schedules: IndexMap<String, ScheduleSettings>,
    /// `[chaos]`
    pub(crate) chaos: ChaosSettings,
}

/// `[runtime]`
#[derive(Debug, Clone)]
pub(crate) struct RuntimeSettings {
    /// Time allowed for an orderly stop after SIGINT/SIGTERM.
    pub(crate) shutdown_grace: Duration,
    /// How often the heartbeat actor records uptime.
    pub(crate) heartbeat_interval: Duration,
    /// Hard time limit of tasks whose task and queue set none.
    pub(crate) time_limit: Duration,
    /// Soft time limit of tasks whose task and queue set none.
    pub(crate) soft_time_limit: Option<Duration>,
    /// This node's name, when configured.
    pub(crate) node_name: Option<String>,
}

/// `[broker]`
#[derive(Clone)]
pub(crate) struct BrokerSettings {
    /// `memory://`, `redis://…` or `rediss://…` (after the `RT_BROKER_URL` override). May
    /// hold a password: print it with [`BrokerSettings::redacted_url`].
    pub(crate) url: String,
    /// Prefix of every Redis key.
    pub(crate) prefix: String,
    /// Lease of a running task's message.
    pub(crate) lease: Duration,
    /// Deliveries after which a message is dead-lettered.
    pub(crate) max_deliveries: NonZeroU32,
    /// How long results are kept.
    pub(crate) result_ttl: Duration,
}

impl BrokerSettings {
    /// The URL with its password, if any, replaced by `***`.
    pub(crate) fn redacted_url(&self) -> String {
        match Url::parse(&self.url) {
            Ok(mut url) if url.password().is_some() => {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = url.set_password(Some("***"));
                url.to_string()
            }
            _ => self.url.clone(),
        }
    }
}

impl fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("max_deliveries", &self.max_deliveries)
            .field("result_ttl", &self.result_ttl)
            .finish()
    }
}

/// `[http]`
#[derive(Clone)]
pub(crate) struct HttpSettings {
    /// Listen address.
    pub(crate) bind: SocketAddr,
    /// Name of the environment variable holding the admin token, when configured.
    pub(crate) admin_token_env: Option<String>,
    /// Bearer token for mutating routes (the value of `admin_token_env`; `None` when unset or
    /// when the environment was not consulted).
    pub(crate) admin_token: Option<String>,
}

impl fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSettings")
            .field("bind", &self.bind)
            .field("admin_token_env", &self.admin_token_env)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `[supervision]`
#[derive(Debug, Clone)]
pub(crate) struct SupervisionSettings {
    /// Strategy of every supervisor.
    pub(crate) strategy: Strategy,
    /// Restart intensity.
    pub(crate) intensity: Intensity,
    /// Restart backoff.
    pub(crate) backoff: Backoff,
}

/// `[queues.NAME]`: one bulkhead.
#[derive(Debug, Clone)]
pub(crate) struct QueueSettings {
    /// Tasks running at once on this node.
    pub(crate) concurrency: NonZeroU32,
    /// Messages fetched ahead beyond the running ones.
    pub(crate) prefetch: u32,
    /// The queue's own hard limit (tasks' effective limits are resolved in [`TaskSettings`]).
    pub(crate) time_limit: Option<Duration>,
    /// The queue's own soft limit.
    pub(crate) soft_time_limit: Option<Duration>,
}

/// `[tasks.NAME]`
#[derive(Debug, Clone)]
pub(crate) struct TaskSettings {
    /// The queue it runs on (defined in [`Config::queues`]).
    pub(crate) queue: String,
    /// What runs it.
    pub(crate) handler: Handler,
    /// Effective hard time limit: the task's, else its queue's, else the runtime's.
    pub(crate) time_limit: Duration,
    /// Effective soft time limit, resolved the same way; always below `time_limit`.
    pub(crate) soft_time_limit: Option<Duration>,
    /// Retry policy.
    pub(crate) retry: RetryPolicy,
    /// Resources it calls (defined in [`Config::resources`]).
    pub(crate) uses: Vec<String>,
    /// Tasks enqueued with its result on success.
    pub(crate) link: Vec<String>,
    /// Tasks enqueued with its error on final failure.
    pub(crate) link_error: Vec<String>,
    /// Deduplicated enqueue, when configured.
    pub(crate) idempotency: Option<Idempotency>,
}

/// What runs a task.
#[derive(Debug, Clone)]
pub(crate) enum Handler {
    /// POST the envelope as JSON to `url`.
    Http {
        /// `http` or `https` URL.
        url: Url,
        /// Timeout of one request (the hard limit applies regardless).
        timeout: Option<Duration>,
    },
    /// Run a command, envelope on stdin.
    Exec {
        /// Program.
        command: String,
        /// Arguments.
        args: Vec<String>,
        /// Working directory.
        cwd: Option<PathBuf>,
    },
    /// A registered Rust function named like the task.
    Native,
    /// Hand the task to an idle agent of `pool` (defined in [`Config::pools`]).
    Pool {
        /// Pool name.
        pool: String,
    },
}

/// Retries of a task.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt.
    pub(crate) max_retries: u32,
    /// Delay between attempts: `min(max, base · 2ⁿ)` with jitter.
    pub(crate) backoff: Backoff,
}

/// Deduplicated enqueue.
#[derive(Debug, Clone)]
pub(crate) struct Idempotency {
    /// How long a key is remembered.
    pub(crate) ttl: Duration,
}

/// `[resources.NAME]`
#[derive(Debug, Clone)]
pub(crate) enum ResourceSettings {
    /// `kind = "zep"`
    Zep(ZepSettings),
    /// `kind = "openai"`
    OpenAi(OpenAiSettings),
}

/// A secret read from the environment; `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    /// The secret itself: for the request header, never for a log line.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `kind = "zep"`
#[derive(Debug, Clone)]
pub(crate) struct ZepSettings {
    /// Base URL.
    pub(crate) base_url: Url,
    /// Name of the variable holding the API key.
    pub(crate) api_key_env: String,
    /// The API key (`None` when unset or when the environment was not consulted).
    pub(crate) api_key: Option<Secret>,
    /// Timeout of one call.
    pub(crate) timeout: Duration,
    /// The circuit breaker.
    pub(crate) breaker: BreakerSettings,
}

/// A circuit breaker.
#[derive(Debug, Clone)]
pub(crate) struct BreakerSettings {
    /// Consecutive failures that open it.
    pub(crate) failure_threshold: NonZeroU32,
    /// First open time.
    pub(crate) open_for: Duration,
    /// Cap of the open time; not below `open_for`.
    pub(crate) open_for_max: Duration,
    /// Calls let through while half-open.
    pub(crate) probes: NonZeroU32,
    /// Timeout of a probe call.
    pub(crate) probe_timeout: Duration,
    /// A call slower than this counts as a failure.
    pub(crate) slow_call: Option<Duration>,
}

/// `kind = "openai"`
#[derive(Debug, Clone)]
pub(crate) struct OpenAiSettings {
    /// Base URL.
    pub(crate) base_url: Url,
    /// Name of the variable holding the API key.
    pub(crate) api_key_env: String,
    /// The API key (`None` when unset or when the environment was not consulted).
    pub(crate) api_key: Option<Secret>,
    /// Requests per minute.
    pub(crate) requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute.
    pub(crate) tokens_per_minute: Option<NonZeroU32>,
    /// Calls in flight at once.
    pub(crate) concurrency: Option<NonZeroU32>,
}

/// `[pools.NAME]`
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// Program of each agent.
    pub(crate) command: String,
    /// Its arguments.
    pub(crate) args: Vec<String>,
    /// The agent's whole environment.
    pub(crate) env: IndexMap<String, String>,
    /// Variables copied from the runtime's environment when an agent is spawned.
    pub(crate) pass_env: Vec<String>,
    /// Working directory.
    pub(crate) cwd: Option<PathBuf>,
    /// Idle agents kept warm; not above `max`.
    pub(crate) min_idle: u32,
    /// Agents alive at once.
    pub(crate) max: NonZeroU32,
    /// Spawn-to-ready deadline.
    pub(crate) startup_timeout: Duration,
    /// Readiness line (stdout and stderr).
    pub(crate) ready_pattern: Regex,
    /// Assignment confirmation line, when configured.
    pub(crate) assigned_pattern: Option<Regex>,
    /// Deadline of an assignment confirmation.
    pub(crate) assign_timeout: Duration,
    /// Wait for an idle agent.
    pub(crate) claim_timeout: Duration,
    /// Memory limit per agent.
    pub(crate) memory_limit_mb: Option<NonZeroU32>,
    /// Idle agents older than this are replaced.
    pub(crate) max_idle_age: Option<Duration>,
    /// Stop signal.
    pub(crate) stop_signal: StopSignal,
    /// Time between the stop signal and SIGKILL.
    pub(crate) stop_timeout: Duration,
    /// Consecutive startup failures before the pool stops spawning.
    pub(crate) startretries: u32,
}

/// A signal that stops an agent's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopSignal {
    /// `SIGTERM`
    Term,
    /// `SIGINT`
    Int,
    /// `SIGHUP`
    Hup,
    /// `SIGQUIT`
    Quit,
    /// `SIGUSR1`
    Usr1,
    /// `SIGUSR2`
    Usr2,
    /// `SIGKILL`
    Kill,
}

impl StopSignal {
    /// Every signal, in the order the docs list them.
    pub(crate) const ALL: [StopSignal; 7] = [
        StopSignal::Term,
        StopSignal::Int,
        StopSignal::Hup,
        StopSignal::Quit,
        StopSignal::Usr1,
        StopSignal::Usr2,
        StopSignal::Kill,
    ];

    /// The config spelling, e.g. `SIGTERM`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
            StopSignal::Hup => "SIGHUP",
            StopSignal::Quit => "SIGQUIT",
            StopSignal::Usr1 => "SIGUSR1",
            StopSignal::Usr2 => "SIGUSR2",
            StopSignal::Kill => "SIGKILL",
        }
    }
}

/// `[schedules.NAME]`
#[derive(Debug, Clone)]
pub(crate) struct ScheduleSettings {
    /// The task it enqueues (defined in [`Config::tasks`]).
    pub(crate) task: String,
    /// Positional arguments.
    pub(crate) args: Vec<serde_json::Value>,
    /// Keyword arguments.
    pub(crate) kwargs: serde_json::Map<String, serde_json::Value>,
    /// When it runs.
    pub(crate) trigger: Trigger,
    /// Time zone of `cron`.
    pub(crate) timezone: chrono_tz::Tz,
    /// Random delay added to each run.
    pub(crate) jitter: Option<Duration>,
    /// What happens to missed runs.
    pub(crate) missed: Missed,
}

/// When a schedule runs.
#[derive(Debug, Clone)]
pub(crate) enum Trigger {
    /// Every interval.
    Every(Duration),
    /// On a cron expression.
    Cron {
        /// As written.
        expression: String,
        /// Parsed.
        cron: Box<croner::Cron>,
    },
}

/// What happens to the runs of a schedule missed while no node was leader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Missed {
    /// Forget them; run at the next due time.
    #[default]
    Skip,
    /// Run once at once, however many were missed.
    RunOnce,
}

/// `[chaos]`
#[derive(Debug, Clone)]
pub(crate) struct ChaosSettings {
    /// Whether `POST /chaos/kill/{path}` exists.
    pub(crate) enabled: bool,
}
