//! `compile()`: raw structs → a validated [`Config`], with every error and warning of the file
//! found in one pass, each named by its key path.
//!
//! Time limits resolve task → queue → runtime: the most specific one that is set wins. A more
//! specific limit above a less specific one is legal (it is how a long task gets room), but it
//! is exactly the contradiction that went unnoticed in the Celery fleets, so it is reported as
//! a warning that says which one wins. Soft ≥ hard after resolution is an error: the soft
//! limit would never fire.
//!
//! The environment is a parameter ([`Environment`]) so that tests are deterministic and
//! `runtime check --no-environment` can skip it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::str::FromStr;
use std::time::Duration;

use actors::celery::CelerySettings;
use actors::consumer::QueueSettings;
use actors::gate::Use;
use actors::handler::RetryPolicy;
use actors::pool::{PoolSettings, PoolSpec, WorkerSettings};
use actors::resource::auth::{AuthProbe, DEFAULT_PROBE_EVERY};
use actors::resource::breaker::{BreakerPolicy, BreakerSettings, FailureRate};
use actors::resource::openai::{self, Limit as RateLimit, OpenAiError, OpenAiSettings};
use actors::resource::zep::{self, ZepSettings};
use actors::scheduler::{Schedule, Trigger};
use actors::supervisor::{Backoff, Intensity, PolicyError};
use croner::parser::{CronParser, Seconds};
use indexmap::IndexMap;
use nix::sys::signal::Signal;
use regex::Regex;
use reqwest::Url;

use super::diagnostic::{Diagnostics, did_you_mean};
use super::duration::{self, RawDuration};
use super::raw::{
    RawBreaker, RawBroker, RawCelery, RawConfig, RawHandler, RawHttp, RawOpenAi, RawPool, RawQueue,
    RawResource, RawRuntime, RawSchedule, RawSupervision, RawTask, RawWorkers, RawZep,
};
use super::{
    BROKER_URL_ENV, BeatSettings, BrokerSettings, ChaosSettings, Config, EventsSettings,
    HTTP_BIND_ENV, Handler, HttpSettings, Idempotency, Loaded, MetricsSettings, PoolConfig,
    QueueConfig, ResourceSettings, RuntimeSettings, SupervisionSettings, TaskSettings,
};

/// Where `compile()` reads environment variables (`RT_BROKER_URL`, `RT_HTTP_BIND`, secrets).
#[derive(Clone, Copy)]
pub enum Environment<'a> {
    /// Look variables up with this function: the process environment in `load`, a map in
    /// tests. An empty value counts as unset.
    Lookup(&'a dyn Fn(&str) -> Option<String>),
    /// `--no-environment`: consult nothing. `RT_BROKER_URL` and `RT_HTTP_BIND` are not
    /// applied, secrets stay unresolved and unset ones are not reported.
    Ignored,
}

impl Environment<'_> {
    /// `Some(value)` when set and not empty; `None` when unset, empty or ignored.
    fn get(&self, name: &str) -> Option<String> {
        match self {
            Environment::Lookup(lookup) => lookup(name).filter(|value| !value.is_empty()),
            Environment::Ignored => None,
        }
    }

    fn is_ignored(&self) -> bool {
        matches!(self, Environment::Ignored)
    }
}

const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_TERMINATE_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(300);
const DEFAULT_BROKER_URL: &str = "memory://";
const DEFAULT_LEASE: Duration = Duration::from_secs(30);
const DEFAULT_BEAT_LEASE: Duration = Duration::from_secs(10);
/// The most replicas `broker.ack_replicas` may ask for.
const MAX_ACK_REPLICAS: u32 = 16;
/// The longest `broker.ack_replicas_timeout`.
const MAX_ACK_REPLICAS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The smallest `broker.max_entry_bytes`: an envelope without arguments takes a few hundred.
const MIN_MAX_ENTRY_BYTES: u64 = 1024;
/// The largest `broker.max_entry_bytes`: Redis' largest string (`proto-max-bulk-len`).
const MAX_MAX_ENTRY_BYTES: u64 = 512 * 1024 * 1024;
const DEFAULT_BIND: &str = "127.0.0.1:7070";
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONNECTIONS: u32 = 512;
const DEFAULT_QUEUE: &str = "default";
const DEFAULT_MAX_RETRIES: u32 = 3;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The signals `pools.NAME.stop_signal` may name, in the order the docs list them.
const STOP_SIGNALS: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGKILL,
];

/// Compiles `raw` against `env`: the config and its warnings, or every error and warning.
/// What the parser left out of `raw` for its shape errors (already reported).
pub(crate) struct LeftOut<'a> {
    /// Tables left out (`pools.voice`): a reference to one is not reported as undefined.
    pub(crate) unreadable: &'a HashSet<String>,
    /// Every name written under each top-level table, left-out ones included, in file order:
    /// what an undefined reference is compared with for "did you mean".
    pub(crate) declared: &'a HashMap<String, Vec<String>>,
}

/// Compiles `raw` against `env`; `left_out` says what the parser could not read.
pub(crate) fn compile(
    raw: RawConfig,
    left_out: &LeftOut<'_>,
    env: Environment<'_>,
) -> Result<Loaded, Diagnostics> {
    let mut c = Compiler {
        diagnostics: Diagnostics::default(),
        env,
        unreadable: left_out.unreadable,
        declared: left_out.declared,
    };
    let runtime = c.runtime(&raw.runtime);
    let broker = c.broker(&raw.broker);
    let http = c.http(&raw.http);
    let supervision = c.supervision(&raw.supervision);
    let queues = c.queues(&raw.queues, &runtime);
    let resources = c.resources(&raw.resources);
    let mut pools = c.pools(&raw.pools);
    c.workers(&raw.workers, &raw.pools, &mut pools);
    let tasks = c.tasks(&raw, &runtime, &queues);
    let schedules = c.schedules(&raw, &tasks);
    let chaos = ChaosSettings {
        enabled: raw.chaos.enabled.unwrap_or(false),
    };
    let celery = raw
        .celery
        .as_ref()
        .and_then(|celery| c.celery(celery, broker.as_ref(), &raw, &tasks));
    let metrics = MetricsSettings {
        enabled: raw.metrics.enabled.unwrap_or(true),
    };
    let default_maxlen = actors::broker::BrokerSettings::default().events_maxlen as u32;
    let events = EventsSettings {
        enabled: raw.events.enabled.unwrap_or(true),
        maxlen: c.nonzero("events.maxlen", raw.events.maxlen.unwrap_or(default_maxlen)),
    };
    let broker = broker.map(|mut broker| {
        broker.settings.events_maxlen = if events.enabled {
            events.maxlen.get() as usize
        } else {
            0
        };
        broker.settings.task_idempotency_ttl = (tasks.iter())
            .filter_map(|(name, task)| task.idempotency.as_ref().map(|i| (name.clone(), i.ttl)))
            .collect();
        if broker.url.starts_with("memory:") {
            for (name, queue) in &raw.queues {
                if queue.partitions.is_some_and(|n| n > 1) {
                    c.warning(
                        format!("queues.{name}.partitions"),
                        "has no effect with memory:// (one node, one queue in its memory)",
                    );
                }
            }
        } else {
            broker.settings.partitions = (raw.queues.iter())
                .filter_map(|(name, queue)| {
                    let n = queue.partitions?.clamp(1, actors::broker::MAX_PARTITIONS);
                    (n > 1).then(|| (name.clone(), n))
                })
                .collect();
        }
        broker
    });
    let beat = BeatSettings {
        lease: c.positive_duration("beat.lease", &raw.beat.lease, DEFAULT_BEAT_LEASE),
    };

    let Compiler { diagnostics, .. } = c;
    match (broker, http, supervision) {
        (Some(broker), Some(http), Some(supervision)) if diagnostics.errors.is_empty() => {
            Ok(Loaded {
                config: Config {
                    runtime: runtime.settings,
                    broker,
                    http,
                    supervision,
                    queues,
                    tasks,
                    resources,
                    pools,
                    schedules,
                    beat,
                    chaos,
                    celery,
                    metrics,
                    events,
                },
                warnings: diagnostics.warnings,
            })
        }
        _ => Err(diagnostics),
    }
}

