//! The config file as written: serde structs with `deny_unknown_fields`, tables kept in
//! declaration order (declaration order is start order).
//!
//! Nothing here is validated beyond the shape of the TOML: durations, URLs, regexes, cron
//! expressions and cross-references stay text, and `compile()` checks them all in one pass.
//! serde stops at the first shape error (an unknown key, a wrong type, a missing required
//! key); [`parse`] reads the file again without what it stopped at until it reads, so that
//! every shape error is reported in one run, each named by its key path, with the line and
//! column, and "did you mean" for a misspelt key — the derives here stay the only list of
//! keys.
//!
//! The `///` comments on these fields are the user documentation of the config; defaults are
//! stated here and applied in `compile()`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use actors::supervisor::Strategy;
use indexmap::IndexMap;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Diagnostic, Severity, did_you_mean};
use super::duration::RawDuration;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "the config file (a TOML table)")]
pub(crate) struct RawConfig {
    /// `[runtime]`: the node itself.
    #[serde(default)]
    pub(crate) runtime: RawRuntime,
    /// `[broker]`: where tasks are queued.
    #[serde(default)]
    pub(crate) broker: RawBroker,
    /// `[http]`: the introspection/admin server.
    #[serde(default)]
    pub(crate) http: RawHttp,
    /// `[supervision]`: restart policy of every supervisor.
    #[serde(default)]
    pub(crate) supervision: RawSupervision,
    /// `[queues.NAME]`: one bulkhead (consumer) per queue, started in this order.
    #[serde(default)]
    pub(crate) queues: IndexMap<String, RawQueue>,
    /// `[tasks.NAME]`: task definitions.
    #[serde(default)]
    pub(crate) tasks: IndexMap<String, RawTask>,
    /// `[resources.NAME]`: shared external services (breakers, rate limits).
    #[serde(default)]
    pub(crate) resources: IndexMap<String, RawResource>,
    /// `[pools.NAME]`: pools of prewarmed processes.
    #[serde(default)]
    pub(crate) pools: IndexMap<String, RawPool>,
    /// `[workers.NAME]`: pools of Python worker processes that run `python` tasks.
    #[serde(default)]
    pub(crate) workers: IndexMap<String, RawWorkers>,
    /// `[schedules.NAME]`: periodic tasks (beat).
    #[serde(default)]
    pub(crate) schedules: IndexMap<String, RawSchedule>,
    /// `[beat]`: how the nodes elect the one that enqueues the schedules.
    #[serde(default)]
    pub(crate) beat: RawBeat,
    /// `[chaos]`: fault injection for tests and drills.
    #[serde(default)]
    pub(crate) chaos: RawChaos,
    /// `[celery]`: the Celery bridge (take over kombu queues, answer `AsyncResult`).
    #[serde(default)]
    pub(crate) celery: Option<RawCelery>,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub(crate) metrics: RawMetrics,
    /// `[events]`: the lifecycle events stream.
    #[serde(default)]
    pub(crate) events: RawEvents,
}

/// `[runtime]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [runtime] table")]
pub(crate) struct RawRuntime {
    /// Time allowed for an orderly stop after SIGINT/SIGTERM before what is left is killed.
    /// Default `"30s"`.
    pub(crate) shutdown_grace: Option<RawDuration>,
    /// How often the heartbeat actor records uptime. Default `"1s"`; must be above zero.
    pub(crate) heartbeat_interval: Option<RawDuration>,
    /// Hard time limit of a task whose task and queue set none. Default `"5m"`.
    pub(crate) time_limit: Option<RawDuration>,
    /// Soft time limit of a task whose task and queue set none. Default: none.
    pub(crate) soft_time_limit: Option<RawDuration>,
    /// Name of this node in events, leases and the beat leader key (`[A-Za-z0-9_-]+`).
    /// Default: none (the node derives one when it starts).
    pub(crate) node_name: Option<String>,
    /// How long a running task revoked with terminate (`runtime revoke ID --terminate`) has
    /// between the soft signal (its cancellation token, SIGTERM to an `exec` command's process
    /// group) and the hard stop. Default `"10s"`; the task's hard time limit still applies if
    /// it comes first.
    pub(crate) terminate_grace: Option<RawDuration>,
}

