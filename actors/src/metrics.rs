//! `Metrics`: the node's Prometheus registry (`GET /metrics`), built on `prometheus-client`.
//!
//! One [`Metrics`] per node, made before the tree and shared through an `Arc`: the consumers
//! and task actors record through [`crate::consumer::Work`], the supervisors through the
//! [`crate::tree::Tree`] (every restart they record there is counted here too), the broker
//! actor through its arguments. Two ways in, each used for one kind of number:
//!
//! - **recorded as it happens** (atomic counters, gauges and histograms): the task lifecycle by
//!   task and queue, in-flight tasks per consumer, actor restarts, the broker's round trip;
//! - **read at scrape time** from state that already counts it, so nothing is counted twice:
//!   queue depths (the broker's `depth`, as `GET /queues`), the broker connection, breakers
//!   (state, transitions, rejected calls — the [`Breaker`]'s own counters), rate limiters
//!   (callers waiting, wait times) and process pools (agents per state, startup failures,
//!   claim latency — the [`Pool`]'s own membership and totals).
//!
//! # The hot path
//!
//! Every `(task, queue)` series of the configured tasks on their own queue is created up front
//! ([`TaskSeries`], a set of handles into the label families), so recording is a lookup of two
//! borrowed strings, an `Arc` clone and atomic adds — no label allocation per task. A consumer
//! resolves a task's series once, when it admits it, and hands it to the task actor.
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::broker::{AnyBroker, Broker, Enqueued, Envelope, QueueDepth, parse_time};
use crate::pool::Pool;
use crate::resource::Resources;
use crate::resource::breaker::BreakerState;

/// The label value of a task or queue name outside the configured set.
pub const UNKNOWN: &str = "unknown";