/// The runtime section, plus which of its limits were written (only those are compared).
struct CompiledRuntime {
    settings: RuntimeSettings,
    time_limit_written: bool,
}

/// A time limit and the key it came from.
#[derive(Clone)]
struct Limit {
    value: Duration,
    from: String,
}

impl Limit {
    fn describe(&self) -> String {
        format!("{} (from {})", duration::display(self.value), self.from)
    }
}

/// One pass over the file; diagnostics accumulate, values that fail are left out.
struct Compiler<'e> {
    diagnostics: Diagnostics,
    env: Environment<'e>,
    /// Tables left out for shape errors (`pools.voice`), already reported.
    unreadable: &'e HashSet<String>,
    /// The names written under each top-level table, left-out ones included.
    declared: &'e HashMap<String, Vec<String>>,
}

impl Compiler<'_> {
    /// Reports that `name` is not defined among `defined` (the `what`s, e.g. queues), unless
    /// it is defined but was left out for a shape error (already reported).
    fn undefined<T>(
        &mut self,
        path: impl Into<String>,
        what: &str,
        name: &str,
        defined: &IndexMap<String, T>,
        note: &str,
    ) {
        if !self.unreadable.contains(&format!("{what}s.{name}")) {
            let message = undefined(what, name, &self.declared_or(what, defined));
            self.error(path, format!("{message}{note}"));
        }
    }

    /// The names of the `what`s written in the file (left-out ones too), or else `defined`'s.
    fn declared_or<T>(&self, what: &str, defined: &IndexMap<String, T>) -> Vec<String> {
        self.declared
            .get(&format!("{what}s"))
            .cloned()
            .unwrap_or_else(|| defined.keys().cloned().collect())
    }

    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.diagnostics.error(path, message);
    }

    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.diagnostics.warning(path, message);
    }

    // ---- value helpers -------------------------------------------------------------------

    /// An optional duration; a bad one is reported and treated as absent.
    fn opt_duration(&mut self, path: &str, raw: &Option<RawDuration>) -> Option<Duration> {
        let raw = raw.as_ref()?;
        match duration::parse(&raw.0) {
            Ok(value) => Some(value),
            Err(message) => {
                self.error(path, message);
                None
            }
        }
    }

    /// A duration with a default; a bad one is reported (and the default stands in).
    fn duration(&mut self, path: &str, raw: &Option<RawDuration>, default: Duration) -> Duration {
        self.opt_duration(path, raw).unwrap_or(default)
    }

    /// A duration that must be above zero.
    fn positive_duration(
        &mut self,
        path: &str,
        raw: &Option<RawDuration>,
        default: Duration,
    ) -> Duration {
        let value = self.duration(path, raw, default);
        if value.is_zero() {
            self.error(path, "must be longer than zero");
            return default;
        }
        value
    }

    /// A count that must be at least 1.
    fn nonzero(&mut self, path: &str, value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap_or_else(|| {
            self.error(path, "must be at least 1, got 0");
            NonZeroU32::MIN
        })
    }

    fn opt_nonzero(&mut self, path: &str, value: Option<u32>) -> Option<NonZeroU32> {
        value.map(|value| self.nonzero(path, value))
    }

    /// A name used in actor paths and Redis keys.
    fn name(&mut self, path: &str, name: &str) {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            self.error(
                path,
                format!(
                    "name \"{name}\" is not usable in actor paths and Redis keys: use only \
                     letters, digits, '_' and '-'"
                ),
            );
        }
    }

    /// A key that names an environment variable: reported without echoing it, since it may
    /// be a secret pasted where its name belongs.
    fn env_name(&mut self, path: &str, name: &str) -> bool {
        let valid = is_env_name(name);
        if !valid {
            self.error(
                path,
                "must name an environment variable ([A-Za-z_][A-Za-z0-9_]*), not hold its value",
            );
        }
        valid
    }

    /// A key of a pool's `env` table.
    fn env_key(&mut self, path: &str, name: &str) {
        if !is_env_name(name) {
            self.error(
                path,
                "not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            );
        }
    }

    /// A child's `env` table and `pass_env` list (`at` is the pool or the exec handler): valid
    /// names, none the runtime sets itself, no name listed twice, a warning for a passed
    /// variable that is not set (`who` says what then goes without it).
    fn child_env(
        &mut self,
        at: &str,
        env: &IndexMap<String, String>,
        pass_env: &[String],
        who: &str,
    ) {
        for key in env.keys() {
            let path = format!("{at}.env.{key}");
            self.env_key(&path, key);
            self.not_reserved(&path, key);
        }
        let path = format!("{at}.pass_env");
        for (n, name) in pass_env.iter().enumerate() {
            let first = !pass_env[..n].contains(name);
            if self.env_name(&path, name)
                && self.not_reserved(&path, name)
                && first
                && !self.env.is_ignored()
                && self.env.get(name).is_none()
            {
                self.warning(
                    &path,
                    format!("environment variable {name} is not set: {who} without it"),
                );
            }
        }
        self.no_duplicates(&path, pass_env);
    }

    /// A variable the runtime sets in its children cannot be configured.
    fn not_reserved(&mut self, path: &str, name: &str) -> bool {
        let reserved = actors::child::RESERVED.contains(&name);
        if reserved {
            self.error(
                path,
                format!("{name} is set by the runtime in every child; choose another name"),
            );
        }
        !reserved
    }

    /// The value of the secret named at `path`; unset → a warning saying what will fail.
    fn secret(&mut self, path: &str, name: &str, consequence: &str) -> Option<String> {
        if !self.env_name(path, name) || self.env.is_ignored() {
            return None;
        }
        let value = self.env.get(name);
        if value.is_none() {
            self.warning(
                path,
                format!("environment variable {name} is not set: {consequence}"),
            );
        }
        value
    }

    /// An `http`/`https` URL.
    fn http_url(&mut self, path: &str, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
            Ok(url) => {
                self.error(
                    path,
                    format!(
                        "unsupported URL scheme \"{}\": use http:// or https://",
                        url.scheme()
                    ),
                );
                None
            }
            Err(err) => {
                self.error(path, format!("invalid URL \"{text}\": {err}"));
                None
            }
        }
    }

    fn regex(&mut self, path: &str, pattern: &str) -> Option<Regex> {
        match Regex::new(pattern) {
            Ok(regex) => Some(regex),
            Err(err) => {
                // The syntax error's last line says what is wrong ("error: unclosed group");
                // the lines above it draw a caret under the pattern, which one line cannot.
                let text = err.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find_map(|line| line.trim().strip_prefix("error: "))
                    .map_or_else(|| one_line(&text), str::to_owned);
                self.error(path, format!("invalid regex \"{pattern}\": {reason}"));
                None
            }
        }
    }

    /// Names in a list must each appear once.
    fn no_duplicates(&mut self, path: &str, names: &[String]) {
        let mut seen = HashSet::new();
        for name in names {
            if !seen.insert(name) {
                self.error(path, format!("\"{name}\" is listed more than once"));
            }
        }
    }

    /// Each name in a list must be defined in `section`.
    fn references<T>(
        &mut self,
        path: &str,
        names: &[String],
        section: &str,
        defined: &IndexMap<String, T>,
    ) {
        for name in names {
            if !defined.contains_key(name) {
                self.undefined(path, section, name, defined, "");
            }
        }
    }

    /// Maps an invalid backoff to the key that makes it invalid.
    fn backoff(&mut self, section: &str, base: Duration, max: Duration, jitter: f64) -> Backoff {
        Backoff::try_new(base, max, jitter).unwrap_or_else(|err| {
            let key = match err {
                PolicyError::Jitter(_) => "jitter",
                PolicyError::BackoffCapBelowBase { .. } | PolicyError::ZeroWindow => "backoff_max",
            };
            self.error(format!("{section}.{key}"), err.to_string());
            Backoff::default()
        })
    }

    /// Reports soft ≥ hard at one level (`section` sets at least one of the two), at the key
    /// of this level that takes part, naming where an inherited limit comes from.
    fn soft_below_hard(&mut self, section: &str, soft: &Option<Limit>, hard: &Limit) {
        let Some(soft) = soft else { return };
        if soft.value < hard.value {
            return;
        }
        let here = |limit: &Limit| limit.from.starts_with(&format!("{section}."));
        let soft_text = duration::display(soft.value);
        let hard_text = duration::display(hard.value);
        let (path, message) = match (here(soft), here(hard)) {
            (true, true) => (
                soft.from.clone(),
                format!("{soft_text} is not below time_limit {hard_text}"),
            ),
            (true, false) => (
                soft.from.clone(),
                format!(
                    "{soft_text} is not below the time_limit {hard_text} inherited from {}",
                    hard.from
                ),
            ),
            (false, _) => (
                hard.from.clone(),
                format!(
                    "{hard_text} is not above the soft_time_limit {soft_text} inherited from {}",
                    soft.from
                ),
            ),
        };
        self.error(path, format!("{message}: the soft limit would never fire"));
    }

    // ---- sections ------------------------------------------------------------------------

    fn runtime(&mut self, raw: &RawRuntime) -> CompiledRuntime {
        let shutdown_grace = self.duration(
            "runtime.shutdown_grace",
            &raw.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
        );
        let heartbeat_interval = self.positive_duration(
            "runtime.heartbeat_interval",
            &raw.heartbeat_interval,
            DEFAULT_HEARTBEAT,
        );
        let written = self.opt_duration("runtime.time_limit", &raw.time_limit);
        let time_limit = written.unwrap_or(DEFAULT_TIME_LIMIT);
        if time_limit.is_zero() {
            self.error("runtime.time_limit", "must be longer than zero");
        }
        let soft_time_limit = self.opt_duration("runtime.soft_time_limit", &raw.soft_time_limit);
        let hard = Limit {
            value: time_limit,
            from: "runtime.time_limit".into(),
        };
        let soft = soft_time_limit.map(|value| Limit {
            value,
            from: "runtime.soft_time_limit".into(),
        });
        self.soft_below_hard("runtime", &soft, &hard);
        if let Some(name) = &raw.node_name {
            self.name("runtime.node_name", name);
        }
        let terminate_grace = self.duration(
            "runtime.terminate_grace",
            &raw.terminate_grace,
            DEFAULT_TERMINATE_GRACE,
        );
        CompiledRuntime {
            settings: RuntimeSettings {
                shutdown_grace,
                heartbeat_interval,
                time_limit,
                soft_time_limit,
                node_name: raw.node_name.clone(),
                terminate_grace,
            },
            time_limit_written: written.is_some(),
        }
    }

    fn broker(&mut self, raw: &RawBroker) -> Option<BrokerSettings> {
        let (url, origin) = match self.env.get(BROKER_URL_ENV) {
            Some(url) => (url, format!(" (set by {BROKER_URL_ENV})")),
            None => (
                raw.url.clone().unwrap_or_else(|| DEFAULT_BROKER_URL.into()),
                String::new(),
            ),
        };
        let url_ok = self.broker_url(&url, &origin);
        // The library's defaults; `events_maxlen` and the tasks' idempotency TTLs are filled
        // in once `[events]` and `[tasks]` are compiled.
        let default = actors::broker::BrokerSettings::default();
        let prefix = raw.prefix.clone().unwrap_or(default.prefix.clone());
        self.name("broker.prefix", &prefix);
        let lease = self.positive_duration("broker.lease", &raw.lease, DEFAULT_LEASE);
        let max_deliveries = self.nonzero(
            "broker.max_deliveries",
            raw.max_deliveries.unwrap_or(default.max_deliveries),
        );
        let result_ttl =
            self.positive_duration("broker.result_ttl", &raw.result_ttl, default.result_ttl);
        let max_entry_bytes = raw
            .max_entry_bytes
            .unwrap_or(default.max_entry_bytes as u64);
        if !(MIN_MAX_ENTRY_BYTES..=MAX_MAX_ENTRY_BYTES).contains(&max_entry_bytes) {
            self.error(
                "broker.max_entry_bytes",
                format!(
                    "must be from {MIN_MAX_ENTRY_BYTES} to {MAX_MAX_ENTRY_BYTES} bytes (512 MiB, \
                     Redis' largest string), got {max_entry_bytes}"
                ),
            );
        }
        let drain_on_shutdown = raw.drain_on_shutdown.unwrap_or(false);
        if drain_on_shutdown && url_ok && !url.starts_with("memory:") {
            self.warning(
                "broker.drain_on_shutdown",
                format!(
                    "has no effect with a Redis broker{origin}: its queues outlive the node, \
                     another node (or this one, restarted) runs what is left"
                ),
            );
        }
        let ack_replicas = raw.ack_replicas.unwrap_or(default.ack_replicas);
        if ack_replicas > MAX_ACK_REPLICAS {
            self.error(
                "broker.ack_replicas",
                format!("must be from 0 to {MAX_ACK_REPLICAS}, got {ack_replicas}"),
            );
        } else if ack_replicas > 0 && url_ok && url.starts_with("memory:") {
            self.error(
                "broker.ack_replicas",
                format!("needs a Redis broker with replicas{origin}: memory:// has none"),
            );
        }
        let ack_replicas_timeout = self.positive_duration(
            "broker.ack_replicas_timeout",
            &raw.ack_replicas_timeout,
            default.ack_replicas_timeout,
        );
        if ack_replicas_timeout > MAX_ACK_REPLICAS_TIMEOUT {
            self.error(
                "broker.ack_replicas_timeout",
                format!(
                    "must be at most {}, got {}",
                    actors::shown::duration(MAX_ACK_REPLICAS_TIMEOUT),
                    actors::shown::duration(ack_replicas_timeout)
                ),
            );
        }
        url_ok.then_some(BrokerSettings {
            drain_on_shutdown,
            url,
            lease,
            settings: actors::broker::BrokerSettings {
                prefix,
                max_deliveries: max_deliveries.get(),
                result_ttl,
                max_entry_bytes: max_entry_bytes.clamp(MIN_MAX_ENTRY_BYTES, MAX_MAX_ENTRY_BYTES)
                    as usize,
                ack_replicas: ack_replicas.min(MAX_ACK_REPLICAS),
                ack_replicas_timeout: ack_replicas_timeout.min(MAX_ACK_REPLICAS_TIMEOUT),
                ..default
            },
        })
    }

    /// Checks the scheme (and a host for Redis) without echoing the URL, which may hold a
    /// password.
    fn broker_url(&mut self, url: &str, origin: &str) -> bool {
        const PATH: &str = "broker.url";
        let Some((scheme, _)) = url.split_once("://") else {
            self.error(
                PATH,
                format!(
                    "not a URL{origin}: expected memory://, redis://HOST:PORT/DB, rediss://… or \
                     redis+cluster://HOST:PORT,HOST:PORT…"
                ),
            );
            return false;
        };
        match scheme {
            "memory" => true,
            actors::broker::redis::CLUSTER_SCHEME => {
                match actors::broker::redis::cluster_seeds(url) {
                    Ok(_) => true,
                    Err(err) => {
                        self.error(PATH, format!("{err}{origin}"));
                        false
                    }
                }
            }
            "redis" | "rediss" => match Url::parse(url) {
                Ok(parsed) if parsed.host_str().is_some_and(|host| !host.is_empty()) => true,
                Ok(_) => {
                    self.error(PATH, format!("{scheme}:// URL without a host{origin}"));
                    false
                }
                Err(err) => {
                    self.error(PATH, format!("invalid {scheme}:// URL{origin}: {err}"));
                    false
                }
            },
            other => {
                self.error(
                    PATH,
                    format!(
                        "unsupported broker scheme \"{other}\"{origin}: use memory://, redis://, \
                         rediss:// or redis+cluster://"
                    ),
                );
                false
            }
        }
    }

    fn http(&mut self, raw: &RawHttp) -> Option<HttpSettings> {
        let (text, origin) = match self.env.get(HTTP_BIND_ENV) {
            Some(bind) => (bind, format!(" (set by {HTTP_BIND_ENV})")),
            None => (
                raw.bind.clone().unwrap_or_else(|| DEFAULT_BIND.into()),
                String::new(),
            ),
        };
        let bind = match SocketAddr::from_str(&text) {
            Ok(bind) => Some(bind),
            Err(_) => {
                self.error(
                    "http.bind",
                    format!("\"{text}\"{origin} is not IP:PORT (e.g. \"127.0.0.1:7070\")"),
                );
                None
            }
        };
        let exposed = bind.is_some_and(|bind| !bind.ip().is_loopback());
        let admin_token = match &raw.admin_token_env {
            None => {
                if exposed {
                    self.error(
                        "http.bind",
                        format!(
                            "{text} is not a loopback address and http.admin_token_env is not \
                             set: the mutating routes would be open to the network"
                        ),
                    );
                }
                None
            }
            Some(name) if exposed => {
                if !self.env_name("http.admin_token_env", name) || self.env.is_ignored() {
                    None
                } else {
                    let token = self.env.get(name);
                    if token.is_none() {
                        self.error(
                            "http.admin_token_env",
                            format!(
                                "environment variable {name} is not set and http.bind {text} \
                                 is not a loopback address: the mutating routes would be open \
                                 to the network"
                            ),
                        );
                    }
                    token
                }
            }
            Some(name) => self.secret(
                "http.admin_token_env",
                name,
                "the mutating routes accept requests without a token",
            ),
        };
        let admin_token = match (admin_token, &raw.admin_token_env) {
            (Some(token), Some(name)) => self.usable_token(name, token),
            _ => None,
        };
        let header_read_timeout = self.positive_duration(
            "http.header_read_timeout",
            &raw.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let body_read_timeout = self.positive_duration(
            "http.body_read_timeout",
            &raw.body_read_timeout,
            DEFAULT_BODY_READ_TIMEOUT,
        );
        let max_connections = self.nonzero(
            "http.max_connections",
            raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        );
        Some(HttpSettings {
            bind: bind?,
            admin_token_env: raw.admin_token_env.clone(),
            admin_token,
            header_read_timeout,
            body_read_timeout,
            max_connections,
        })
    }

    /// The admin token read from `name`, when a request could present it: a value of only
    /// whitespace, with whitespace around it (HTTP trims header values, so no `Authorization`
    /// header could carry it) or with control characters (no header can) is an error that
    /// names the variable, never the value.
    fn usable_token(&mut self, name: &str, token: String) -> Option<String> {
        let problem = if token.trim().is_empty() {
            "holds only whitespace"
        } else if token.trim() != token {
            "starts or ends with whitespace, which HTTP trims from header values"
        } else if token.chars().any(char::is_control) {
            "holds control characters (a newline?), which no HTTP header can carry"
        } else {
            return Some(token);
        };
        self.error(
            "http.admin_token_env",
            format!(
                "environment variable {name} {problem}: no request could present that token, \
                 so the mutating routes would refuse everyone"
            ),
        );
        None
    }

    fn supervision(&mut self, raw: &RawSupervision) -> Option<SupervisionSettings> {
        let (intensity, backoff) = (Intensity::default(), Backoff::default());
        let within = self.duration("supervision.within", &raw.within, intensity.within());
        let max_restarts = raw.max_restarts.unwrap_or(intensity.max_restarts());
        let intensity = match Intensity::try_new(max_restarts, within) {
            Ok(intensity) => Some(intensity),
            Err(err) => {
                self.error("supervision.within", err.to_string());
                None
            }
        };
        let base = self.duration("supervision.backoff", &raw.backoff, backoff.base());
        let max = self.duration("supervision.backoff_max", &raw.backoff_max, backoff.max());
        let backoff = self.backoff(
            "supervision",
            base,
            max,
            raw.jitter.unwrap_or(backoff.jitter()),
        );
        Some(SupervisionSettings {
            strategy: raw.strategy.unwrap_or_default(),
            intensity: intensity?,
            backoff,
        })
    }

    fn queues(
        &mut self,
        raw: &IndexMap<String, RawQueue>,
        runtime: &CompiledRuntime,
    ) -> IndexMap<String, QueueConfig> {
        let mut queues = IndexMap::new();
        for (name, queue) in raw {
            let at = format!("queues.{name}");
            self.name(&at, name);
            let mut consumer = QueueSettings::default();
            if let Some(n) = queue.concurrency {
                let n = self.nonzero(&format!("{at}.concurrency"), n);
                consumer.concurrency = NonZeroUsize::try_from(n).unwrap_or(consumer.concurrency);
            }
            consumer.prefetch = queue.prefetch.map_or(consumer.prefetch, |n| n as usize);
            if let Some(n) = queue.partitions
                && !(1..=actors::broker::MAX_PARTITIONS).contains(&n)
            {
                self.error(
                    format!("{at}.partitions"),
                    format!(
                        "must be from 1 to {}, got {n}",
                        actors::broker::MAX_PARTITIONS
                    ),
                );
            }
            let time_limit = self.opt_duration(&format!("{at}.time_limit"), &queue.time_limit);
            let soft_time_limit =
                self.opt_duration(&format!("{at}.soft_time_limit"), &queue.soft_time_limit);
            if time_limit.is_some_and(|limit| limit.is_zero()) {
                self.error(format!("{at}.time_limit"), "must be longer than zero");
            }
            let settings = QueueConfig {
                settings: consumer,
                time_limit,
                soft_time_limit,
            };
            if time_limit.is_some() || soft_time_limit.is_some() {
                let (hard, soft) = effective_limits(&runtime.settings, name, &settings, None);
                self.soft_below_hard(&at, &soft, &hard);
            }
            if let Some(limit) = time_limit
                && runtime.time_limit_written
                && limit > runtime.settings.time_limit
            {
                self.warning(
                    format!("{at}.time_limit"),
                    format!(
                        "{} is above runtime.time_limit {}; the queue's {} wins (the most \
                         specific limit wins: task, then queue, then runtime)",
                        duration::display(limit),
                        duration::display(runtime.settings.time_limit),
                        duration::display(limit),
                    ),
                );
            }
            queues.insert(name.clone(), settings);
        }
        queues
    }

    fn resources(
        &mut self,
        raw: &IndexMap<String, RawResource>,
    ) -> IndexMap<String, ResourceSettings> {
        let mut resources = IndexMap::new();
        for (name, resource) in raw {
            let at = format!("resources.{name}");
            self.name(&at, name);
            let compiled = match resource {
                RawResource::Zep(zep) => self.zep(&at, name, zep).map(ResourceSettings::Zep),
                RawResource::OpenAi(openai) => {
                    self.openai(&at, name, openai).map(ResourceSettings::OpenAi)
                }
            };
            if let Some(compiled) = compiled {
                resources.insert(name.clone(), compiled);
            }
        }
        resources
    }

    fn zep(&mut self, at: &str, name: &str, raw: &RawZep) -> Option<ZepSettings> {
        let base_url = self.http_url(
            &format!("{at}.base_url"),
            raw.base_url.as_deref().unwrap_or(zep::DEFAULT_BASE_URL),
        );
        let api_key = self.secret(
            &format!("{at}.api_key_env"),
            &raw.api_key_env,
            &format!("calls to resource {name} will fail and the tasks that use it with them"),
        );
        let timeout =
            self.positive_duration(&format!("{at}.timeout"), &raw.timeout, zep::DEFAULT_TIMEOUT);
        let breaker = self.breaker(&format!("{at}.breaker"), &raw.breaker);
        let auth_probe = self.auth_probe(
            at,
            raw.auth_probe_path.as_deref(),
            &raw.auth_probe_every,
            zep::DEFAULT_AUTH_PROBE_PATH,
        );
        Some(ZepSettings {
            resource: name.to_string(),
            base_url: base_url?,
            api_key_env: raw.api_key_env.clone(),
            api_key,
            timeout,
            breaker: breaker?,
            auth_probe: auth_probe?,
        })
    }

    /// `auth_probe_path` / `auth_probe_every` of the resource at `at`; `None` when invalid
    /// (reported).
    fn auth_probe(
        &mut self,
        at: &str,
        path: Option<&str>,
        every: &Option<RawDuration>,
        default_path: &str,
    ) -> Option<AuthProbe> {
        let every = self.positive_duration(
            &format!("{at}.auth_probe_every"),
            every,
            DEFAULT_PROBE_EVERY,
        );
        match AuthProbe::try_new(path.unwrap_or(default_path), every) {
            Ok(probe) => Some(probe),
            Err(err) => {
                self.error(format!("{at}.{}", err.field), err.reason);
                None
            }
        }
    }

    /// The breaker's policy: its defaults and rules are [`BreakerSettings::default`]'s and
    /// [`BreakerPolicy::try_new`]'s, each problem reported at `{at}.{field}`.
    fn breaker(&mut self, at: &str, raw: &RawBreaker) -> Option<BreakerPolicy> {
        let default = BreakerSettings::default();
        let mut duration = |key: &str, raw: &Option<RawDuration>, default: Duration| {
            self.duration(&format!("{at}.{key}"), raw, default)
        };
        let settings = BreakerSettings {
            failure_threshold: raw.failure_threshold.unwrap_or(default.failure_threshold),
            open_for: duration("open_for", &raw.open_for, default.open_for),
            open_for_max: duration("open_for_max", &raw.open_for_max, default.open_for_max),
            probes: raw.probes.unwrap_or(default.probes),
            probe_timeout: duration("probe_timeout", &raw.probe_timeout, default.probe_timeout),
            slow_call: self.opt_duration(&format!("{at}.slow_call"), &raw.slow_call),
            failure_rate: raw.failure_rate.as_ref().map(|rate| FailureRate {
                rate: rate.rate,
                window: rate.window,
                min_calls: rate.min_calls.unwrap_or(rate.window),
            }),
        };
        match BreakerPolicy::try_new(settings) {
            Ok(policy) => Some(policy),
            Err(errors) => {
                for err in errors {
                    self.error(format!("{at}.{}", err.field), err.reason);
                }
                None
            }
        }
    }

    /// A per-minute limit of an OpenAI resource (its rule is [`RateLimit::per_minute`]'s).
    fn per_minute(&mut self, path: &str, value: Option<u32>) -> Option<RateLimit> {
        match RateLimit::per_minute(value?) {
            Ok(limit) => Some(limit),
            Err(OpenAiError::Invalid(reason)) => {
                self.error(path, reason);
                None
            }
        }
    }

    fn openai(&mut self, at: &str, name: &str, raw: &RawOpenAi) -> Option<OpenAiSettings> {
        let base_url = self.http_url(
            &format!("{at}.base_url"),
            raw.base_url.as_deref().unwrap_or(openai::DEFAULT_BASE_URL),
        );
        let api_key = self.secret(
            &format!("{at}.api_key_env"),
            &raw.api_key_env,
            &format!("calls to resource {name} will fail and the tasks that use it with them"),
        );
        let requests = self.per_minute(
            &format!("{at}.requests_per_minute"),
            raw.requests_per_minute,
        );
        let tokens = self.per_minute(&format!("{at}.tokens_per_minute"), raw.tokens_per_minute);
        let concurrency = self.opt_nonzero(&format!("{at}.concurrency"), raw.concurrency);
        let auth_probe = self.auth_probe(
            at,
            raw.auth_probe_path.as_deref(),
            &raw.auth_probe_every,
            openai::DEFAULT_AUTH_PROBE_PATH,
        );
        Some(OpenAiSettings {
            base_url: base_url?,
            api_key_env: raw.api_key_env.clone(),
            api_key,
            requests,
            tokens,
            concurrency: concurrency.map(|n| n.get() as usize),
            timeout: None,
            auth_probe: auth_probe?,
        })
    }

    fn pools(&mut self, raw: &IndexMap<String, RawPool>) -> IndexMap<String, PoolConfig> {
        let mut pools = IndexMap::new();
        for (name, pool) in raw {
            let at = format!("pools.{name}");
            self.name(&at, name);
            if let Some(compiled) = self.pool(&at, name, pool) {
                pools.insert(name.clone(), compiled);
            }
        }
        pools
    }

    /// `[workers.NAME]`: each compiles to a worker pool ([`WorkerSettings`]) kept beside the
    /// agent pools (one name space: a name of `[pools]` cannot be used again here).
    fn workers(
        &mut self,
        raw: &IndexMap<String, RawWorkers>,
        agent_pools: &IndexMap<String, RawPool>,
        pools: &mut IndexMap<String, PoolConfig>,
    ) {
        for (name, workers) in raw {
            let at = format!("workers.{name}");
            self.name(&at, name);
            if agent_pools.contains_key(name) {
                self.error(
                    &at,
                    format!("[pools.{name}] has this name already: pools and workers share one name space"),
                );
                continue;
            }
            if let Some(compiled) = self.worker_pool(&at, name, workers) {
                pools.insert(name.clone(), compiled);
            }
        }
    }

    /// One worker pool: `processes + spares` processes kept warm (`min_idle` = `max`), each
    /// `python -u -m taskrt.worker`; the library's rules are [`PoolSpec::try_new`]'s.
    fn worker_pool(&mut self, at: &str, name: &str, raw: &RawWorkers) -> Option<PoolConfig> {
        self.child_env(at, &raw.env, &raw.pass_env, "worker processes start");
        let python = raw.python.clone().unwrap_or_else(|| "python3".to_string());
        // Never matched: a worker says it is ready over its channel, not on its output.
        let never = Regex::new("[^\\s\\S]").expect("a valid regex");
        let mut s = PoolSettings::new(name, &python, never);
        s.args = ["-u", "-m", "taskrt.worker"].map(String::from).to_vec();
        s.env = configured_env(&raw.env);
        s.cwd = raw.cwd.clone();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let processes = raw.processes.map_or(cores, |n| n as usize);
        let spares = raw.spares.map_or(1, |n| n as usize);
        let mut w = WorkerSettings::new(raw.modules.clone(), processes);
        w.concurrency = raw.concurrency.map_or(w.concurrency, |n| n as usize);
        w.max_tasks_per_process = raw.max_tasks_per_process;
        if let Some(db_close) = &raw.db_close {
            w.db_close = db_close.clone();
        }
        s.max = processes.saturating_add(spares);
        s.min_idle = s.max;
        s.memory_limit_mb = raw.memory_limit_mb.map(u64::from);
        s.startretries = raw.startretries.unwrap_or(s.startretries);
        for (key, raw_value, value) in [
            (
                "startup_timeout",
                &raw.startup_timeout,
                &mut s.startup_timeout,
            ),
            ("claim_timeout", &raw.claim_timeout, &mut s.claim_timeout),
            ("stop_timeout", &raw.stop_timeout, &mut s.stop_timeout),
        ] {
            *value = self.duration(&format!("{at}.{key}"), raw_value, *value);
        }
        s.worker = Some(w);
        self.pool_spec(at, s, &raw.pass_env)
    }

    /// The pool `s` validated by [`PoolSpec::try_new`], its errors reported at `{at}.{field}`.
    fn pool_spec(&mut self, at: &str, s: PoolSettings, pass_env: &[String]) -> Option<PoolConfig> {
        match PoolSpec::try_new(s) {
            Ok(spec) => Some(PoolConfig {
                spec,
                pass_env: pass_env.to_vec(),
            }),
            Err(errors) => {
                for err in errors {
                    self.error(format!("{at}.{}", err.field), err.reason);
                }
                None
            }
        }
    }

    /// Builds the pool's [`PoolSpec`]: this checks what only a config has (regexes, signal
    /// names, environment names, durations as written, Python's buffering); the library's
    /// own rules (`min_idle` not above `max`, no zero timeout…) and defaults are
    /// [`PoolSpec::try_new`]'s and [`PoolSettings::new`]'s, reported at `{at}.{field}`.
    fn pool(&mut self, at: &str, name: &str, raw: &RawPool) -> Option<PoolConfig> {
        self.child_env(at, &raw.env, &raw.pass_env, "agents start");
        let ready_pattern = self.regex(&format!("{at}.ready_pattern"), &raw.ready_pattern);
        let assigned_pattern = raw
            .assigned_pattern
            .as_ref()
            .map(|pattern| self.regex(&format!("{at}.assigned_pattern"), pattern));
        if let (Some(ready), Some(Some(assigned))) = (&ready_pattern, &assigned_pattern)
            && let Some(line) = line_matching_both(ready, assigned)
        {
            self.warning(
                format!("{at}.ready_pattern"),
                format!(
                    "this and assigned_pattern both match the line {line:?}: an agent \
                     confirming an assignment could be taken for ready, or a ready one for \
                     confirming (checked on the literal text of each pattern, not on every \
                     possible line)"
                ),
            );
        }
        if let Some(program) = buffered_python(raw) {
            self.warning(
                format!("{at}.env"),
                format!(
                    "{program} runs without -u and without PYTHONUNBUFFERED: its stdout is \
                     block-buffered on a pipe, so the lines ready_pattern and assigned_pattern \
                     wait for arrive late or only at exit (add PYTHONUNBUFFERED = \"1\" to env, \
                     or -u to args)"
                ),
            );
        }
        // A bad `ready_pattern` (reported) stands in as one that matches nothing, so that the
        // spec still reports every other problem in this pass.
        let ready = (ready_pattern.clone()).unwrap_or_else(|| Regex::new("[^\\s\\S]").unwrap());
        let mut s = PoolSettings::new(name, &raw.command, ready);
        s.args = raw.args.clone();
        s.env = configured_env(&raw.env);
        s.cwd = raw.cwd.clone();
        s.max = raw.max as usize;
        s.min_idle = raw.min_idle.map_or(s.min_idle, |n| n as usize);
        s.assigned_pattern = assigned_pattern.flatten();
        s.memory_limit_mb = raw.memory_limit_mb.map(u64::from);
        s.max_idle_age = self.opt_duration(&format!("{at}.max_idle_age"), &raw.max_idle_age);
        s.reusable = raw.reusable.unwrap_or(s.reusable);
        s.startretries = raw.startretries.unwrap_or(s.startretries);
        for (key, raw_value, value) in [
            (
                "startup_timeout",
                &raw.startup_timeout,
                &mut s.startup_timeout,
            ),
            ("assign_timeout", &raw.assign_timeout, &mut s.assign_timeout),
            ("claim_timeout", &raw.claim_timeout, &mut s.claim_timeout),
            ("stop_timeout", &raw.stop_timeout, &mut s.stop_timeout),
        ] {
            *value = self.duration(&format!("{at}.{key}"), raw_value, *value);
        }
        if let Some(text) = raw.stop_signal.as_deref() {
            match STOP_SIGNALS.into_iter().find(|s| s.as_str() == text) {
                Some(signal) => s.stop_signal = signal,
                None => {
                    let names: Vec<_> = STOP_SIGNALS.iter().map(|s| s.as_str()).collect();
                    self.error(
                        format!("{at}.stop_signal"),
                        format!("unknown signal \"{text}\": use one of {}", names.join(", ")),
                    );
                }
            }
        }
        let compiled = self.pool_spec(at, s, &raw.pass_env);
        ready_pattern.and(compiled)
    }

    fn tasks(
        &mut self,
        raw: &RawConfig,
        runtime: &CompiledRuntime,
        queues: &IndexMap<String, QueueConfig>,
    ) -> IndexMap<String, TaskSettings> {
        let mut tasks = IndexMap::new();
        for (name, task) in &raw.tasks {
            let at = format!("tasks.{name}");
            self.name(&at, name);
            if let Some(compiled) = self.task(&at, name, task, raw, runtime, queues) {
                tasks.insert(name.clone(), compiled);
            }
        }
        tasks
    }

    fn task(
        &mut self,
        at: &str,
        name: &str,
        raw: &RawTask,
        config: &RawConfig,
        runtime: &CompiledRuntime,
        queues: &IndexMap<String, QueueConfig>,
    ) -> Option<TaskSettings> {
        let queue_name = raw.queue.as_deref().unwrap_or(DEFAULT_QUEUE);
        if !config.queues.contains_key(queue_name) {
            let note = if raw.queue.is_none() {
                " (a task without `queue` goes to \"default\")"
            } else {
                ""
            };
            self.undefined(
                format!("{at}.queue"),
                "queue",
                queue_name,
                &config.queues,
                note,
            );
        }

        let handler = self.handler(&format!("{at}.handler"), name, &raw.handler, config);

        let time_limit = self.opt_duration(&format!("{at}.time_limit"), &raw.time_limit);
        if time_limit.is_some_and(|limit| limit.is_zero()) {
            self.error(format!("{at}.time_limit"), "must be longer than zero");
        }
        let soft_time_limit =
            self.opt_duration(&format!("{at}.soft_time_limit"), &raw.soft_time_limit);
        let own = TaskLimits {
            time_limit,
            soft_time_limit,
        };
        // A queue that failed to compile (or is undefined) contributes no limits.
        let queue = queues.get(queue_name);
        let empty = QueueConfig {
            settings: QueueSettings::default(),
            time_limit: None,
            soft_time_limit: None,
        };
        let (hard, soft) = effective_limits(
            &runtime.settings,
            queue_name,
            queue.unwrap_or(&empty),
            Some((at, &own)),
        );
        if time_limit.is_some() || soft_time_limit.is_some() {
            self.soft_below_hard(at, &soft, &hard);
        }
        if let Some(limit) = time_limit {
            self.limit_above_fallback(at, queue_name, limit, queue, runtime);
        }
        if let Some(Handler::Http {
            timeout: Some(timeout),
            ..
        }) = &handler
            && *timeout > hard.value
        {
            self.warning(
                format!("{at}.handler.timeout"),
                format!(
                    "{} is above the task's time_limit {}: the hard limit stops the request \
                     first",
                    duration::display(*timeout),
                    hard.describe()
                ),
            );
        }

        let base = self.duration(
            &format!("{at}.backoff"),
            &raw.backoff,
            DEFAULT_RETRY_BACKOFF,
        );
        let max = self.duration(
            &format!("{at}.backoff_max"),
            &raw.backoff_max,
            DEFAULT_RETRY_BACKOFF_MAX,
        );
        let jitter = raw.jitter.unwrap_or(Backoff::default().jitter());
        let backoff = self.backoff(at, base, max, jitter);

        let uses_at = format!("{at}.uses");
        self.no_duplicates(&uses_at, &raw.uses);
        self.references(&uses_at, &raw.uses, "resource", &config.resources);
        let degrades_at = format!("{at}.degrades");
        self.no_duplicates(&degrades_at, &raw.degrades);
        self.references(&degrades_at, &raw.degrades, "resource", &config.resources);
        for name in raw.degrades.iter().filter(|name| raw.uses.contains(name)) {
            self.error(
                &degrades_at,
                format!(
                    "\"{name}\" is also in uses: a task either waits for a resource (uses) or \
                     runs without it (degrades)"
                ),
            );
        }
        let uses = raw
            .uses
            .iter()
            .map(|name| Use::required(name))
            .chain(raw.degrades.iter().map(|name| Use::degradable(name)))
            .collect();
        for (key, links) in [("link", &raw.link), ("link_error", &raw.link_error)] {
            let path = format!("{at}.{key}");
            self.no_duplicates(&path, links);
            self.references(&path, links, "task", &config.tasks);
            if links.iter().any(|link| link == name) {
                self.warning(
                    path,
                    format!("{name} enqueues itself: every run starts another one, forever"),
                );
            }
        }
        let idempotency = raw.idempotency.as_ref().map(|idempotency| Idempotency {
            ttl: self.positive_duration(
                &format!("{at}.idempotency.ttl"),
                &Some(idempotency.ttl.clone()),
                Duration::from_secs(1),
            ),
        });

        Some(TaskSettings {
            queue: queue_name.to_owned(),
            handler: handler?,
            time_limit: hard.value,
            soft_time_limit: soft.map(|soft| soft.value),
            retry: RetryPolicy {
                max_retries: raw.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
                backoff,
                retry_on_timeout: raw.retry_on_timeout.unwrap_or(true),
            },
            uses,
            link: raw.link.clone(),
            link_error: raw.link_error.clone(),
            idempotency,
            store_result: raw.store_result.unwrap_or(true),
        })
    }

    /// The seed conflict: a task's hard limit above its queue's (or, when the queue sets none,
    /// above a written runtime default). Legal — the task's wins — but said out loud.
    fn limit_above_fallback(
        &mut self,
        at: &str,
        queue_name: &str,
        limit: Duration,
        queue: Option<&QueueConfig>,
        runtime: &CompiledRuntime,
    ) {
        let fallback = match queue.and_then(|queue| queue.time_limit) {
            Some(queue_limit) => Some((queue_limit, format!("queues.{queue_name}.time_limit"))),
            None if runtime.time_limit_written => {
                Some((runtime.settings.time_limit, "runtime.time_limit".to_owned()))
            }
            None => None,
        };
        if let Some((fallback, what)) = fallback
            && limit > fallback
        {
            self.warning(
                format!("{at}.time_limit"),
                format!(
                    "{} is above {what} {}; the task's {} wins (the most specific limit wins: \
                     task, then queue, then runtime)",
                    duration::display(limit),
                    duration::display(fallback),
                    duration::display(limit),
                ),
            );
        }
    }

    fn handler(
        &mut self,
        at: &str,
        task: &str,
        raw: &RawHandler,
        config: &RawConfig,
    ) -> Option<Handler> {
        let pools = &config.pools;
        match raw {
            RawHandler::Http(http) => {
                let url = self.http_url(&format!("{at}.url"), &http.url);
                let timeout = self.opt_duration(&format!("{at}.timeout"), &http.timeout);
                if timeout.is_some_and(|timeout| timeout.is_zero()) {
                    self.error(format!("{at}.timeout"), "must be longer than zero");
                }
                Some(Handler::Http { url: url?, timeout })
            }
            RawHandler::Exec(exec) => {
                if exec.command.trim().is_empty() {
                    self.error(format!("{at}.command"), "must not be empty");
                }
                self.child_env(at, &exec.env, &exec.pass_env, "its commands run");
                Some(Handler::Exec {
                    command: exec.command.clone(),
                    args: exec.args.clone(),
                    cwd: exec.cwd.clone(),
                    env: exec.env.clone(),
                    pass_env: exec.pass_env.clone(),
                })
            }
            RawHandler::Native(_) => Some(Handler::Native),
            RawHandler::Pool(pool) => {
                if !pools.contains_key(&pool.pool) {
                    self.undefined(format!("{at}.pool"), "pool", &pool.pool, pools, "");
                }
                Some(Handler::Pool {
                    pool: pool.pool.clone(),
                })
            }
            RawHandler::Python(python) => {
                let workers = &config.workers;
                if !workers.contains_key(&python.workers) {
                    let note = if pools.contains_key(&python.workers) {
                        " ([pools.NAME] are agent pools: a python task runs on [workers.NAME])"
                    } else {
                        ""
                    };
                    self.undefined(
                        format!("{at}.workers"),
                        "worker",
                        &python.workers,
                        workers,
                        note,
                    );
                }
                let function = python.function.clone().unwrap_or_else(|| task.to_string());
                if function.trim().is_empty() {
                    self.error(format!("{at}.function"), "must not be empty");
                }
                Some(Handler::Python {
                    pool: python.workers.clone(),
                    function,
                })
            }
        }
    }

    /// The bridge's settings: this checks what only a config knows (a Redis broker, the
    /// dead-letter queue and the mapped tasks defined, durations as written); the defaults
    /// and the bridge's own rules are [`CelerySettings::new`]'s and
    /// [`CelerySettings::check`]'s, reported at `celery.{field}`.
    fn celery(
        &mut self,
        raw: &RawCelery,
        broker: Option<&BrokerSettings>,
        config: &RawConfig,
        compiled: &IndexMap<String, TaskSettings>,
    ) -> Option<CelerySettings> {
        if broker.is_some_and(|b| !b.url.starts_with("redis")) {
            self.error(
                "celery",
                "the Celery bridge needs a Redis broker (broker.url = the Celery broker's redis://…)",
            );
        } else if broker.is_some_and(|b| b.url.starts_with(actors::broker::redis::CLUSTER_SCHEME)) {
            self.error(
                "celery",
                "the Celery bridge needs a single Redis server: kombu's lists have no hash tags, so \
                 a Redis Cluster cannot move them into the runtime's streams atomically (run the \
                 bridge on a node whose broker.url is the Celery broker's redis://…)",
            );
        }
        let dead_letter_queue = match &raw.dead_letter_queue {
            Some(queue) => {
                if !config.queues.contains_key(queue) {
                    self.undefined(
                        "celery.dead_letter_queue",
                        "queue",
                        queue,
                        &config.queues,
                        "",
                    );
                }
                queue.clone()
            }
            None => match config.queues.keys().next() {
                Some(first) => first.clone(),
                None => {
                    self.error(
                        "celery.dead_letter_queue",
                        "no [queues.NAME] is defined to hold malformed Celery messages",
                    );
                    String::new()
                }
            },
        };
        let mut s = CelerySettings::new(dead_letter_queue);
        s.backend_url = raw.backend_url.clone();
        s.key_prefix = raw.key_prefix.clone().unwrap_or(s.key_prefix);
        s.queues = raw.queues.clone();
        s.default_queue = raw.default_queue.clone().unwrap_or(s.default_queue);
        s.result_ttl = self.duration("celery.result_ttl", &raw.result_ttl, s.result_ttl);
        s.poll = self.duration("celery.poll", &raw.poll, s.poll);
        s.batch = raw.batch.map_or(s.batch, |n| n as usize);
        s.movers = raw.movers.map_or(s.movers, |n| n as usize);
        // Each runtime task runs on its queue; one that did not compile is reported already.
        let mapped = |runtime: &str| {
            let task = compiled.get(runtime)?;
            Some((runtime.to_string(), task.queue.clone()))
        };
        for (name, task) in &raw.tasks {
            let at = format!("celery.tasks.\"{name}\"");
            let runtime = task.task.clone().unwrap_or_else(|| name.clone());
            if !config.tasks.contains_key(&runtime) {
                if self.unreadable.contains(&format!("tasks.{runtime}")) {
                    continue;
                }
                let path = if task.task.is_some() {
                    format!("{at}.task")
                } else {
                    at.clone()
                };
                let mut message = format!(
                    "Celery task `{name}` is mapped to nothing: {}",
                    undefined("task", &runtime, &self.declared_or("task", &config.tasks))
                );
                if task.task.is_none() {
                    message.push_str(" (set `task` to the runtime task that runs it)");
                }
                self.error(path, message);
                continue;
            }
            if task.track_started == Some(true) {
                s.track_started.insert(runtime.clone());
            }
            if let Some(target) = mapped(&runtime) {
                s.tasks.insert(name.clone(), target);
            }
        }
        // Every runtime task maps its own name too, unless that name is mapped elsewhere.
        for name in compiled.keys() {
            if !s.tasks.contains_key(name)
                && let Some(target) = mapped(name)
            {
                s.tasks.insert(name.clone(), target);
            }
        }
        let errors = s.check();
        for err in &errors {
            self.error(format!("celery.{}", err.field), err.reason.clone());
        }
        errors.is_empty().then_some(s)
    }

    /// The schedules, each with the queue of its task (from `tasks`, compiled).
    fn schedules(
        &mut self,
        raw: &RawConfig,
        tasks: &IndexMap<String, TaskSettings>,
    ) -> IndexMap<String, Schedule> {
        let mut schedules = IndexMap::new();
        for (name, schedule) in &raw.schedules {
            let at = format!("schedules.{name}");
            self.name(&at, name);
            if let Some(compiled) = self.schedule(&at, name, schedule, &raw.tasks, tasks) {
                schedules.insert(name.clone(), compiled);
            }
        }
        schedules
    }

    fn schedule(
        &mut self,
        at: &str,
        name: &str,
        raw: &RawSchedule,
        tasks: &IndexMap<String, RawTask>,
        compiled: &IndexMap<String, TaskSettings>,
    ) -> Option<Schedule> {
        if !tasks.contains_key(&raw.task) {
            self.undefined(format!("{at}.task"), "task", &raw.task, tasks, "");
        }
        let trigger = match (&raw.every, &raw.cron) {
            (Some(every), None) => {
                let every = self.opt_duration(&format!("{at}.every"), &Some(every.clone()))?;
                if every.is_zero() {
                    self.error(format!("{at}.every"), "must be longer than zero");
                    return None;
                }
                Trigger::Every(every)
            }
            (None, Some(expression)) => {
                let parser = CronParser::builder().seconds(Seconds::Disallowed).build();
                match parser.parse(expression) {
                    Ok(cron) => Trigger::Cron {
                        expression: expression.clone(),
                        cron: Box::new(cron),
                        timezone: chrono_tz::UTC,
                    },
                    Err(err) => {
                        self.error(
                            format!("{at}.cron"),
                            format!(
                                "invalid cron expression \"{expression}\": {}",
                                cron_problem(&parser, expression, &err)
                            ),
                        );
                        return None;
                    }
                }
            }
            (Some(_), Some(_)) => {
                self.error(at, "sets both `every` and `cron`: set exactly one");
                return None;
            }
            (None, None) => {
                self.error(at, "sets neither `every` nor `cron`: set exactly one");
                return None;
            }
        };
        let timezone = match raw.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(text) => match text.parse::<chrono_tz::Tz>() {
                Ok(timezone) => timezone,
                Err(_) => {
                    let zones = chrono_tz::TZ_VARIANTS.iter().map(|zone| zone.name());
                    let hint = match did_you_mean(text, zones) {
                        Some(close) => format!("did you mean \"{close}\"?"),
                        None => "use an IANA name such as \"UTC\" or \"Europe/Istanbul\"".into(),
                    };
                    self.error(
                        format!("{at}.timezone"),
                        format!("unknown time zone \"{text}\": {hint}"),
                    );
                    return None;
                }
            },
        };
        let trigger = match trigger {
            Trigger::Cron {
                expression, cron, ..
            } => Trigger::Cron {
                expression,
                cron,
                timezone,
            },
            every => every,
        };
        let jitter = self.opt_duration(&format!("{at}.jitter"), &raw.jitter);
        Some(Schedule {
            name: name.to_string(),
            task: raw.task.clone(),
            queue: (compiled.get(&raw.task))
                .map(|task| task.queue.clone())
                .unwrap_or_default(),
            args: raw.args.clone(),
            kwargs: raw.kwargs.clone(),
            trigger,
            jitter,
            missed: raw.missed.unwrap_or_default(),
        })
    }
}