/// `[broker]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [broker] table")]
pub(crate) struct RawBroker {
    /// `memory://` (embedded, single node), `redis://HOST:PORT/DB` or `rediss://…` (TLS).
    /// Default `"memory://"`. The environment variable `RT_BROKER_URL` overrides it.
    pub(crate) url: Option<String>,
    /// Prefix of every Redis key (`rt:{chat}:stream`). Default `"rt"`.
    pub(crate) prefix: Option<String>,
    /// How long a running task's message stays claimed without renewal before another node
    /// may take it over (renewed every lease/3 while the task runs). Default `"30s"`.
    pub(crate) lease: Option<RawDuration>,
    /// Deliveries after which a message is dead-lettered instead of delivered again (poison
    /// messages). Default 5; at least 1.
    pub(crate) max_deliveries: Option<u32>,
    /// How long a task's result is kept. Default `"24h"`.
    pub(crate) result_ttl: Option<RawDuration>,
    /// Largest task envelope, in bytes of its JSON as stored, that is enqueued (`POST /tasks`
    /// answers 413 above it; callbacks, beat and native enqueues get an error) or run (a larger
    /// entry another producer wrote into a queue is dead-lettered unrun, reason
    /// `entry too large: …`). An integer; default 1048576 (1 MiB); from 1024 to 536870912
    /// (512 MiB, Redis' largest string).
    pub(crate) max_entry_bytes: Option<u64>,
    /// `memory://` only (its queues live in the node's process and end with it): on SIGTERM or
    /// SIGINT the consumers keep taking ready tasks until every queue is empty (nothing
    /// ready, nothing running) or `runtime.shutdown_grace` runs out, and only then stop; what
    /// is left is counted in the log. Default `false`: stop fetching at once (what is left is
    /// counted in the log all the same). Has no effect with Redis, which keeps the entries.
    pub(crate) drain_on_shutdown: Option<bool>,
    /// Redis only: answer an enqueue only once this many replicas of the master that took it
    /// have it (`WAIT`), so a master failover cannot lose an acknowledged task. Default 0 (off);
    /// at most 16.
    pub(crate) ack_replicas: Option<u32>,
    /// How long an enqueue waits for `ack_replicas` replicas before it fails. Default `"1s"`;
    /// from 1 ms to 60 s.
    pub(crate) ack_replicas_timeout: Option<RawDuration>,
}

/// `[http]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [http] table")]
pub(crate) struct RawHttp {
    /// Listen address, `IP:PORT`. Default `"127.0.0.1:7070"`. The environment variable
    /// `RT_HTTP_BIND` overrides it. A non-loopback address needs `admin_token_env`.
    pub(crate) bind: Option<String>,
    /// Name of the environment variable that holds the bearer token required by mutating
    /// routes (never the token itself). Default: none (no token on loopback).
    pub(crate) admin_token_env: Option<String>,
    /// Time a client has to send a request's line and headers, from the moment the server
    /// waits for them (a new connection, or the end of the previous answer on a kept-alive
    /// one); past it the connection is closed without an answer. Bounds slow and idle
    /// connections. Default `"10s"`; must be above zero.
    pub(crate) header_read_timeout: Option<RawDuration>,
    /// Time a client has, once its headers are read, to send the whole request body; past it
    /// the request is answered `408` (JSON) and the connection closed. Answers, such as the
    /// `/events` stream or an egress response, are not limited. Default `"30s"`; must be
    /// above zero.
    pub(crate) body_read_timeout: Option<RawDuration>,
    /// Connections open at once (`/events` streams and kept-alive ones included); further
    /// ones wait in the kernel's listen backlog until one closes. Default 512; at least 1.
    pub(crate) max_connections: Option<u32>,
}

/// `[supervision]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [supervision] table")]
pub(crate) struct RawSupervision {
    /// `one_for_one`, `one_for_all` or `rest_for_one`. Default `one_for_one`.
    pub(crate) strategy: Option<Strategy>,
    /// Restarts allowed within `within` before a supervisor gives up and fails to its parent.
    /// Default 5.
    pub(crate) max_restarts: Option<u32>,
    /// The restart intensity window. Default `"10s"`; must be above zero.
    pub(crate) within: Option<RawDuration>,
    /// First restart delay, doubled for each consecutive restart. Default `"20ms"`.
    pub(crate) backoff: Option<RawDuration>,
    /// Cap of the restart delay; not below `backoff`. Default `"5s"`.
    pub(crate) backoff_max: Option<RawDuration>,
    /// Fraction (0.0–1.0) by which a delay is shortened at random. Default 0.2.
    pub(crate) jitter: Option<f64>,
}

/// `[queues.NAME]`: a bulkhead with its own concurrency and limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [queues.NAME] table")]
pub(crate) struct RawQueue {
    /// Tasks of this queue that run at once on this node. Default 1; at least 1.
    pub(crate) concurrency: Option<u32>,
    /// Messages fetched ahead beyond the running ones. Default 0 (fetch only into free slots).
    pub(crate) prefetch: Option<u32>,
    /// Hard time limit of the queue's tasks that set none. Default: `runtime.time_limit`.
    pub(crate) time_limit: Option<RawDuration>,
    /// Soft time limit of the queue's tasks that set none. Default: `runtime.soft_time_limit`.
    pub(crate) soft_time_limit: Option<RawDuration>,
    /// Redis: streams the queue is made of (each its own hash tag, so on a Redis Cluster its own
    /// slot, possibly its own master). Default 1; from 1 to 64.
    pub(crate) partitions: Option<u32>,
}

