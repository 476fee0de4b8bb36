//! Configuration: the TOML file → raw serde structs → one `compile()` → a validated [`Config`].
//!
//! # Layout
//! - `raw` — the file as written (serde, `deny_unknown_fields`, declaration order kept); its
//!   `///` comments are the user documentation of every key. Every shape error is reported,
//!   not only the first.
//! - `compile` — raw → [`Config`]: defaults, the limits precedence (task → queue → runtime,
//!   most specific wins), cross-references, environment; every error and warning in one pass.
//! - `duration` — `"120s"`-style durations.
//! - `diagnostic` — [`Diagnostic`]: one error or warning, named by its key path.
//!
//! Tables keyed by name (`queues`, `tasks`, …) are [`IndexMap`]s in declaration order, which
//! is the order the tree starts them in.
//!
//! The compiled types below are what the rest of the program reads; where the library has a
//! type for a table, the config holds it (a pool's [`PoolSpec`], a resource's settings with
//! its breaker policy, the supervisor's `Intensity` and `Backoff`), built by the library's own
//! constructors, so each rule and each default is the library's. Secrets are resolved from the
//! environment at load time and never printed: the `Debug` of every type holding one redacts
//! it.
//!
//! Nothing in this module runs anything: queues, pools and schedules are data until the
//! actors that run them exist.

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

use actors::celery::CelerySettings;
use actors::consumer::QueueSettings;
use actors::gate::Use;
use actors::handler::RetryPolicy;
use actors::pool::PoolSpec;
use actors::resource::openai::OpenAiSettings;
use actors::resource::zep::ZepSettings;
use actors::scheduler::Schedule;
use actors::supervisor::{Backoff, Intensity, Strategy};
use indexmap::IndexMap;
use reqwest::Url;

pub use compile::Environment;
pub(crate) use diagnostic::did_you_mean;
pub use diagnostic::{Diagnostic, Diagnostics, Severity};

/// The environment variable that overrides `broker.url`.
pub const BROKER_URL_ENV: &str = "RT_BROKER_URL";

/// Overrides `http.bind` (e.g. `RT_HTTP_BIND=127.0.0.1:0` for a free port).
pub const HTTP_BIND_ENV: &str = "RT_HTTP_BIND";

/// A config that compiled, with the warnings found on the way.
#[derive(Debug)]
#[warn(missing_docs)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// Warnings: the config is usable, but they deserve a look (log them).
    pub warnings: Vec<Diagnostic>,
}

/// A config that cannot be used: unreadable, not TOML, or with errors.
#[derive(Debug)]
#[warn(missing_docs)]
pub struct ConfigError {
    /// Every diagnostic: the single read or parse error, or every compile error and warning.
    pub diagnostics: Diagnostics,
}

impl fmt::Display for ConfigError {
    /// Every error, then every warning, one per line, as `runtime check` prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.diagnostics.fmt(f)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and compiles `path` against the process environment.
#[warn(missing_docs)]
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let lookup = |name: &str| std::env::var(name).ok();
    load_with(path, Environment::Lookup(&lookup))
}

/// Reads and compiles `path` against `env`.
#[warn(missing_docs)]
pub fn load_with(path: &Path, env: Environment<'_>) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        let mut diagnostics = Diagnostics::default();
        diagnostics.error(path.display().to_string(), format!("cannot read: {err}"));
        ConfigError { diagnostics }
    })?;
    compile_str(&text, env)
}