/// A task's own limits, before resolution.
struct TaskLimits {
    time_limit: Option<Duration>,
    soft_time_limit: Option<Duration>,
}

/// Resolves (hard, soft) task → queue → runtime, remembering where each came from.
fn effective_limits(
    runtime: &RuntimeSettings,
    queue_name: &str,
    queue: &QueueConfig,
    task: Option<(&str, &TaskLimits)>,
) -> (Limit, Option<Limit>) {
    let hard = task
        .and_then(|(at, task)| task.time_limit.map(|value| (at, value)))
        .map(|(at, value)| Limit {
            value,
            from: format!("{at}.time_limit"),
        })
        .or_else(|| {
            queue.time_limit.map(|value| Limit {
                value,
                from: format!("queues.{queue_name}.time_limit"),
            })
        })
        .unwrap_or_else(|| Limit {
            value: runtime.time_limit,
            from: "runtime.time_limit".into(),
        });
    let soft = task
        .and_then(|(at, task)| task.soft_time_limit.map(|value| (at, value)))
        .map(|(at, value)| Limit {
            value,
            from: format!("{at}.soft_time_limit"),
        })
        .or_else(|| {
            queue.soft_time_limit.map(|value| Limit {
                value,
                from: format!("queues.{queue_name}.soft_time_limit"),
            })
        })
        .or_else(|| {
            runtime.soft_time_limit.map(|value| Limit {
                value,
                from: "runtime.soft_time_limit".into(),
            })
        });
    (hard, soft)
}