/// `[tasks.NAME]`: a task definition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tasks.NAME] table")]
pub(crate) struct RawTask {
    /// The queue it is routed to. Default `"default"` (which must then be defined).
    pub(crate) queue: Option<String>,
    /// What runs it: an inline table with `kind` = `http`, `exec`, `native`, `pool` or
    /// `python`.
    pub(crate) handler: RawHandler,
    /// Hard time limit. Default: the queue's, then `runtime.time_limit` (most specific wins).
    pub(crate) time_limit: Option<RawDuration>,
    /// Soft time limit; below the hard one. Default: the queue's, then the runtime's.
    pub(crate) soft_time_limit: Option<RawDuration>,
    /// Retries after the first attempt before the task is dead-lettered. Default 3.
    pub(crate) max_retries: Option<u32>,
    /// First retry delay, doubled per attempt (or the server's Retry-After when larger).
    /// Default `"1s"`.
    pub(crate) backoff: Option<RawDuration>,
    /// Cap of the retry delay; not below `backoff`. Default `"60s"`.
    pub(crate) backoff_max: Option<RawDuration>,
    /// Fraction (0.0–1.0) by which a retry delay is shortened at random. Default 0.2.
    pub(crate) jitter: Option<f64>,
    /// Whether an attempt stopped at the hard time limit is retried (like any retryable
    /// failure) or dead-lettered at once. Default true.
    pub(crate) retry_on_timeout: Option<bool>,
    /// Resources it calls and cannot do without (`[resources.NAME]`): while one's circuit
    /// breaker is open the task is deferred (no attempt spent); while one is misconfigured
    /// (it refused the key with 401/403) or has no key the task fails permanently. Default:
    /// none.
    #[serde(default)]
    pub(crate) uses: Vec<String>,
    /// Resources it calls but can do without: while one's breaker is open or it is
    /// misconfigured the task runs anyway, and its calls get the resource's degraded answers
    /// (Zep: reads an empty context, writes buffered and replayed later); a missing key still
    /// fails it. Not also in `uses`. Default: none.
    #[serde(default)]
    pub(crate) degrades: Vec<String>,
    /// Tasks enqueued with its result when it succeeds. Default: none.
    #[serde(default)]
    pub(crate) link: Vec<String>,
    /// Tasks enqueued with its error when it fails for good. Default: none.
    #[serde(default)]
    pub(crate) link_error: Vec<String>,
    /// Deduplicated enqueue: an inline table `{ ttl = "24h" }`. Default: none.
    pub(crate) idempotency: Option<RawIdempotency>,
    /// `false`: a success removes the task's record instead of writing its result (Celery's
    /// `ignore_result`). Default: true.
    pub(crate) store_result: Option<bool>,
}

/// `tasks.NAME.handler`, selected by `kind`.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    expecting = "an inline table with kind = \"http\", \"exec\", \"native\", \"pool\" or \"python\""
)]
pub(crate) enum RawHandler {
    /// POST the task envelope as JSON to a URL.
    Http(RawHttpHandler),
    /// Run a command (no shell), envelope on stdin, result = last stdout line.
    Exec(RawExecHandler),
    /// A Rust function registered through the library API under the task's name.
    Native(RawNativeHandler),
    /// Claim an idle agent of a pool and hand it the task.
    Pool(RawPoolHandler),
    /// Run a Python function on a process of a worker pool.
    Python(RawPythonHandler),
}

/// `handler = { kind = "http", … }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a handler table")]
pub(crate) struct RawHttpHandler {
    /// `http://` or `https://` URL the envelope is POSTed to.
    pub(crate) url: String,
    /// Timeout of one request. Default: none (the task's hard time limit cuts it).
    pub(crate) timeout: Option<RawDuration>,
}

/// `handler = { kind = "exec", … }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a handler table")]
pub(crate) struct RawExecHandler {
    /// Program to run (looked up in `PATH` when it has no `/`).
    pub(crate) command: String,
    /// Its arguments. Default: none.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    /// Working directory. Default: the runtime's.
    pub(crate) cwd: Option<PathBuf>,
    /// The command's environment (a clean one: nothing else is inherited), e.g.
    /// `{ PYTHONPATH = "/srv/app" }`. `PATH` is the runtime's own unless set here or in
    /// `pass_env`; `RT_TASK_ID`, `RT_TASK`, `RT_QUEUE`, `RT_EGRESS_URL` and `RT_EGRESS_TOKEN`
    /// are added by the runtime. Default: empty. No secrets here: see `pass_env`.
    #[serde(default)]
    pub(crate) env: IndexMap<String, String>,
    /// Names of variables copied from the runtime's own environment into the command's (the
    /// way to hand it secrets). Default: none.
    #[serde(default)]
    pub(crate) pass_env: Vec<String>,
}

/// `handler = { kind = "native" }`: no options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a handler table")]
pub(crate) struct RawNativeHandler {}

