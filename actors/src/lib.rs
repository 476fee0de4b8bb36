//! The actors of the runtime: supervision and the tree registry, the broker (Redis Streams and
//! an in-memory twin), queue consumers and task actors, and shared resources.
//!
//! No TOML, clap or axum in here: everything takes typed arguments, built by the `runtime`
//! program from its validated config.
//!
//! # Layout
//! - [`broker`] — the broker contract (`Broker`), the task `Envelope`, the `memory://` broker,
//!   the Redis Streams broker (`broker::redis`: key layout and entry fields in its docs), and
//!   `EventSink` (non-blocking publishing of supervision, breaker and pool events).
//! - [`broker_actor`] — `BrokerActor`: the node's broker housekeeping in the tree (delayed
//!   mover, lease renewal, recovery sweep, presence record).
//! - [`caps`] — the caps on durations from outside (countdown, eta, time limits, an upstream's
//!   `Retry-After`) and the one checked conversion every such number goes through.
//! - [`celery`] — the Celery bridge: `BridgeActor` per kombu queue (atomic take-over), decoding
//!   protocol v2, results in Celery's Redis-backend format, sends to Celery workers; plugs into
//!   the consumer as `CeleryOrigin` (a [`task::Origin`]).
//! - [`consumer`] — `ConsumerActor`: one queue's bulkhead (fetcher, admission, task actors);
//!   each waiting or running delivery owns its concurrency slot (a semaphore permit).
//! - [`task`] — `TaskActor`: one attempt under its limits; the `task_span` every task log line
//!   carries; `task::settle`: the `Settler` that finishes every delivery (ack, retry, dead
//!   letter, callbacks, lease, metrics) and the `Origin` hook a foreign producer plugs into.
//! - [`gate`] — `ResourceGate`: deferral, degraded run or failure of tasks whose resources
//!   cannot be called.
//! - [`child`] — child processes (`exec` commands, pool agents): clean environment, own process
//!   group, capped line reader, and the watchdog that kills them when the node dies.
//! - [`handler`] — what runs a task: `Handler`, `TaskDef`; native, http, exec, pool.
//! - [`error`] — `TaskError` and its `ErrorClass` (re-exported by `handler`).
//! - [`resource`] — shared resources: circuit breaker, misconfiguration (refused keys), Zep
//!   client, OpenAI limiter, egress types, decoding of answers (any `Content-Encoding`) and
//!   redaction of the key from them.
//! - [`metrics`] — `Metrics`: the Prometheus registry (`GET /metrics`), recorded by the
//!   consumers, task actors, supervisors and broker actor; resources and pools read at scrape.
//! - [`pool`] — process pools: `Pool` (membership, claim), `PoolActor`, agents' monitors.
//! - [`scheduler`] — `SchedulerActor`: beat (interval and cron schedules) enqueued by one
//!   leader across nodes, at most once per due time; the leader lease; missed-run policies.
//! - [`supervisor`] — `SupervisorActor`: OTP strategies, restart types, intensity, backoff,
//!   ordered start and reverse-ordered stop.
//! - [`policy`] — the restart policy values (`Strategy`, `Restart`, `Intensity`, `Backoff`;
//!   re-exported by `supervisor`).
//! - [`shown`] — what may be shown of a URL or an error in logs: no credentials, the cause.
//! - [`tree`] — the tree registry every actor is recorded in; read by the introspection routes.
//! - `test_util` — `RedisServer`, a private redis-server per test (tests / `test-util` feature).
//! - [`heartbeat`] — `HeartbeatActor`: records uptime and event-loop lag.
//! - [`history`] — `History`: this node's throughput, wait and run time per queue over the
//!   last minutes (a ring buffer sampled from the queues' outcome counters and depths).
//!
//! No module imports one that imports it back (a unit test, `import_cycles`, reads the sources
//! and fails naming any cycle): leaves (`caps`, `shown`, `error`, `policy`) below `broker`,
//! then `metrics`, `tree`, `supervisor`, and the actors above them.

pub mod broker;
pub mod broker_actor;
pub mod caps;
pub mod celery;
pub mod child;
pub mod consumer;
pub mod error;
pub mod gate;
pub mod handler;
pub mod heartbeat;
pub mod history;
#[cfg(test)]
mod import_cycles;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod resource;
pub mod scheduler;
pub mod shown;
pub mod supervisor;
pub mod task;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tree;