/// The fields of a cron expression, in order, with the values each takes.
const CRON_FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, 0 and 7 both Sunday"),
];

/// Why `expression` is not a cron expression, naming the field at fault: croner says only
/// what is wrong ("Number out of bounds."), so each of the five fields is parsed alone (the
/// others `*`) to find the one it is about.
fn cron_problem(parser: &CronParser, expression: &str, err: &croner::errors::CronError) -> String {
    let reason = err.to_string();
    let reason = [
        "Component error: ",
        "Invalid pattern: ",
        "Pattern contains illegal characters: ",
    ]
    .iter()
    .find_map(|prefix| reason.strip_prefix(prefix))
    .unwrap_or(&reason)
    .trim()
    .trim_start_matches("CronPattern ")
    .trim_end_matches('.');
    let mut chars = reason.chars();
    let reason: String = chars
        .next()
        .map(|first| first.to_lowercase().chain(chars).collect())
        .unwrap_or_default();
    let names = CRON_FIELDS.map(|(name, _)| name).join(" ");
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if fields.len() != CRON_FIELDS.len() {
        return format!(
            "{} fields, expected five: {names} (no seconds field)",
            fields.len()
        );
    }
    for (i, (name, values)) in CRON_FIELDS.iter().enumerate() {
        let mut alone = ["*"; 5];
        alone[i] = fields[i];
        if parser.parse(&alone.join(" ")).is_err() {
            return format!(
                "the {name} field \"{}\": {reason} ({name} is {values}; five fields: {names})",
                fields[i]
            );
        }
    }
    format!("{reason} (five fields: {names})")
}

