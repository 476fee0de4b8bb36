//! `BridgeActor`: takes over one kombu queue — moves its messages into the runtime's streams
//! with `take.lua` (atomic pop + `XADD`, see [`crate::celery`]).
//!
//! It blocks rather than polls. One `take.lua` call moves up to `batch` messages; a full batch
//! takes again at once. After a partial one, the bridge waits on its own connection in
//! `BLMOVE <queue> <holding list> RIGHT LEFT <poll>`: a message pushed on the kombu list is
//! moved at once, atomically, into this bridge's holding list
//! (`<prefix>:celery:held:<node>:<queue>`, [`Celery::held_list`]), and the next take moves it
//! from there into the stream (the holding list is the first list a take drains). Lua cannot
//! block and `BRPOP`/`BLMPOP` hand the message to the client, so a blocking pop outside the
//! script could lose it; `BLMOVE` keeps it in Redis. Killing the bridge or the node at any
//! moment loses and duplicates nothing: a message is in a kombu list, a holding list, or (moved
//! whole by one script) a stream.
//!
//! Only the queue's own list (kombu priority 0, the first consumed) is waited on — `BLMOVE`
//! has one source. A message on a priority sub-queue (`q\x06\x163`, …) is moved by the take
//! that follows the wait, so at most `poll` after it was sent; `poll` is the wait's timeout.
//!
//! Holding lists outlive their node: each bridge adds its node's name to the queue's holders
//! set (`<prefix>:celery:holders:<queue>`, [`Celery::holders_key`]) before it waits, and when
//! it starts and every [`SWEEP`] it looks (`sweep.lua`) for holding lists of other nodes that
//! hold messages — a node killed between its `BLMOVE` and its take, whose generated name never
//! comes back — and drains them first. A name is forgotten once its list is empty and its
//! node's presence record is gone.
//!
//! A message whose Celery task id is taken (its task is queued, running or ended less than
//! `broker.result_ttl` ago — the runtime's rule for chosen ids) is a duplicate: `take.lua`
//! drops it in the same step, and it is counted and logged here with its id. Counters live
//! outside the actor ([`BridgeCounters`]) and survive its restarts.
//!
//! Snapshot: `{kombu_queue, lists, held_list, moved, moved_per_s, dead_lettered, duplicates,
//! polls, blocks, take_ms: {p50, p99, max, samples}, errors, last_error}`: `polls` counts
//! `take.lua` calls, `blocks` the waits; `moved_per_s` is the rate over the last second or
//! more; `take_ms` is the time from a wait's return with a message to the commit of the take
//! that moved it, over the last [`LATENCY_SAMPLES`] such takes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use redis::Script;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::time::Instant;

use super::Celery;
use crate::broker::{MAX_ID_BYTES, rfc3339};
use crate::metrics::BridgeSeries;
use crate::tree::TreeHandle;

/// How often a bridge looks for other nodes' holding lists that hold messages.
pub const SWEEP: Duration = Duration::from_secs(10);
/// Takes after a wait kept for `take_ms` in the snapshot.
pub const LATENCY_SAMPLES: usize = 1000;

/// What a bridge did, kept across its restarts.
#[derive(Debug, Default)]
pub struct BridgeCounters {
    /// `rt_celery_moved` and `rt_celery_take_seconds` of its kombu queue, when metrics are on.
    metrics: Option<BridgeSeries>,
    moved: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    polls: AtomicU64,
    blocks: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Microseconds from a wait's return with a message to its take's commit, newest last.
    take_us: Mutex<VecDeque<u64>>,
}