/// `handler = { kind = "pool", pool = "voice" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a handler table")]
pub(crate) struct RawPoolHandler {
    /// The pool (`[pools.NAME]`) whose agent takes the task.
    pub(crate) pool: String,
}

/// `handler = { kind = "python", workers = "app" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a handler table")]
pub(crate) struct RawPythonHandler {
    /// The worker pool (`[workers.NAME]`) whose processes run the task.
    pub(crate) workers: String,
    /// The name the function registered with `@task(name=…)`. Default: the task's name.
    pub(crate) function: Option<String>,
}

/// `tasks.NAME.idempotency`
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an inline table such as { ttl = \"24h\" }"
)]
pub(crate) struct RawIdempotency {
    /// How long an idempotency key is remembered; an enqueue with a key seen within it
    /// returns the first task's id.
    pub(crate) ttl: RawDuration,
}

/// `[resources.NAME]`, selected by `kind`.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    expecting = "a table with kind = \"zep\" or \"openai\""
)]
pub(crate) enum RawResource {
    /// Zep memory service: HTTP client with a circuit breaker.
    Zep(RawZep),
    /// OpenAI API: request/token rate limits and a concurrency cap.
    #[serde(rename = "openai")]
    OpenAi(RawOpenAi),
}

/// `kind = "zep"`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [resources.NAME] table")]
pub(crate) struct RawZep {
    /// Base URL (Zep's API root; operations are relative to it). Default
    /// `"https://api.getzep.com/api/v2"`.
    pub(crate) base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    pub(crate) api_key_env: String,
    /// Timeout of one call. Default `"5s"`.
    pub(crate) timeout: Option<RawDuration>,
    /// Path (and query) of the authenticated `GET` that probes Zep while it refuses the key
    /// (after a 401/403). Default `"/users-ordered?pageNumber=1&pageSize=1"`.
    pub(crate) auth_probe_path: Option<String>,
    /// Pause between two such probes. Default `"30s"`; above zero.
    pub(crate) auth_probe_every: Option<RawDuration>,
    /// The circuit breaker: an inline table or `[resources.NAME.breaker]`.
    #[serde(default)]
    pub(crate) breaker: RawBreaker,
}

/// `resources.NAME.breaker`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a breaker table")]
pub(crate) struct RawBreaker {
    /// Consecutive failures that open the breaker. Default 5; at least 1.
    pub(crate) failure_threshold: Option<u32>,
    /// How long it stays open the first time. Default `"30s"`.
    pub(crate) open_for: Option<RawDuration>,
    /// Cap of the open time, which doubles with each re-open. Default `"5m"`.
    pub(crate) open_for_max: Option<RawDuration>,
    /// Calls let through while half-open; all must succeed to close it. Default 1; at least 1.
    pub(crate) probes: Option<u32>,
    /// Timeout of a probe call. Default `"2s"`.
    pub(crate) probe_timeout: Option<RawDuration>,
    /// A call slower than this counts as a failure. Default: none.
    pub(crate) slow_call: Option<RawDuration>,
    /// Also open when the failure rate over the last calls reaches a threshold: an inline
    /// table `{ rate = 0.5, window = 20, min_calls = 10 }`. Default: none.
    pub(crate) failure_rate: Option<RawFailureRate>,
}

/// `resources.NAME.breaker.failure_rate`
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an inline table { rate, window, min_calls }"
)]
pub(crate) struct RawFailureRate {
    /// Fraction of failed calls (0 < rate ≤ 1) that opens the breaker.
    pub(crate) rate: f64,
    /// How many of the most recent calls are looked at (at least 1).
    pub(crate) window: u32,
    /// Calls needed in the window before the rule applies (1 to `window`). Default `window`.
    pub(crate) min_calls: Option<u32>,
}

/// `kind = "openai"`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [resources.NAME] table")]
pub(crate) struct RawOpenAi {
    /// Base URL. Default `"https://api.openai.com/v1"`.
    pub(crate) base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    pub(crate) api_key_env: String,
    /// Requests allowed per minute. Default: no limit; at least 1.
    pub(crate) requests_per_minute: Option<u32>,
    /// Tokens allowed per minute (estimated before the call). Default: no limit; at least 1.
    pub(crate) tokens_per_minute: Option<u32>,
    /// Calls in flight at once. Default: no limit; at least 1.
    pub(crate) concurrency: Option<u32>,
    /// Path (and query) of the authenticated `GET` that probes OpenAI while it refuses the
    /// key (after a 401/403). Default `"/models"`.
    pub(crate) auth_probe_path: Option<String>,
    /// Pause between two such probes. Default `"30s"`; above zero.
    pub(crate) auth_probe_every: Option<RawDuration>,
}

