//! `Metrics`: the node's Prometheus registry (`GET /metrics`), built on `prometheus-client`.
//!
//! One [`Metrics`] per node, made before the tree and shared through an `Arc`: the consumers
//! and task actors record through [`crate::consumer::Work`], the supervisors through the
//! [`crate::tree::Tree`] (every restart they record there is counted here too), the broker
//! actor through its arguments. Two ways in, each used for one kind of number:
//!
//! - **recorded as it happens** (atomic counters, gauges and histograms): the task lifecycle by
//!   task and queue (retries also by [`ErrorClass`]), in-flight tasks per consumer, actor
//!   restarts, the broker's round trip, the Celery bridge's moves and take latency per kombu
//!   queue ([`BridgeSeries`], labelled with the configured kombu queue);
//! - **read at scrape time** from state that already counts it, so nothing is counted twice:
//!   queue depths (the broker's `depth`, as `GET /queues`), the broker connection, breakers
//!   (state, transitions, rejected calls — the breaker's own counters,
//!   [`Breaker::stats`](crate::resource::breaker::Breaker::stats)), whether a resource is
//!   misconfigured (its [`AuthState`](crate::resource::auth::AuthState)), rate limiters
//!   (callers waiting, wait times) and process pools (agents per state, startup failures, claim
//!   latency, health — the pool's own membership and totals).
//!
//! # Present from the start
//!
//! A series that appears only once something happened cannot be alerted on with `increase()`
//! (its first increment is lost) and leaves holes in dashboards. So every series whose labels
//! are known when the node starts is there, at 0, from the first scrape: every counter and
//! histogram of each configured task on its own queue (retries once per retryable class, dead
//! letters once per reason), each consumer's gauges, `rt_actor_restarts_total` of every actor
//! as soon as it is in the tree, each Celery bridge's moves and take latency, the breakers',
//! limiters' and pools' numbers, and
//! `rt_build_info` (version, git commit, compiler). Only the `unknown` task and queue series
//! appear on first use.
//!
//! # The hot path
//!
//! Every `(task, queue)` series has a fixed slot ([`SeriesId`]); those of the configured tasks
//! on their own queue are created up front ([`TaskSeries`], a set of handles into the label
//! families). A consumer resolves a task's slot once, when it admits it (two lookups of
//! borrowed strings), and hands the id to the task actor: recording is then an index and
//! atomic adds — no refcount, no lock of ours, no label allocation per task.
//!
//! # Bounded labels
//!
//! Labels never carry task ids, agent ids or anything a caller chooses freely: a task name
//! outside the configured set is recorded as [`UNKNOWN`], and so is a queue outside the
//! configured queues. Actor paths are those of the supervision tree (task actors and agents are
//! not in it). The number of series is therefore bounded by `(tasks + 1) × (queues + 1)`.
//!
//! # Switched off
//!
//! [`Metrics::disabled`] (`[metrics] enabled = false`) records nothing: every lookup answers
//! `None`, and [`Metrics::render`] too (the route answers 404). Measured against the drain
//! benchmark in `BENCHMARKS.md`.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::broker::{Admin, AnyBroker, Enqueued, Envelope, QueueDepth};
use crate::error::ErrorClass;

/// The label value of a task or queue name outside the configured set.
pub const UNKNOWN: &str = "unknown";

/// `Content-Type` of [`Metrics::render`]: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Bucket bounds (seconds) of every duration histogram: 1 ms to 5 min.
pub(crate) const SECONDS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The `state` label of `rt_queue_depth`, in `QueueDepth`'s field order.
const DEPTH_STATES: [&str; 4] = ["ready", "delayed", "in_flight", "dead"];

/// How long a scrape waits for the queue depths before it leaves them out.
const DEPTH_TIMEOUT: Duration = Duration::from_secs(2);

/// A histogram of durations in seconds with the runtime's buckets (1 ms to 5 min). Pools and
/// rate limiters keep theirs with their own state; the scrape reads them.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS)
}