impl BridgeCounters {
    /// Counters at zero that also feed `metrics` (from [`Metrics::celery_bridge`]).
    ///
    /// [`Metrics::celery_bridge`]: crate::metrics::Metrics::celery_bridge
    pub fn new(metrics: Option<BridgeSeries>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn failed(&self, queue: &str, what: &str, err: &redis::RedisError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(queue = %queue, error = %err, "celery bridge: {what} failed; trying again");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
    }

    fn took(&self, latency: Duration) {
        if let Some(metrics) = &self.metrics {
            metrics.took(latency);
        }
        let mut samples = self.take_us.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == LATENCY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// `{p50, p99, max, samples}` of the kept take latencies, in milliseconds.
    fn take_ms(&self) -> serde_json::Value {
        let mut samples: Vec<u64> = self
            .take_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
                .map(|us| *us as f64 / 1000.0)
        };
        json!({
            "p50": at(0.5),
            "p99": at(0.99),
            "max": samples.last().map(|us| *us as f64 / 1000.0),
            "samples": samples.len(),
        })
    }
}

/// Spawn arguments.
#[derive(Debug, Clone)]
pub struct BridgeArgs {
    /// Place in the tree.
    pub node: TreeHandle,
    /// The shared half of the bridge.
    pub celery: Arc<Celery>,
    /// The kombu queue taken over.
    pub queue: String,
    /// Counters (outlive restarts).
    pub counters: Arc<BridgeCounters>,
}

/// Messages.
#[derive(Debug)]
pub enum BridgeMessage {
    /// Move one batch, then take again or wait.
    Poll,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BridgeActor;

/// Bridge state.
pub struct BridgeState {
    args: BridgeArgs,
    /// The kombu lists, in the order they are consumed.
    lists: Vec<String>,
    held: String,
    holders: String,
    /// Other nodes' holding lists found holding messages, drained by the next takes.
    orphans: Vec<String>,
    last_sweep: Instant,
    script: Script,
    sweep: Script,
    mapping: String,
    /// This bridge's own connection for `BLMOVE` (a wait would stall a shared one).
    blocking: Option<MultiplexedConnection>,
    /// When the last wait returned with a message (its take's latency starts there).
    waited: Option<Instant>,
    /// Start of the `moved_per_s` window and `moved` then.
    window: (Instant, u64),
    moved_per_s: f64,
}

impl std::fmt::Debug for BridgeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeState")
            .field("queue", &self.args.queue)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Actor for BridgeActor {
    type Msg = BridgeMessage;
    type State = BridgeState;
    type Arguments = BridgeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: BridgeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let settings = args.celery.settings();
        let mapping = serde_json::to_string(&settings.tasks)?;
        let moved = args.counters.moved.load(Ordering::Relaxed);
        let mut state = BridgeState {
            lists: args.celery.lists(&args.queue),
            held: args.celery.held_list(&args.queue),
            holders: args.celery.holders_key(&args.queue),
            orphans: Vec::new(),
            last_sweep: Instant::now(),
            script: Script::new(include_str!("take.lua")),
            sweep: Script::new(include_str!("sweep.lua")),
            mapping,
            blocking: None,
            waited: None,
            window: (Instant::now(), moved),
            moved_per_s: 0.0,
            args,
        };
        if let Err(err) = state.find_orphans().await {
            state
                .args
                .counters
                .failed(&state.args.queue, "looking for holding lists", &err);
        }
        state.publish();
        myself.send_message(BridgeMessage::Poll)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BridgeMessage::Poll => {
                let settings = state.args.celery.settings();
                let batch = settings.batch.max(1);
                let retry = settings.poll.max(Duration::from_millis(500));
                let counters = Arc::clone(&state.args.counters);
                if state.last_sweep.elapsed() >= SWEEP {
                    if let Err(err) = state.find_orphans().await {
                        counters.failed(&state.args.queue, "looking for holding lists", &err);
                    }
                }
                counters.polls.fetch_add(1, Ordering::Relaxed);
                let full = match state.take(batch).await {
                    Ok(result) => state.took(batch, result).await,
                    Err(err) => {
                        counters.failed(&state.args.queue, "moving messages", &err);
                        state.publish();
                        myself.send_after(retry, || BridgeMessage::Poll);
                        return Ok(());
                    }
                };
                state.publish();
                if !full {
                    if let Err(err) = state.wait().await {
                        state.blocking = None;
                        counters.failed(&state.args.queue, "waiting for messages", &err);
                        myself.send_after(retry, || BridgeMessage::Poll);
                        return Ok(());
                    }
                }
                myself.send_message(BridgeMessage::Poll)?;
            }
        }
        Ok(())
    }

    /// A message the last wait moved into the holding list is taken on before the bridge
    /// stops (else it would wait there for this node's next start or another node's sweep).
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.waited.is_some() {
            let batch = state.args.celery.settings().batch.max(1);
            match state.take(batch).await {
                Ok(result) => {
                    state.took(batch, result).await;
                }
                Err(err) => {
                    let counters = Arc::clone(&state.args.counters);
                    counters.failed(&state.args.queue, "moving messages", &err);
                }
            }
        }
        Ok(())
    }
}