/// `[pools.NAME]`: prewarmed processes (voice agents).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [pools.NAME] table")]
pub(crate) struct RawPool {
    /// Program of each agent (no shell).
    pub(crate) command: String,
    /// Its arguments. Default: none.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    /// The agent's environment (a clean one: nothing else is inherited), e.g.
    /// `{ PYTHONUNBUFFERED = "1" }`. `PATH` is the runtime's own unless set here or in
    /// `pass_env`; `RT_AGENT_ID`, `RT_POOL`, `RT_EGRESS_URL` and `RT_EGRESS_TOKEN` are added by
    /// the runtime. Default: empty. No secrets here: see `pass_env`.
    #[serde(default)]
    pub(crate) env: IndexMap<String, String>,
    /// Names of variables copied from the runtime's own environment into the agent's (the
    /// way to hand it secrets). Default: none.
    #[serde(default)]
    pub(crate) pass_env: Vec<String>,
    /// Working directory. Default: the runtime's.
    pub(crate) cwd: Option<PathBuf>,
    /// Idle (ready, unassigned) agents kept warm. Default 0; not above `max`.
    pub(crate) min_idle: Option<u32>,
    /// Agents alive at once, in every state. At least 1.
    pub(crate) max: u32,
    /// Time from spawn to `ready_pattern` before the agent counts as failed. Default `"30s"`.
    pub(crate) startup_timeout: Option<RawDuration>,
    /// Regex matched on each stdout and stderr line: the agent is ready (idle).
    pub(crate) ready_pattern: String,
    /// Regex matched on each output line after an assignment: the agent took it. Default:
    /// none (writing the assignment to its stdin is the confirmation).
    pub(crate) assigned_pattern: Option<String>,
    /// Time for an agent to confirm an assignment. Default `"10s"`.
    pub(crate) assign_timeout: Option<RawDuration>,
    /// Time a `pool` task waits for an idle agent before it is retried. Default `"5s"`.
    pub(crate) claim_timeout: Option<RawDuration>,
    /// Resident memory above which an agent is stopped. Default: no limit; at least 1.
    pub(crate) memory_limit_mb: Option<u32>,
    /// Idle agents older than this are replaced. Default: never.
    pub(crate) max_idle_age: Option<RawDuration>,
    /// An agent that logs `ready_pattern` again after its session goes back to idle instead
    /// of being replaced. Default `false` (single-use agents).
    pub(crate) reusable: Option<bool>,
    /// Signal sent to the agent's process group to stop it: `SIGTERM`, `SIGINT`, `SIGHUP`,
    /// `SIGQUIT`, `SIGUSR1`, `SIGUSR2` or `SIGKILL`. Default `"SIGTERM"`.
    pub(crate) stop_signal: Option<String>,
    /// Time after `stop_signal` before the group is SIGKILLed. Default `"10s"`.
    pub(crate) stop_timeout: Option<RawDuration>,
    /// Consecutive startup failures after which the pool stops spawning (`fatal`).
    /// Default 3.
    pub(crate) startretries: Option<u32>,
}

/// `[workers.NAME]`: long-lived Python processes (`python -m taskrt.worker`) that import the
/// task modules once and run `python` tasks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [workers.NAME] table")]
pub(crate) struct RawWorkers {
    /// The interpreter (a path, or a name looked up in `PATH`); `taskrt` must be importable
    /// by it. Default `"python3"`.
    pub(crate) python: Option<String>,
    /// Modules each process imports once at start (their `@task` functions register).
    pub(crate) modules: Vec<String>,
    /// Processes running tasks at once. Default: the machine's cores.
    pub(crate) processes: Option<u32>,
    /// Tasks at once in one process: 1 (prefork: one task per process) or more (`async def`
    /// tasks share a process, sync ones run in its threads). Default 1.
    pub(crate) concurrency: Option<u32>,
    /// Warm processes kept beyond `processes`, so a process killed at its hard limit or
    /// recycled is replaced without waiting for an interpreter to start. Default 1.
    pub(crate) spares: Option<u32>,
    /// A process is replaced after this many tasks. Default: never.
    pub(crate) max_tasks_per_process: Option<u64>,
    /// Resident memory (the process and its children) above which a process is replaced:
    /// after its task when checked between tasks, at once when found by the health check.
    /// Default: no limit.
    pub(crate) memory_limit_mb: Option<u32>,
    /// The processes' environment (a clean one), e.g. `{ DJANGO_SETTINGS_MODULE =
    /// "mysite.settings", PYTHONPATH = "/srv/app" }`. Default: empty.
    #[serde(default)]
    pub(crate) env: IndexMap<String, String>,
    /// Variables copied from the runtime's environment (secrets). Default: none.
    #[serde(default)]
    pub(crate) pass_env: Vec<String>,
    /// Working directory (the project's root, for imports). Default: the runtime's.
    pub(crate) cwd: Option<PathBuf>,
    /// Time from spawn to the worker's `ready`. Default `"30s"`.
    pub(crate) startup_timeout: Option<RawDuration>,
    /// Time a task waits for a free process before it is retried. Default `"5s"`.
    pub(crate) claim_timeout: Option<RawDuration>,
    /// Time from SIGTERM to SIGKILL when a process is stopped. Default `"10s"`.
    pub(crate) stop_timeout: Option<RawDuration>,
    /// Consecutive startup failures (an import error) after which no process is started
    /// (`fatal`). Default 3.
    pub(crate) startretries: Option<u32>,
    /// Django's database connections between tasks: `"stale"` (close those too old or
    /// broken, `close_old_connections()`) or `"always"` (close all, as Celery does). Default
    /// `"stale"`.
    pub(crate) db_close: Option<String>,
}