/// Why a task was dead-lettered (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// It ran and failed for good: a permanent error, retries exhausted, or a time limit
    /// with `retry_on_timeout = false`.
    Failed = 0,
    /// It never ran: unknown task, expired, or a resource it uses is unusable.
    Rejected = 1,
    /// Delivered `max_deliveries` times without an ack (lease recovery).
    Poison = 2,
}

impl DeadReason {
    const ALL: [DeadReason; 3] = [DeadReason::Failed, DeadReason::Rejected, DeadReason::Poison];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Failed => "failed",
            DeadReason::Rejected => "rejected",
            DeadReason::Poison => "poison",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    task: String,
    queue: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    git_sha: &'static str,
    rustc: &'static str,
}

/// What `rt_build_info` says about the binary: set once by the program that builds the node
/// ([`Metrics::build_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The program's version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// The git commit it was built from, or `unknown` (built outside a git checkout).
    pub git_sha: &'static str,
    /// The compiler's version (`rustc 1.95.0 (…)` → `1.95.0`), or `unknown`.
    pub rustc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLabels {
    task: String,
    queue: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DepthLabels {
    queue: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KombuLabels {
    kombu_queue: String,
}

/// Bucket bounds (seconds) of the Celery bridge's take latency: 50 µs to 1 s.
const TAKE_SECONDS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
];

fn take_histogram() -> Histogram {
    Histogram::new(TAKE_SECONDS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActorLabels {
    path: String,
    kind: String,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// Names → index in first-seen order, and the names by index with [`UNKNOWN`] last.
fn index<'a>(names: impl IntoIterator<Item = &'a str>) -> (HashMap<String, usize>, Vec<String>) {
    let mut by_name = HashMap::new();
    let mut names_by_index = Vec::new();
    for name in names {
        if !by_name.contains_key(name) {
            by_name.insert(name.to_string(), names_by_index.len());
            names_by_index.push(name.to_string());
        }
    }
    names_by_index.push(UNKNOWN.to_string());
    (by_name, names_by_index)
}

/// The label families the registry encodes.
#[derive(Debug)]
struct Families {
    enqueued: Family<TaskLabels, Counter>,
    started: Family<TaskLabels, Counter>,
    succeeded: Family<TaskLabels, Counter>,
    failed: Family<TaskLabels, Counter>,
    retried: Family<RetryLabels, Counter>,
    deferred: Family<TaskLabels, Counter>,
    dead_lettered: Family<DeadLabels, Counter>,
    duration: Histograms<TaskLabels>,
    wait: Histograms<TaskLabels>,
    in_flight: Family<QueueLabels, Gauge>,
    concurrency: Family<QueueLabels, Gauge>,
    depth: Family<DepthLabels, Gauge>,
    restarts: Family<ActorLabels, Counter>,
    celery_moved: Family<KombuLabels, Counter>,
    celery_take: Histograms<KombuLabels>,
    broker_connected: Gauge,
    broker_round_trip: Gauge<f64, AtomicU64>,
    build: Family<BuildLabels, Gauge>,
}

impl Families {
    fn new() -> Self {
        Self {
            enqueued: Family::default(),
            started: Family::default(),
            succeeded: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            deferred: Family::default(),
            dead_lettered: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            wait: Family::new_with_constructor(seconds_histogram),
            in_flight: Family::default(),
            concurrency: Family::default(),
            depth: Family::default(),
            restarts: Family::default(),
            celery_moved: Family::default(),
            celery_take: Family::new_with_constructor(take_histogram),
            broker_connected: Gauge::default(),
            broker_round_trip: Gauge::default(),
            build: Family::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "rt_tasks_enqueued",
            "Tasks enqueued by this node (HTTP API, callbacks), duplicates excluded",
            self.enqueued.clone(),
        );
        r.register(
            "rt_tasks_started",
            "Task attempts started (a task actor spawned)",
            self.started.clone(),
        );
        r.register(
            "rt_tasks_succeeded",
            "Task attempts that succeeded and were acked",
            self.succeeded.clone(),
        );
        r.register(
            "rt_tasks_failed",
            "Task attempts that ended in an error (handler error, time limit, crash)",
            self.failed.clone(),
        );
        r.register(
            "rt_tasks_retried",
            "Failed attempts scheduled again as a delayed retry, by error class",
            self.retried.clone(),
        );
        r.register(
            "rt_tasks_deferred",
            "Tasks put back without an attempt because a resource they use is closed",
            self.deferred.clone(),
        );
        r.register(
            "rt_tasks_dead_lettered",
            "Tasks moved to the dead letters, by reason (failed, rejected, poison)",
            self.dead_lettered.clone(),
        );
        r.register(
            "rt_task_duration_seconds",
            "Run time of task attempts, from the handler's start to its outcome",
            self.duration.clone(),
        );
        r.register(
            "rt_task_wait_seconds",
            "Wait of first attempts from enqueue (or eta) to start",
            self.wait.clone(),
        );
        r.register(
            "rt_consumer_in_flight",
            "Tasks running in the queue's consumer on this node",
            self.in_flight.clone(),
        );
        r.register(
            "rt_consumer_concurrency",
            "Tasks the queue's consumer runs at once (its bulkhead)",
            self.concurrency.clone(),
        );
        r.register(
            "rt_queue_depth",
            "Entries per queue and state (ready, delayed, in_flight, dead), read at scrape",
            self.depth.clone(),
        );
        r.register(
            "rt_actor_restarts",
            "Restarts of an actor by its supervisor, by tree path and kind",
            self.restarts.clone(),
        );
        r.register(
            "rt_celery_moved",
            "Celery messages the bridge moved from a kombu queue into the runtime's streams",
            self.celery_moved.clone(),
        );
        r.register(
            "rt_celery_take_seconds",
            "Celery bridge: from its blocking wait's return with a message to the commit of \
             the take that moved it",
            self.celery_take.clone(),
        );
        r.register(
            "rt_broker_connected",
            "1 while the broker is reachable, 0 while its connection is lost",
            self.broker_connected.clone(),
        );
        r.register(
            "rt_broker_round_trip_seconds",
            "Round trip of the broker actor's last PING (every second)",
            self.broker_round_trip.clone(),
        );
        r.register(
            "rt_build_info",
            "1, labelled with the binary's version, git commit and compiler",
            self.build.clone(),
        );
    }
}

/// The handles of one `(task, queue)` series: resolved once per task, then atomic adds.
#[derive(Debug)]
pub struct TaskSeries {
    enqueued: Counter,
    started: Counter,
    succeeded: Counter,
    failed: Counter,
    /// By class, in [`ErrorClass::RETRYABLE`] order (the enum's declaration order).
    retried: [Counter; ErrorClass::RETRYABLE.len()],
    deferred: Counter,
    dead_lettered: [Counter; 3],
    duration: Histogram,
    wait: Histogram,
}

impl TaskSeries {
    fn new(families: &Families, task: &str, queue: &str) -> Self {
        let labels = TaskLabels {
            task: task.to_string(),
            queue: queue.to_string(),
        };
        let dead = |reason: DeadReason| {
            families.dead_lettered.get_or_create_owned(&DeadLabels {
                task: task.to_string(),
                queue: queue.to_string(),
                reason: reason.as_str(),
            })
        };
        let retried = |class: ErrorClass| {
            families.retried.get_or_create_owned(&RetryLabels {
                task: task.to_string(),
                queue: queue.to_string(),
                class: class.as_str(),
            })
        };
        Self {
            enqueued: families.enqueued.get_or_create_owned(&labels),
            started: families.started.get_or_create_owned(&labels),
            succeeded: families.succeeded.get_or_create_owned(&labels),
            failed: families.failed.get_or_create_owned(&labels),
            retried: ErrorClass::RETRYABLE.map(retried),
            deferred: families.deferred.get_or_create_owned(&labels),
            dead_lettered: DeadReason::ALL.map(dead),
            duration: families.duration.get_or_create_owned(&labels),
            wait: families.wait.get_or_create_owned(&labels),
        }
    }

    /// An attempt started.
    pub fn started(&self) {
        self.started.inc();
    }

    /// A first attempt starts after waiting `wait` ([`Envelope::first_wait`]; retries are not
    /// observed: their wait is the backoff their policy chose).
    pub fn waited(&self, wait: Duration) {
        self.wait.observe(wait.as_secs_f64());
    }

    /// An attempt ran for `took` and ended (`failed`: in an error).
    pub fn ran(&self, took: Duration, failed: bool) {
        self.duration.observe(took.as_secs_f64());
        if failed {
            self.failed.inc();
        }
    }

    /// The outcome was recorded: acked.
    pub fn succeeded(&self) {
        self.succeeded.inc();
    }

    /// The outcome was recorded: a delayed retry after a failure of `class`. (A permanent
    /// error is never retried; it would not be counted.)
    pub fn retried(&self, class: ErrorClass) {
        if let Some(counter) = self.retried.get(class as usize) {
            counter.inc();
        }
    }

    /// Put back without an attempt (a resource it uses is closed).
    pub fn deferred(&self) {
        self.deferred.inc();
    }

    /// Moved to the dead letters.
    pub fn dead_lettered(&self, reason: DeadReason) {
        self.dead_lettered[reason as usize].inc();
    }
}

/// Where one `(task, queue)` series lives in its [`Metrics`]: resolved once per task (two
/// borrowed-string lookups), then used by index — no refcount, no lock, no label allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesId(u32);

/// The series of one enqueued batch, resolved before the batch goes to the broker; counted
/// once the broker answered, duplicates left out. See [`Metrics::enqueuing`].
#[derive(Debug)]
pub struct Enqueuing<'a> {
    metrics: &'a Metrics,
    series: Vec<Option<SeriesId>>,
}

impl Enqueuing<'_> {
    /// Counts every envelope the broker enqueued (`answers` in batch order).
    pub fn done(self, answers: &[Enqueued]) {
        for (id, answer) in self.series.iter().zip(answers) {
            if let (Some(series), false) = (self.metrics.of(*id), answer.duplicate) {
                series.enqueued.inc();
            }
        }
    }
}

/// One queue's consumer gauges.
#[derive(Clone, Debug)]
pub struct ConsumerSeries {
    in_flight: Gauge,
    concurrency: Gauge,
}

impl ConsumerSeries {
    /// The consumer's concurrency.
    pub fn concurrency(&self, n: usize) {
        self.concurrency.set(n as i64);
    }

    /// Tasks running now.
    pub fn in_flight(&self, n: usize) {
        self.in_flight.set(n as i64);
    }
}

/// The series of the Celery bridge of one kombu queue.
#[derive(Debug, Clone)]
pub struct BridgeSeries {
    moved: Counter,
    take: Histogram,
}

impl BridgeSeries {
    /// `n` messages moved into the runtime's streams.
    pub fn moved(&self, n: u64) {
        self.moved.inc_by(n);
    }

    /// A take committed `latency` after its wait returned with a message.
    pub fn took(&self, latency: Duration) {
        self.take.observe(latency.as_secs_f64());
    }
}

/// The node's registry; see the module docs.
pub struct Metrics {
    enabled: bool,
    registry: Registry,
    families: Families,
    /// Configured task names → their index; [`UNKNOWN`] is the last index.
    task_index: HashMap<String, usize>,
    /// Configured queue names → their index; [`UNKNOWN`] is the last index.
    queue_index: HashMap<String, usize>,
    /// Label values by index (configured names, then [`UNKNOWN`]).
    task_names: Vec<String>,
    queue_names: Vec<String>,
    /// Every possible `(task, queue)` series, `task × queues + queue`: the configured tasks
    /// on their own queue are made up front, the others on first use.
    series: Box<[OnceLock<TaskSeries>]>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .field("tasks", &self.task_names)
            .field("queues", &self.queue_names)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// [`Metrics::disabled`].
    fn default() -> Self {
        Self::disabled()
    }
}

impl Metrics {
    /// Metrics that record nothing and render nothing (`[metrics] enabled = false`).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            registry: Registry::default(),
            families: Families::new(),
            task_index: HashMap::new(),
            queue_index: HashMap::new(),
            task_names: Vec::new(),
            queue_names: Vec::new(),
            series: Box::default(),
        }
    }

    /// A registry for a node running `tasks` (`(name, queue)` pairs) and consuming `queues`.
    /// Add the scrape-time sources with [`watch_resources`](Self::watch_resources) and
    /// [`watch_pools`](Self::watch_pools) before sharing it.
    pub fn new<'a>(
        tasks: impl IntoIterator<Item = (&'a str, &'a str)>,
        queues: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let families = Families::new();
        let mut registry = Registry::default();
        families.register(&mut registry);
        let tasks: Vec<(&str, &str)> = tasks.into_iter().collect();
        let (task_index, task_names) = index(tasks.iter().map(|(task, _)| *task));
        let (queue_index, queue_names) = index(queues);
        let series = (0..task_names.len() * queue_names.len())
            .map(|_| OnceLock::new())
            .collect();
        let metrics = Self {
            enabled: true,
            registry,
            families,
            task_index,
            queue_index,
            task_names,
            queue_names,
            series,
        };
        for (task, queue) in tasks {
            if let Some(id) = metrics.task(task, queue) {
                metrics.series(id);
            }
        }
        metrics
    }

    /// Adds state read at every scrape (pools and resources keep their own and describe it
    /// in a [`Collector`]: `watch_pools`, `watch_resources`).
    pub(crate) fn watch(&mut self, collector: Box<dyn Collector>) {
        if self.enabled {
            self.registry.register_collector(collector);
        }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The series of `task` on `queue` (`None` when disabled). Names outside the configured
    /// sets are recorded as [`UNKNOWN`].
    pub fn task(&self, task: &str, queue: &str) -> Option<SeriesId> {
        if !self.enabled {
            return None;
        }
        let unknown = |names: &Vec<String>| names.len() - 1;
        let t = (self.task_index.get(task).copied()).unwrap_or_else(|| unknown(&self.task_names));
        let q =
            (self.queue_index.get(queue).copied()).unwrap_or_else(|| unknown(&self.queue_names));
        u32::try_from(t * self.queue_names.len() + q)
            .ok()
            .map(SeriesId)
    }

    /// The handles of series `id` (made on first use).
    pub fn series(&self, id: SeriesId) -> &TaskSeries {
        let k = id.0 as usize;
        self.series[k].get_or_init(|| {
            let queues = self.queue_names.len();
            TaskSeries::new(
                &self.families,
                &self.task_names[k / queues],
                &self.queue_names[k % queues],
            )
        })
    }

    /// [`series`](Self::series) of `id`, if there is one.
    pub fn of(&self, id: Option<SeriesId>) -> Option<&TaskSeries> {
        id.map(|id| self.series(id))
    }

    /// Resolves the series of a batch about to be enqueued; call [`Enqueuing::done`] with the
    /// broker's answers.
    pub fn enqueuing(&self, batch: &[Envelope]) -> Enqueuing<'_> {
        let series = if self.enabled {
            batch
                .iter()
                .map(|envelope| self.task(&envelope.task, &envelope.queue))
                .collect()
        } else {
            Vec::new()
        };
        Enqueuing {
            metrics: self,
            series,
        }
    }

    /// The gauges of `queue`'s consumer (`None` when disabled).
    pub fn consumer(&self, queue: &str) -> Option<ConsumerSeries> {
        if !self.enabled {
            return None;
        }
        let q = self.queue_index.get(queue).copied();
        let labels = QueueLabels {
            queue: q.map_or(UNKNOWN, |q| &self.queue_names[q]).to_string(),
        };
        Some(ConsumerSeries {
            in_flight: self.families.in_flight.get_or_create_owned(&labels),
            concurrency: self.families.concurrency.get_or_create_owned(&labels),
        })
    }

    /// The series of the Celery bridge of `kombu_queue` (`None` when disabled).
    pub fn celery_bridge(&self, kombu_queue: &str) -> Option<BridgeSeries> {
        if !self.enabled {
            return None;
        }
        let labels = KombuLabels {
            kombu_queue: kombu_queue.to_string(),
        };
        Some(BridgeSeries {
            moved: self.families.celery_moved.get_or_create_owned(&labels),
            take: self.families.celery_take.get_or_create_owned(&labels),
        })
    }

    /// The actor at `path`, of `kind`, is in the tree: its restart counter is listed (at 0
    /// until its first restart).
    pub fn actor_registered(&self, path: &str, kind: &str) {
        if self.enabled {
            let labels = ActorLabels {
                path: path.to_string(),
                kind: kind.to_string(),
            };
            drop(self.families.restarts.get_or_create(&labels));
        }
    }

    /// Sets `rt_build_info` (1, with the binary's version, commit and compiler as labels).
    pub fn build_info(&self, info: BuildInfo) {
        if self.enabled {
            self.families.build.clear();
            let labels = BuildLabels {
                version: info.version,
                git_sha: info.git_sha,
                rustc: info.rustc,
            };
            self.families.build.get_or_create(&labels).set(1);
        }
    }

    /// The supervisor restarted the actor at `path`, of `kind`.
    pub fn actor_restarted(&self, path: &str, kind: &str) {
        if self.enabled {
            let labels = ActorLabels {
                path: path.to_string(),
                kind: kind.to_string(),
            };
            self.families.restarts.get_or_create(&labels).inc();
        }
    }

    /// The recovery sweep dead-lettered entries of these `tasks` from `queue`: they hit
    /// `max_deliveries` (poison messages).
    pub fn poisoned(&self, queue: &str, tasks: &[String]) {
        for task in tasks {
            if let Some(series) = self.of(self.task(task, queue)) {
                series.dead_lettered(DeadReason::Poison);
            }
        }
    }

    /// The broker answered a PING in `rtt`.
    pub fn broker_round_trip(&self, rtt: Duration) {
        if self.enabled {
            self.families.broker_round_trip.set(rtt.as_secs_f64());
        }
    }

    /// The exposition text (Prometheus text format 0.0.4), after reading the queue depths
    /// and the connection from `broker`; `None` when disabled. Depths that cannot be read
    /// within two seconds are left out (and `rt_broker_connected` says why); a queue whose
    /// depth the broker refuses (a key of the wrong type) is left out alone, the others stay.
    pub async fn render(&self, broker: &AnyBroker) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let queues = &self.queue_names[..self.queue_names.len() - 1];
        let depths = tokio::time::timeout(DEPTH_TIMEOUT, async {
            let mut depths = Vec::with_capacity(queues.len());
            for queue in queues {
                depths.push((queue.as_str(), broker.depth(queue).await));
            }
            depths
        })
        .await;
        let answered = depths
            .as_ref()
            .is_ok_and(|depths| depths.is_empty() || depths.iter().any(|(_, depth)| depth.is_ok()));
        let connected = broker.degraded().is_none() && answered;
        self.families.broker_connected.set(i64::from(connected));
        match depths {
            Ok(depths) => {
                for (queue, depth) in depths {
                    match depth {
                        Ok(depth) => self.set_depth(queue, depth),
                        Err(_) => self.clear_depth(queue),
                    }
                }
            }
            Err(_) => self.families.depth.clear(),
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).ok()?;
        Some(out)
    }

    fn clear_depth(&self, queue: &str) {
        for state in DEPTH_STATES {
            self.families.depth.remove(&DepthLabels {
                queue: queue.to_string(),
                state,
            });
        }
    }

    fn set_depth(&self, queue: &str, depth: QueueDepth) {
        let counts = [depth.ready, depth.delayed, depth.in_flight, depth.dead];
        for (state, n) in DEPTH_STATES.into_iter().zip(counts) {
            let labels = DepthLabels {
                queue: queue.to_string(),
                state,
            };
            self.families
                .depth
                .get_or_create(&labels)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests;