impl BridgeState {
    /// Count and log one take's result; whether the batch was full.
    async fn took(
        &mut self,
        batch: usize,
        (moved, dead, rejected, duplicates): (u64, u64, Vec<String>, Vec<String>),
    ) -> bool {
        let counters = &self.args.counters;
        if let Some(waited) = self.waited.take() {
            counters.took(waited.elapsed());
        }
        counters.moved.fetch_add(moved, Ordering::Relaxed);
        if let Some(metrics) = &counters.metrics {
            metrics.moved(moved);
        }
        counters.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        let dropped = duplicates.len() as u64;
        counters.duplicates.fetch_add(dropped, Ordering::Relaxed);
        for id in &duplicates {
            tracing::warn!(queue = %self.args.queue, task_id = %id,
                "celery message dropped: a task with its id exists (a duplicate)");
        }
        if dead > 0 {
            tracing::warn!(queue = %self.args.queue, dead,
                "malformed celery messages dead-lettered");
        }
        // Unmapped tasks: FAILURE in Celery's backend, so `.get()` raises.
        for pair in rejected.chunks_exact(2) {
            if let Err(err) = self.args.celery.rejected(&pair[0], &pair[1]).await {
                tracing::warn!(task_id = %pair[0], error = %err,
                    "celery FAILURE result not written");
            }
        }
        let full = moved + dead + dropped >= batch as u64;
        if !full {
            // Every list in the take, the orphans too, is empty now.
            self.orphans.clear();
        }
        full
    }

    async fn take(&self, batch: usize) -> redis::RedisResult<(u64, u64, Vec<String>, Vec<String>)> {
        let settings = self.args.celery.settings();
        let mut invocation = self.script.prepare_invoke();
        for list in self.orphans.iter().chain([&self.held]).chain(&self.lists) {
            invocation.key(list);
        }
        invocation
            .arg(&self.args.celery.runtime_prefix)
            .arg(batch)
            .arg(&self.mapping)
            .arg(&settings.dead_letter_queue)
            .arg(rfc3339(SystemTime::now()))
            .arg(self.args.celery.events_maxlen)
            .arg(MAX_ID_BYTES);
        let mut conn = self.args.celery.broker.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Waits up to `poll` for a message on the kombu queue's own list, moving it into the
    /// holding list; the node is (again) named in the holders set first, in the same pipeline.
    async fn wait(&mut self) -> redis::RedisResult<()> {
        let poll = self.args.celery.settings().poll;
        if self.blocking.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(poll + Duration::from_secs(5)));
            let conn = self
                .args
                .celery
                .broker_client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.blocking = Some(conn);
        }
        let Some(conn) = self.blocking.as_mut() else {
            return Ok(());
        };
        self.args.counters.blocks.fetch_add(1, Ordering::Relaxed);
        let timeout = format!("{:.3}", poll.max(Duration::from_millis(1)).as_secs_f64());
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(&self.holders)
            .arg(&self.args.celery.node)
            .ignore();
        pipe.cmd("BLMOVE")
            .arg(&self.lists[0])
            .arg(&self.held)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(timeout);
        let (moved,): (Option<redis::Value>,) = pipe.query_async(conn).await?;
        if moved.is_some() {
            self.waited = Some(Instant::now());
        }
        Ok(())
    }

    /// Looks for other nodes' holding lists that hold messages (`sweep.lua`).
    async fn find_orphans(&mut self) -> redis::RedisResult<()> {
        self.last_sweep = Instant::now();
        let mut conn = self.args.celery.broker.clone();
        let found: Vec<String> = self
            .sweep
            .key(&self.holders)
            .arg(&self.args.celery.runtime_prefix)
            .arg(&self.args.queue)
            .arg(&self.args.celery.node)
            .invoke_async(&mut conn)
            .await?;
        if !found.is_empty() {
            tracing::warn!(queue = %self.args.queue, lists = ?found,
                "celery bridge: moving messages left in other nodes' holding lists");
        }
        self.orphans = found;
        Ok(())
    }

    fn publish(&mut self) {
        let c = &self.args.counters;
        let moved = c.moved.load(Ordering::Relaxed);
        let elapsed = self.window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            self.moved_per_s =
                ((moved - self.window.1) as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0;
            self.window = (Instant::now(), moved);
        }
        self.args.node.publish(json!({
            "kombu_queue": self.args.queue,
            "lists": self.lists.len(),
            "held_list": self.held,
            "moved": moved,
            "moved_per_s": self.moved_per_s,
            "dead_lettered": c.dead_lettered.load(Ordering::Relaxed),
            "duplicates": c.duplicates.load(Ordering::Relaxed),
            "polls": c.polls.load(Ordering::Relaxed),
            "blocks": c.blocks.load(Ordering::Relaxed),
            "take_ms": c.take_ms(),
            "errors": c.errors.load(Ordering::Relaxed),
            "last_error": *c.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        }));
    }
}