/// `[schedules.NAME]`: enqueue a task periodically.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [schedules.NAME] table")]
pub(crate) struct RawSchedule {
    /// The task (`[tasks.NAME]`) to enqueue.
    pub(crate) task: String,
    /// Its positional arguments. Default: none.
    #[serde(default)]
    pub(crate) args: Vec<serde_json::Value>,
    /// Its keyword arguments. Default: none.
    #[serde(default)]
    pub(crate) kwargs: serde_json::Map<String, serde_json::Value>,
    /// Fixed interval such as `"5m"`. Exactly one of `every` and `cron`.
    pub(crate) every: Option<RawDuration>,
    /// Five-field cron expression such as `"0 2 * * *"` (minute hour day month weekday).
    /// Exactly one of `every` and `cron`.
    pub(crate) cron: Option<String>,
    /// IANA time zone `cron` is read in, such as `"Europe/Istanbul"`. Default `"UTC"`.
    pub(crate) timezone: Option<String>,
    /// Random delay up to this much added to each run. Default: none.
    pub(crate) jitter: Option<RawDuration>,
    /// What happens to runs missed while no node was leader: `skip` them or `run_once`.
    /// Default `skip`.
    pub(crate) missed: Option<actors::scheduler::Missed>,
}

/// `[celery]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [celery] table")]
pub(crate) struct RawCelery {
    /// Redis of Celery's result backend (`CELERY_RESULT_BACKEND`). Default: `broker.url`.
    /// The Celery *broker* must be the runtime's broker Redis (`broker.url`): the take-over
    /// pops the kombu list and adds to the runtime's stream in one Lua script.
    pub(crate) backend_url: Option<String>,
    /// Prefix of kombu list names and result keys (kombu's `global_keyprefix`). Default `""`.
    pub(crate) key_prefix: Option<String>,
    /// The kombu queues the runtime takes over (one bridge actor each). Default: none.
    #[serde(default)]
    pub(crate) queues: Vec<String>,
    /// Runtime queue whose dead letters take malformed or unmapped Celery messages.
    /// Default: the first `[queues.NAME]`.
    pub(crate) dead_letter_queue: Option<String>,
    /// kombu queue of tasks sent to Celery workers without a `queue` option. Default
    /// `"celery"`.
    pub(crate) default_queue: Option<String>,
    /// How long `celery-task-meta-<id>` is kept (`result_expires`). Default `"1d"`.
    pub(crate) result_ttl: Option<RawDuration>,
    /// Timeout of the bridge's blocking waits on an empty kombu queue (each of its lists is
    /// waited on, so a message is taken at once whatever its priority). Default `"1s"`.
    pub(crate) poll: Option<RawDuration>,
    /// Messages a mover fetches per script call. Default 100.
    pub(crate) batch: Option<u32>,
    /// Movers per kombu queue on this node. Default 2.
    pub(crate) movers: Option<u32>,
    /// `[celery.tasks."CELERY.NAME"]`: Celery task names the runtime runs. A name not listed
    /// runs the runtime task of the same name, if there is one.
    #[serde(default)]
    pub(crate) tasks: IndexMap<String, RawCeleryTask>,
}

/// `[celery.tasks."CELERY.NAME"]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [celery.tasks.NAME] table")]
pub(crate) struct RawCeleryTask {
    /// The runtime task (`[tasks.NAME]`) that runs it. Default: the same name.
    pub(crate) task: Option<String>,
    /// Write the `STARTED` state when it starts (Celery's `track_started`). Default false.
    pub(crate) track_started: Option<bool>,
}

/// `[beat]`: the scheduler's leader election.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [beat] table")]
pub(crate) struct RawBeat {
    /// The leader lease: the leader renews it every lease/3; when the leader dies another node
    /// takes over within one lease (so a schedule's runs pause at most about this long).
    /// Default `"10s"`.
    pub(crate) lease: Option<RawDuration>,
}