/// Parses and compiles TOML text against `env`: every shape error of the file, then every
/// error and warning of what could be read.
#[warn(missing_docs)]
pub fn compile_str(text: &str, env: Environment<'_>) -> Result<Loaded, ConfigError> {
    let parsed = raw::parse(text).map_err(|diagnostic| ConfigError {
        diagnostics: Diagnostics {
            errors: vec![diagnostic],
            warnings: Vec::new(),
        },
    })?;
    let compiled = compile::compile(
        parsed.config,
        &compile::LeftOut {
            unreadable: &parsed.unreadable,
            declared: &parsed.declared,
        },
        env,
    );
    let mut errors = parsed.errors;
    match compiled {
        Ok(loaded) if errors.is_empty() => Ok(loaded),
        Ok(loaded) => Err(ConfigError {
            diagnostics: Diagnostics {
                errors,
                warnings: loaded.warnings,
            },
        }),
        Err(diagnostics) => {
            errors.extend(diagnostics.errors);
            Err(ConfigError {
                diagnostics: Diagnostics {
                    errors,
                    warnings: diagnostics.warnings,
                },
            })
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[runtime]`
    pub runtime: RuntimeSettings,
    /// `[broker]`
    pub broker: BrokerSettings,
    /// `[http]`
    pub http: HttpSettings,
    /// `[supervision]`
    pub supervision: SupervisionSettings,
    /// `[queues.NAME]`, in declaration order.
    pub queues: IndexMap<String, QueueConfig>,
    /// `[tasks.NAME]`, in declaration order.
    pub tasks: IndexMap<String, TaskSettings>,
    /// `[resources.NAME]`, in declaration order.
    pub resources: IndexMap<String, ResourceSettings>,
    /// `[pools.NAME]`, then `[workers.NAME]` (worker pools), in declaration order; a name is
    /// used once across both.
    pub pools: IndexMap<String, PoolConfig>,
    /// `[schedules.NAME]`, in declaration order, with the queue of each one's task.
    pub schedules: IndexMap<String, Schedule>,
    /// `[beat]`
    pub beat: BeatSettings,
    /// `[chaos]`
    pub chaos: ChaosSettings,
    /// `[celery]`, when present: the bridge's settings, each Celery task mapped to its runtime
    /// task and that task's queue.
    pub celery: Option<CelerySettings>,
    /// `[metrics]`
    pub metrics: MetricsSettings,
    /// `[events]`
    pub events: EventsSettings,
}

/// `[beat]`
#[derive(Debug, Clone)]
pub struct BeatSettings {
    /// The scheduler's leader lease.
    pub lease: Duration,
}

/// `[runtime]`
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Time allowed for an orderly stop after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// How often the heartbeat actor records uptime.
    pub heartbeat_interval: Duration,
    /// Hard time limit of tasks whose task and queue set none.
    pub time_limit: Duration,
    /// Soft time limit of tasks whose task and queue set none.
    pub soft_time_limit: Option<Duration>,
    /// This node's name, when configured.
    pub node_name: Option<String>,
    /// Time a task revoked with terminate has between its soft signal and its hard stop.
    pub terminate_grace: Duration,
}

/// `[broker]`
#[derive(Clone)]
pub struct BrokerSettings {
    /// `memory://`, `redis://…` or `rediss://…` (after the `RT_BROKER_URL` override). May
    /// hold a password: print it with [`BrokerSettings::redacted_url`].
    pub url: String,
    /// Lease of a running task's message.
    pub lease: Duration,
    /// `memory://`: run the ready tasks, within `runtime.shutdown_grace`, before stopping.
    pub drain_on_shutdown: bool,
    /// What the broker itself is built with: `prefix`, `max_deliveries`, `result_ttl`,
    /// `max_entry_bytes`, and the events stream's cap (`[events]`, 0 when off) and the tasks'
    /// idempotency TTLs (`tasks.NAME.idempotency.ttl`).
    pub settings: actors::broker::BrokerSettings,
}

impl BrokerSettings {
    /// The URL with its password, if any, replaced by `***` (a user name alone, which Redis
    /// takes as the password, too) and without its query string (where a password can be given
    /// as well: `?password=…`). A URL that does not parse is not shown at all.
    pub fn redacted_url(&self) -> String {
        if self.url.starts_with(actors::broker::redis::CLUSTER_SCHEME) {
            // A list of nodes is not one URL: shown without credentials or query.
            return actors::shown::url(&self.url);
        }
        match Url::parse(&self.url) {
            Ok(mut url) => {
                // These only fail for URLs that cannot have credentials, which then have none.
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                } else if !url.username().is_empty() {
                    let _ = url.set_username("***");
                }
                url.set_query(None);
                url.to_string()
            }
            Err(_) => "<not a valid URL>".to_string(),
        }
    }
}

impl fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &self.redacted_url())
            .field("lease", &self.lease)
            .field("drain_on_shutdown", &self.drain_on_shutdown)
            .field("settings", &self.settings)
            .finish()
    }
}