/// `Content-Type` of [`Metrics::render`]: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Bucket bounds (seconds) of every duration histogram: 1 ms to 5 min.
const SECONDS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

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
struct ActorLabels {
    path: String,
    kind: String,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// The label families the registry encodes.
#[derive(Debug)]
struct Families {
    enqueued: Family<TaskLabels, Counter>,
    started: Family<TaskLabels, Counter>,
    succeeded: Family<TaskLabels, Counter>,
    failed: Family<TaskLabels, Counter>,
    retried: Family<TaskLabels, Counter>,
    deferred: Family<TaskLabels, Counter>,
    dead_lettered: Family<DeadLabels, Counter>,
    duration: Histograms<TaskLabels>,
    wait: Histograms<TaskLabels>,
    in_flight: Family<QueueLabels, Gauge>,
    concurrency: Family<QueueLabels, Gauge>,
    depth: Family<DepthLabels, Gauge>,
    restarts: Family<ActorLabels, Counter>,
    broker_connected: Gauge,
    broker_round_trip: Gauge<f64, AtomicU64>,
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
            broker_connected: Gauge::default(),
            broker_round_trip: Gauge::default(),
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
            "Failed attempts scheduled again as a delayed retry",
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
            "rt_broker_connected",
            "1 while the broker is reachable, 0 while its connection is lost",
            self.broker_connected.clone(),
        );
        r.register(
            "rt_broker_round_trip_seconds",
            "Round trip of the broker actor's last PING (every second)",
            self.broker_round_trip.clone(),
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
    retried: Counter,
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
        Self {
            enqueued: families.enqueued.get_or_create_owned(&labels),
            started: families.started.get_or_create_owned(&labels),
            succeeded: families.succeeded.get_or_create_owned(&labels),
            failed: families.failed.get_or_create_owned(&labels),
            retried: families.retried.get_or_create_owned(&labels),
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

    /// The first attempt of `envelope` starts now: observes its wait since it was enqueued,
    /// or since its `eta` when that is later. Retries are not observed (their wait is the
    /// backoff their policy chose).
    pub fn first_start(&self, envelope: &Envelope) {
        if envelope.attempt != 0 {
            return;
        }
        let Ok(enqueued) = parse_time(&envelope.enqueued_at) else {
            return;
        };
        let due = envelope
            .eta
            .as_deref()
            .and_then(|eta| parse_time(eta).ok())
            .map_or(enqueued, |eta| eta.max(enqueued));
        let wait = SystemTime::now().duration_since(due).unwrap_or_default();
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

    /// The outcome was recorded: a delayed retry.
    pub fn retried(&self) {
        self.retried.inc();
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

/// The series of one enqueued batch, resolved before the batch goes to the broker; counted
/// once the broker answered, duplicates left out. See [`Metrics::enqueuing`].
#[derive(Debug)]
pub struct Enqueuing(Vec<Option<Arc<TaskSeries>>>);

impl Enqueuing {
    /// Counts every envelope the broker enqueued (`answers` in batch order).
    pub fn done(self, answers: &[Enqueued]) {
        for (series, answer) in self.0.iter().zip(answers) {
            if let (Some(series), false) = (series, answer.duplicate) {
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

/// The node's registry; see the module docs.
pub struct Metrics {
    enabled: bool,
    registry: Registry,
    families: Families,
    /// Task → queue → series, for the configured tasks on their own queue.
    series: HashMap<String, HashMap<String, Arc<TaskSeries>>>,
    /// Other `(task, queue)` pairs met at run time (a task enqueued on another queue, an
    /// unknown name), made on first use. Bounded by the label rules.
    late: Mutex<HashMap<(String, String), Arc<TaskSeries>>>,
    queues: Vec<String>,
    known_queues: HashSet<String>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .field("queues", &self.queues)
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
            series: HashMap::new(),
            late: Mutex::default(),
            queues: Vec::new(),
            known_queues: HashSet::new(),
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
        let queues: Vec<String> = queues.into_iter().map(str::to_string).collect();
        let mut series: HashMap<String, HashMap<String, Arc<TaskSeries>>> = HashMap::new();
        for (task, queue) in tasks {
            let made = Arc::new(TaskSeries::new(&families, task, queue));
            series
                .entry(task.to_string())
                .or_default()
                .insert(queue.to_string(), made);
        }
        Self {
            enabled: true,
            registry,
            families,
            series,
            late: Mutex::default(),
            known_queues: queues.iter().cloned().collect(),
            queues,
        }
    }

    /// Adds breakers and rate limiters of `resources`, read at every scrape.
    pub fn watch_resources(&mut self, resources: Arc<Resources>) {
        if self.enabled {
            self.registry
                .register_collector(Box::new(ResourceCollector(resources)));
        }
    }

    /// Adds the process pools, read at every scrape.
    pub fn watch_pools(&mut self, pools: Vec<Pool>) {
        if self.enabled && !pools.is_empty() {
            self.registry
                .register_collector(Box::new(PoolCollector(pools)));
        }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The series of `task` on `queue` (`None` when disabled). Names outside the configured
    /// sets are recorded as [`UNKNOWN`].
    pub fn task(&self, task: &str, queue: &str) -> Option<Arc<TaskSeries>> {
        if !self.enabled {
            return None;
        }
        if let Some(series) = self.series.get(task).and_then(|q| q.get(queue)) {
            return Some(Arc::clone(series));
        }
        let task = if self.series.contains_key(task) {
            task
        } else {
            UNKNOWN
        };
        let queue = if self.known_queues.contains(queue) {
            queue
        } else {
            UNKNOWN
        };
        let mut late = self.late.lock().unwrap_or_else(|e| e.into_inner());
        let key = (task.to_string(), queue.to_string());
        let series = late
            .entry(key)
            .or_insert_with(|| Arc::new(TaskSeries::new(&self.families, task, queue)));
        Some(Arc::clone(series))
    }

    /// Resolves the series of a batch about to be enqueued; call [`Enqueuing::done`] with the
    /// broker's answers.
    pub fn enqueuing(&self, batch: &[Envelope]) -> Enqueuing {
        if !self.enabled {
            return Enqueuing(Vec::new());
        }
        Enqueuing(
            batch
                .iter()
                .map(|envelope| self.task(&envelope.task, &envelope.queue))
                .collect(),
        )
    }

    /// The gauges of `queue`'s consumer (`None` when disabled).
    pub fn consumer(&self, queue: &str) -> Option<ConsumerSeries> {
        if !self.enabled {
            return None;
        }
        let labels = QueueLabels {
            queue: self.queue_label(queue).to_string(),
        };
        Some(ConsumerSeries {
            in_flight: self.families.in_flight.get_or_create_owned(&labels),
            concurrency: self.families.concurrency.get_or_create_owned(&labels),
        })
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

    /// The recovery sweep dead-lettered `n` entries of `queue` that hit `max_deliveries`
    /// (their task names are not known to the sweep: recorded as [`UNKNOWN`]).
    pub fn poisoned(&self, queue: &str, n: u64) {
        if n > 0
            && let Some(series) = self.task(UNKNOWN, queue)
        {
            series.dead_lettered[DeadReason::Poison as usize].inc_by(n);
        }
    }

    /// The broker answered a PING in `rtt`.
    pub fn broker_round_trip(&self, rtt: Duration) {
        if self.enabled {
            self.families.broker_round_trip.set(rtt.as_secs_f64());
        }
    }

    fn queue_label<'a>(&self, queue: &'a str) -> &'a str {
        if self.known_queues.contains(queue) {
            queue
        } else {
            UNKNOWN
        }
    }

    /// The exposition text (Prometheus text format 0.0.4), after reading the queue depths
    /// and the connection from `broker`; `None` when disabled. Depths that cannot be read
    /// within two seconds are left out (and `rt_broker_connected` says why).
    pub async fn render(&self, broker: &AnyBroker) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let depths = tokio::time::timeout(DEPTH_TIMEOUT, async {
            let mut depths = Vec::with_capacity(self.queues.len());
            for queue in &self.queues {
                depths.push((queue.as_str(), broker.depth(queue).await?));
            }
            Ok::<_, crate::broker::BrokerError>(depths)
        })
        .await;
        let connected = broker.degraded().is_none() && matches!(depths, Ok(Ok(_)));
        self.families.broker_connected.set(i64::from(connected));
        match depths {
            Ok(Ok(depths)) => {
                for (queue, depth) in depths {
                    self.set_depth(queue, depth);
                }
            }
            _ => self.families.depth.clear(),
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).ok()?;
        Some(out)
    }

    fn set_depth(&self, queue: &str, depth: QueueDepth) {
        for (state, n) in [
            ("ready", depth.ready),
            ("delayed", depth.delayed),
            ("in_flight", depth.in_flight),
            ("dead", depth.dead),
        ] {
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

/// Breakers and rate limiters, read at scrape time.
#[derive(Debug)]
struct ResourceCollector(Arc<Resources>);

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let resources: Vec<_> = self
            .0
            .names()
            .into_iter()
            .filter_map(|name| Some((name, self.0.get(name)?)))
            .collect();
        let breakers: Vec<_> = resources
            .iter()
            .filter_map(|(name, r)| Some((*name, r.breaker()?.stats())))
            .collect();
        if !breakers.is_empty() {
            let mut m = encoder.encode_descriptor(
                "rt_breaker_state",
                "1 for the breaker's current state (closed, open, half_open), 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for (name, stats) in &breakers {
                for state in BreakerState::ALL {
                    let labels = [("resource", *name), ("state", state.as_str())];
                    ConstGauge::new(i64::from(stats.state == state))
                        .encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = encoder.encode_descriptor(
                "rt_breaker_transitions",
                "Breaker transitions, by the state entered",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in &breakers {
                for (state, n) in stats.transitions {
                    let labels = [("resource", *name), ("to", state.as_str())];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = encoder.encode_descriptor(
                "rt_breaker_rejected",
                "Calls refused by the breaker (open, or half-open with every probe slot taken)",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in &breakers {
                ConstCounter::new(stats.rejected)
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
        }
        let limiters: Vec<_> = resources
            .iter()
            .filter_map(|(name, r)| Some((*name, r.limiter()?)))
            .collect();
        if !limiters.is_empty() {
            let mut m = encoder.encode_descriptor(
                "rt_limiter_waiting",
                "Calls waiting for the resource's rate limiters or concurrency cap now",
                None,
                MetricType::Gauge,
            )?;
            for (name, limiter) in &limiters {
                ConstGauge::new(i64::try_from(limiter.waiting).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
            let mut m = encoder.encode_descriptor(
                "rt_limiter_wait_seconds",
                "Time calls waited for the rate limiters, the concurrency cap and server holds",
                None,
                MetricType::Histogram,
            )?;
            for (name, limiter) in &limiters {
                limiter
                    .waits
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
        }
        Ok(())
    }
}

/// Process pools, read at scrape time.
#[derive(Debug)]
struct PoolCollector(Vec<Pool>);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats: Vec<_> = self.0.iter().map(|pool| (pool, pool.stats())).collect();
        let mut m = encoder.encode_descriptor(
            "rt_pool_agents",
            "Live agents per pool and state (starting, idle, assigned, draining)",
            None,
            MetricType::Gauge,
        )?;
        for (pool, stats) in &stats {
            for (state, n) in stats.agents {
                let labels = [("pool", pool.name()), ("state", state.as_str())];
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "rt_pool_startup_failures",
            "Agents that failed to start (spawn error, exit before ready, startup_timeout)",
            None,
            MetricType::Counter,
        )?;
        for (pool, stats) in &stats {
            ConstCounter::new(stats.startup_failures)
                .encode(m.encode_family(&[("pool", pool.name())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "rt_pool_claim_seconds",
            "Time from a claim to a confirmed assignment (successful claims)",
            None,
            MetricType::Histogram,
        )?;
        for (pool, _) in &stats {
            pool.claim_latency()
                .encode(m.encode_family(&[("pool", pool.name())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