/// `[chaos]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [chaos] table")]
pub(crate) struct RawChaos {
    /// Whether `POST /chaos/kill/{actor path}` exists. Default false.
    pub(crate) enabled: Option<bool>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [metrics] table")]
pub(crate) struct RawMetrics {
    /// Whether task, consumer, actor and broker metrics are recorded and `GET /metrics`
    /// serves them. Default true.
    pub(crate) enabled: Option<bool>,
}

/// `[events]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [events] table")]
pub(crate) struct RawEvents {
    /// Whether lifecycle events are written to the events stream and `GET /events` serves
    /// them. Default true.
    pub(crate) enabled: Option<bool>,
    /// Approximate cap of the events stream. Default 10000.
    pub(crate) maxlen: Option<u32>,
}

/// The file as read: the raw structs, with the parts that had shape errors left out.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// What could be read.
    pub(crate) config: RawConfig,
    /// Every shape error, in the order of the file.
    pub(crate) errors: Vec<Diagnostic>,
    /// Key paths left out because of a shape error (`pools.voice`, `queues.background`):
    /// a reference to one of them is not reported again as undefined.
    pub(crate) unreadable: HashSet<String>,
    /// The names written under each top-level table (`queues` → `chat`, `background`), in
    /// file order, left-out ones included: what a reference may mean.
    pub(crate) declared: HashMap<String, Vec<String>>,
}

/// Shape errors reported at most (a file of nothing but mistakes stops there).
const MAX_SHAPE_ERRORS: usize = 100;

/// Parses TOML text into the raw structs, reporting every shape error (an unknown key, a
/// wrong type, a missing required key) rather than the first.
///
/// The keys are known only to the serde derives above, so the file is read the way serde
/// reads it, repeatedly: the TOML is parsed once into a spanned tree, each error serde
/// stops at is recorded (named by its key path, with its line and column) and the key it is
/// about is taken out of the tree, and the tree is read again, until it reads. A named
/// table with an error (`[queues.chat]`, `[pools.voice]`) is then left out whole: it is
/// reported once, its name goes to [`Parsed::unreadable`], and `compile()` does not check
/// what is left of it against the rest. A syntax error stops at once, named by its position.
pub(crate) fn parse(text: &str) -> Result<Parsed, Diagnostic> {
    let mut tree = DeTable::parse(text).map_err(|err| {
        let mut message = one_line(err.message());
        let span = err.span();
        // toml says only "duplicate key": name it.
        if let Some(key) = span.clone().and_then(|span| text.get(span))
            && message == "duplicate key"
        {
            message = format!("duplicate key `{key}`");
        }
        Diagnostic {
            severity: Severity::Error,
            path: span.map_or_else(|| "(toml)".to_owned(), |span| position(text, span.start)),
            message,
        }
    })?;
    let declared: HashMap<String, Vec<String>> = tree
        .get_ref()
        .iter()
        .filter_map(|(section, value)| match value.get_ref() {
            DeValue::Table(table) => Some((
                section.get_ref().to_string(),
                table.keys().map(|key| key.get_ref().to_string()).collect(),
            )),
            _ => None,
        })
        .collect();
    let mut errors = Vec::new();
    let mut unreadable = HashSet::new();
    // Named tables to leave out, and keys taken out (a required one then reads as missing,
    // which is not a second mistake).
    let mut units: Vec<Vec<String>> = Vec::new();
    let mut removed: HashSet<Vec<String>> = HashSet::new();
    loop {
        let attempt = serde_path_to_error::deserialize::<_, RawConfig>(
            toml::de::Deserializer::from(tree.clone()),
        );
        let err = match attempt {
            Ok(config) => {
                let mut left_out = false;
                for unit in &units {
                    left_out |= remove(tree.get_mut(), unit);
                }
                if left_out {
                    continue;
                }
                return Ok(Parsed {
                    config,
                    errors,
                    unreadable,
                    declared,
                });
            }
            Err(err) => err,
        };
        let shape = Shape::of(err, text);
        let unit = (shape.keys.len() >= 3 && is_table(tree.get_ref(), &shape.keys[..2]))
            .then(|| shape.keys[..2].to_vec());
        let repeat = shape.missing && removed.contains(&shape.keys);
        if !repeat && errors.len() < MAX_SHAPE_ERRORS {
            errors.push(shape.diagnostic);
        }
        let target = match (&unit, shape.missing) {
            // A missing key cannot be taken out: the table that lacks it goes.
            (Some(unit), true) => unit.clone(),
            (None, true) => shape.keys[..shape.keys.len().saturating_sub(1)].to_vec(),
            (_, false) => shape.keys.clone(),
        };
        unreadable.insert(unit.as_ref().unwrap_or(&target).join("."));
        if let Some(unit) = unit
            && !units.contains(&unit)
        {
            units.push(unit);
        }
        if errors.len() >= MAX_SHAPE_ERRORS {
            errors.push(Diagnostic {
                severity: Severity::Error,
                path: "(file)".to_owned(),
                message: format!("stopped after {MAX_SHAPE_ERRORS} shape errors"),
            });
        }
        // Every round takes something out of the tree — the key, else the table around it,
        // else its section — or gives up: it ends.
        let taken_out = errors.len() < MAX_SHAPE_ERRORS
            && [
                &target[..],
                &target[..target.len().min(2)],
                &target[..target.len().min(1)],
            ]
            .into_iter()
            .any(|keys| remove(tree.get_mut(), keys));
        if !taken_out {
            return Ok(Parsed {
                config: RawConfig::default(),
                errors,
                unreadable,
                declared,
            });
        }
        if let Some(meant) = shape.meant {
            let mut keys = shape.keys[..shape.keys.len().saturating_sub(1)].to_vec();
            keys.push(meant);
            removed.insert(keys);
        }
        removed.insert(target);
    }
}