/// `[http]`
#[derive(Clone)]
pub struct HttpSettings {
    /// Listen address.
    pub bind: SocketAddr,
    /// Name of the environment variable holding the admin token, when configured.
    pub admin_token_env: Option<String>,
    /// Bearer token for mutating routes (the value of `admin_token_env`; `None` when unset or
    /// when the environment was not consulted).
    pub admin_token: Option<String>,
    /// Time allowed to send a request's line and headers.
    pub header_read_timeout: Duration,
    /// Time allowed, after the headers, to send the whole body.
    pub body_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: NonZeroU32,
}

impl fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSettings")
            .field("bind", &self.bind)
            .field("admin_token_env", &self.admin_token_env)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// `[supervision]`
#[derive(Debug, Clone)]
pub struct SupervisionSettings {
    /// Strategy of every supervisor.
    pub strategy: Strategy,
    /// Restart intensity.
    pub intensity: Intensity,
    /// Restart backoff.
    pub backoff: Backoff,
}

/// `[queues.NAME]`: one bulkhead, as its consumer runs it, and the limits its tasks inherit.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Concurrency and prefetch, for the queue's consumer on this node.
    pub settings: QueueSettings,
    /// The queue's own hard limit (tasks' effective limits are resolved in [`TaskSettings`]).
    pub time_limit: Option<Duration>,
    /// The queue's own soft limit.
    pub soft_time_limit: Option<Duration>,
}

/// `[tasks.NAME]`
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// The queue it runs on (defined in [`Config::queues`]).
    pub queue: String,
    /// What runs it.
    pub handler: Handler,
    /// Effective hard time limit: the task's, else its queue's, else the runtime's.
    pub time_limit: Duration,
    /// Effective soft time limit, resolved the same way; always below `time_limit`.
    pub soft_time_limit: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Resources it calls (defined in [`Config::resources`]): `uses` then `degrades`, each with
    /// how much it needs it.
    pub uses: Vec<Use>,
    /// Tasks enqueued with its result on success.
    pub link: Vec<String>,
    /// Tasks enqueued with its error on final failure.
    pub link_error: Vec<String>,
    /// Deduplicated enqueue, when configured.
    pub idempotency: Option<Idempotency>,
    /// Whether a success writes the task's record with its result (`store_result`, default
    /// true); false removes the record instead.
    pub store_result: bool,
}

/// What runs a task.
#[derive(Debug, Clone)]
pub enum Handler {
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
        /// The command's environment as configured (nothing else is inherited).
        env: IndexMap<String, String>,
        /// Variables copied from the runtime's environment when the handler is built.
        pass_env: Vec<String>,
    },
    /// A registered Rust function named like the task.
    Native,
    /// Hand the task to an idle agent of `pool` (defined in [`Config::pools`]).
    Pool {
        /// Pool name.
        pool: String,
    },
    /// Run `function` on a process of the worker pool `pool` (`[workers.NAME]`, kept in
    /// [`Config::pools`]).
    Python {
        /// Worker pool name.
        pool: String,
        /// The name the function registered under (`@task(name=…)`).
        function: String,
    },
}

/// Deduplicated enqueue.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// How long a key is remembered.
    pub ttl: Duration,
}

/// `[resources.NAME]`: the settings its client is built from (the node makes the client, which
/// needs the broker or an HTTP client). Their `Debug` hides the API key.
#[derive(Debug, Clone)]
pub enum ResourceSettings {
    /// `kind = "zep"`
    Zep(ZepSettings),
    /// `kind = "openai"`
    OpenAi(OpenAiSettings),
}

/// `[pools.NAME]`: the pool as the library runs it, and what the node adds at start.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The validated pool; its `env` is the configured table, to which the node adds the
    /// `pass_env` variables and its egress URL and token at start ([`PoolSpec::with_env`]).
    pub spec: PoolSpec,
    /// Variables copied from the runtime's environment when the node starts.
    pub pass_env: Vec<String>,
}

/// `[chaos]`
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Whether `POST /chaos/kill/{path}` exists.
    pub enabled: bool,
}

/// `[events]`
#[derive(Debug, Clone)]
pub struct EventsSettings {
    /// Whether lifecycle events are written (else nothing is, and `GET /events` answers 404).
    pub enabled: bool,
    /// Approximate cap of the events stream (`XADD … MAXLEN ~ maxlen`).
    pub maxlen: NonZeroU32,
}

/// `[metrics]`
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// Whether metrics are recorded and `GET /metrics` serves them (else it answers 404).
    pub enabled: bool,
}