/// `queue "chta" is not defined; did you mean "chat"? defined queues: chat, default` (or
/// "no queues are defined").
fn undefined(what: &str, name: &str, defined: &[String]) -> String {
    if defined.is_empty() {
        format!("{what} \"{name}\" is not defined (no {what}s are defined)")
    } else {
        let names: Vec<&str> = defined.iter().map(String::as_str).collect();
        let suggestion = did_you_mean(name, names.iter().copied())
            .map(|close| format!(" did you mean \"{close}\"?"))
            .unwrap_or_default();
        format!(
            "{what} \"{name}\" is not defined;{suggestion} defined {what}s: {}",
            names.join(", ")
        )
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A line that both patterns match, looked for among the literal text each pattern requires
/// (the alternatives of `a|b`, the fixed prefix and suffix of `Connected to \w+`): patterns
/// that only overlap on other lines are not found — two regexes cannot be compared in
/// general, but the agent's own log lines are usually those literals.
fn line_matching_both(ready: &Regex, assigned: &Regex) -> Option<String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let mut samples = Vec::new();
    for pattern in [ready.as_str(), assigned.as_str()] {
        let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else {
            continue;
        };
        for kind in [ExtractKind::Prefix, ExtractKind::Suffix] {
            let literals = Extractor::new().kind(kind).extract(&hir);
            for literal in literals.literals().unwrap_or_default() {
                if let Ok(text) = std::str::from_utf8(literal.as_bytes())
                    && !text.trim().is_empty()
                {
                    samples.push(text.to_string());
                }
            }
        }
    }
    samples
        .into_iter()
        .find(|line| ready.is_match(line) && assigned.is_match(line))
}

/// The program's name when a pool runs Python with a buffered stdout: the command is
/// `python`, `python3`, `python3.12`… (any directory), no `-u` among the interpreter's own
/// options (those before the script, `-m` or `-c`; `-Bu` counts) and no `PYTHONUNBUFFERED`
/// in `env` (set to anything non-empty, as Python reads it) or `pass_env`.
/// A pool's configured `env` as its spec takes it: names `child_env` reported are left out
/// (the config is refused anyway, and the spec would report them a second time).
fn configured_env(env: &IndexMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(key, _)| is_env_name(key) && !actors::child::RESERVED.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

fn buffered_python(raw: &RawPool) -> Option<String> {
    let program = std::path::Path::new(raw.command.trim())
        .file_name()?
        .to_str()?
        .to_string();
    let version = program.strip_prefix("python")?;
    if !version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let unbuffered_env = raw
        .env
        .get("PYTHONUNBUFFERED")
        .is_some_and(|value| !value.is_empty())
        || raw.pass_env.iter().any(|name| name == "PYTHONUNBUFFERED");
    let mut args = raw.args.iter();
    while let Some(arg) = args.next() {
        let Some(flags) = arg.strip_prefix('-') else {
            break; // the script: what follows is its own
        };
        if flags.is_empty() || flags.starts_with('-') {
            if arg == "--" {
                break;
            }
            continue; // `--long` options of the interpreter
        }
        // Short options, possibly bundled (`-Bu`); `-c`, `-m`, `-W`, `-X` take a value, the
        // rest of this argument or the next one, and `-c`/`-m` end the interpreter's options.
        for (at, flag) in flags.char_indices() {
            match flag {
                'u' => return None,
                'c' | 'm' | 'W' | 'X' => {
                    if at + 1 == flags.len() {
                        args.next();
                    }
                    if matches!(flag, 'c' | 'm') {
                        return (!unbuffered_env).then_some(program);
                    }
                    break;
                }
                _ => {}
            }
        }
    }
    (!unbuffered_env).then_some(program)
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