/// One shape error: its diagnostic, and the keys it is about.
struct Shape {
    diagnostic: Diagnostic,
    /// The key path in the tree (an array item stands for its array: the key that holds it).
    keys: Vec<String>,
    /// A required key is missing (it cannot be taken out of the tree).
    missing: bool,
    /// The key suggested for an unknown one: if it is required, its absence is the same
    /// mistake.
    meant: Option<String>,
}

impl Shape {
    fn of(err: serde_path_to_error::Error<toml::de::Error>, text: &str) -> Self {
        let mut keys = Vec::new();
        for segment in err.path() {
            match segment {
                serde_path_to_error::Segment::Map { key } => keys.push(key.clone()),
                _ => break,
            }
        }
        let path = match err.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        let inner = err.into_inner();
        let message = one_line(inner.message());
        let (path, mut message, named) = name_the_key(path, message);
        let (key, missing, meant) = match named {
            Some(named) => (Some(named.key), named.missing, named.meant),
            None => (None, false, None),
        };
        if let Some(key) = key
            && keys.last() != Some(&key)
        {
            keys.push(key);
        }
        if let Some(span) = inner.span() {
            message.push_str(&format!(" ({})", position(text, span.start)));
        }
        Shape {
            diagnostic: Diagnostic {
                severity: Severity::Error,
                path,
                message,
            },
            keys,
            missing,
            meant,
        }
    }
}

/// Whether `keys` leads to a table in `tree`.
fn is_table(tree: &DeTable<'_>, keys: &[String]) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        return true;
    };
    match tree.get(first.as_str()).map(|value| value.get_ref()) {
        Some(DeValue::Table(table)) => is_table(table, rest),
        _ => false,
    }
}

/// Takes the key at `keys` out of `tree`; whether it was there.
fn remove(tree: &mut DeTable<'_>, keys: &[String]) -> bool {
    match keys {
        [] => false,
        [last] => tree.remove(last.as_str()).is_some(),
        [first, rest @ ..] => match tree.get_mut(first.as_str()).map(|value| value.get_mut()) {
            Some(DeValue::Table(table)) => remove(table, rest),
            _ => false,
        },
    }
}

/// The key an unknown-key or missing-key error is about.
struct NamedKey {
    key: String,
    missing: bool,
    /// The suggestion for an unknown key.
    meant: Option<String>,
}

/// serde reports an unknown or missing key at the table that holds it; move the key into
/// the path so that the path names it: `tasks.x: unknown field `y`, …` → `tasks.x.y: unknown
/// key, …`. A misspelt key or variant gets the closest expected one as a suggestion, in place
/// of the list. Returns the path, the message, and the key named (if any).
fn name_the_key(path: String, message: String) -> (String, String, Option<NamedKey>) {
    for (prefix, replacement, missing) in [
        ("unknown field `", "unknown key", false),
        ("missing field `", "required key is missing", true),
    ] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let Some((key, tail)) = rest.split_once('`') else {
            continue;
        };
        // A struct's unknown key is already in the path; a tagged enum's is not.
        let full = if path.is_empty() {
            key.to_owned()
        } else if path == key || path.ends_with(&format!(".{key}")) {
            path
        } else {
            format!("{path}.{key}")
        };
        let meant = (!missing).then(|| suggestion(key, tail)).flatten();
        let tail = match meant {
            Some(suggested) => format!(", did you mean `{suggested}`?"),
            None => tail.to_owned(),
        };
        let named = NamedKey {
            key: key.to_owned(),
            missing,
            meant: meant.map(str::to_owned),
        };
        return (full, format!("{replacement}{tail}"), Some(named));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((variant, tail)) = rest.split_once('`')
        && let Some(suggested) = suggestion(variant, tail)
    {
        let message = format!("unknown variant `{variant}`, did you mean `{suggested}`?");
        return (path, message, None);
    }
    let path = if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path
    };
    (path, message, None)
}

/// The expected name closest to `written`, from serde's own list in the rest of its message
/// (`, expected one of `a`, `b`` or `, expected `a` or `b``): the derives stay the one list of
/// keys.
fn suggestion<'a>(written: &str, tail: &'a str) -> Option<&'a str> {
    let expected = tail.strip_prefix(", expected ")?;
    let names = expected.split('`').skip(1).step_by(2);
    did_you_mean(written, names)
}

/// `line L, column C` (both from 1, column in characters) of a byte offset.
fn position(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    format!("line {line}, column {column}")
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}
