//! `ConsumerActor`: one queue's bulkhead on this node — its own concurrency, its own fetcher,
//! its own task actors — so a saturated queue (long chat tasks) cannot delay another.
//!
//! - A **fetcher** task reserves entries only into free slots (`concurrency + prefetch`, a
//!   semaphore): never more in memory than the bulkhead can run. It sends them to the actor.
//! - The actor checks each delivery (over the broker's `max_entry_bytes` → dead letter
//!   `entry too large`; unknown task → dead letter `no such task`; an `eta`, `expires` or time
//!   limit that is not usable — not a time, past its cap, a zero or contradictory limit — →
//!   dead letter naming the field; past its `expires` → dead letter; before its `eta` (an
//!   entry written to the stream directly, a bridged message) → deferred to it; a closed
//!   [`ResourceGate`] → deferred without spending an attempt), holds its
//!   lease in [`Leases`](crate::broker::Leases), and starts a [`TaskActor`] per task, up to `concurrency` at once;
//!   the rest wait in arrival order. A task actor tells the consumer when its attempt has
//!   ended (`ConsumerMessage::Ran`), before it records the outcome: it then no longer counts
//!   against `concurrency` — the next waiting task starts while the outcome is written — but
//!   keeps its slot (of `concurrency + prefetch`) until it is recorded.
//! - A task actor records its own outcome and stops with the reason `"done"`. Any other exit
//!   (panic, kill) is a crash: the consumer records a retry per the task's policy.
//! - Revocations ([`Records::revocations`], forwarded to the actor as
//!   `ConsumerMessage::Revoke`): an admitted task revoked before it is started is dead-lettered
//!   as `revoked` (with its `link_error` callbacks); a running one is terminated when the
//!   revocation asks for it — its task actor fires the handler's soft signal, stops the attempt
//!   `terminate_grace` later and records it revoked — and otherwise finishes its attempt. An
//!   entry fetched after its revocation is dead-lettered the same way at admission
//!   ([`Records::is_revoked`], no round trip).
//! - [`kill_task`] (`ConsumerMessage::KillTask`, the chaos route's `{consumer path}/{task id}`)
//!   kills the task actor running that task here: its attempt is dropped (an `exec` command's
//!   process group is SIGKILLed and reaped) and counts as a retryable failure like any other
//!   crash. Task actors are not tree nodes (too costly per task), so their consumer finds them.
//! - A restarted consumer adopts the deliveries its previous incarnation still held (their
//!   task actors died with it) and runs them again at once: nothing waits for a lease.
//! - `Drain` stops fetching and hands the waiting deliveries (reserved, not started) back to
//!   the broker (`Broker::hand_back`): other nodes take them at once, nobody waits for their
//!   lease. An orderly stop waits for running tasks up to `drain`, then kills what is left
//!   (their entries come back through lease recovery).
//!
//! Snapshot (every second): concurrency, prefetch, running tasks (id, task, attempt,
//! elapsed, deadline), recording (attempts ended, outcome being written), waiting, counters, and the queue's recorded outcomes on this node
//! ([`Outcomes`]: succeeded, retried, dead — kept across restarts of the consumer).
//!
//! Log lines about one task carry its fields through [`task_span`].

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::broker::{Delivery, Records, Revocation, TaskQueue};
use crate::gate::{Admission, ResourceGate};
use crate::handler::{ErrorClass, TaskDef, TaskError};
use crate::metrics::ConsumerSeries;
use crate::task::{
    AttemptEnded, DONE, Deferral, End, Held, Settler, TaskActor, TaskArgs, limits, task_span,
};
pub use crate::task::{Outcomes, Work};
use crate::tree::TreeHandle;

/// How often the snapshot is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Pause after a failed reserve.
const FETCH_RETRY: Duration = Duration::from_millis(500);
/// Time a draining consumer gives the fetcher's last reserve beyond `poll`.
const FETCH_STOP_MARGIN: Duration = Duration::from_secs(4);

/// A concurrency slot: one of the consumer's `concurrency + prefetch`, held by a delivery
/// from its reserve until it is settled (or handed back); dropping it frees the slot. `None`
/// for an adopted delivery beyond the slots.
type Slot = Option<OwnedSemaphorePermit>;

/// How long one reserve waits for an entry before the fetcher loops: also how late a drain
/// stops the fetcher.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// One queue's bulkhead on a node (`[queues.NAME]`). The default runs one task at a time and
/// fetches none ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Tasks run at once.
    pub concurrency: NonZeroUsize,
    /// Entries reserved beyond the running ones.
    pub prefetch: usize,
    /// How long one reserve waits for an entry ([`DEFAULT_POLL`]).
    pub poll: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            concurrency: NonZeroUsize::MIN,
            prefetch: 0,
            poll: DEFAULT_POLL,
        }
    }
}

/// Spawn arguments.
#[derive(Debug, Clone)]
pub struct ConsumerArgs {
    /// Place in the tree.
    pub node: TreeHandle,
    pub queue: String,
    /// Its concurrency, prefetch and poll.
    pub settings: QueueSettings,
    /// Time an orderly stop waits for running tasks.
    pub drain: Duration,
    /// Shared with the task actors.
    pub work: Arc<Work>,
    /// Asked before starting a task that uses resources.
    pub gate: Arc<dyn ResourceGate>,
    /// The queue's outcome counters (outlive the consumer's restarts).
    pub outcomes: Arc<Outcomes>,
}

/// Messages.
#[derive(Debug)]
pub enum ConsumerMessage {
    /// Entries reserved by the fetcher, each with the slot it was reserved into.
    Fetched(Vec<(Delivery, OwnedSemaphorePermit)>),
    /// Stop fetching (node shutdown); running and waiting tasks go on.
    Drain,
    /// The attempt of this task actor has ended; its outcome is being recorded. It no longer
    /// counts against `concurrency` (the next waiting task starts), but keeps its slot — the
    /// bound on entries held — until it is recorded.
    Ran(ActorId),
    /// Refresh the snapshot.
    Snapshot,
    /// A task was revoked (on any node): dead-letter it if it waits here, terminate it if it
    /// runs here and the revocation asks for that.
    Revoke(Revocation),
    /// Kill the task actor running the task with this id (fault injection): answers what it
    /// killed, `None` when no such task runs here. The consumer then records the attempt as a
    /// retryable failure, as for any crashed task actor.
    KillTask {
        /// The task's id (its envelope's `id`).
        id: String,
        /// Where the answer goes.
        reply: RpcReplyPort<Option<KilledTask>>,
    },
}

/// A running task killed by [`kill_task`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KilledTask {
    /// The task's id.
    pub id: String,
    /// Its name.
    pub task: String,
    pub queue: String,
    /// The attempt that was killed (0 for the first run).
    pub attempt: u32,
}

/// Why [`kill_task`] killed nothing.
#[derive(Debug, thiserror::Error)]
pub enum KillTaskError {
    /// No task with that id runs in this consumer (finished, waiting, or never here).
    #[error("no running task `{0}`")]
    NotRunning(String),
    /// The cell is not a running consumer.
    #[error("not a running consumer")]
    NotAConsumer,
    /// The consumer did not answer in time.
    #[error("the consumer did not answer within {0:?}")]
    NoAnswer(Duration),
}

/// Asks the consumer at `consumer` to kill the task actor running task `id` (see
/// [`ConsumerMessage::KillTask`]), waiting at most `timeout` for its answer.
pub async fn kill_task(
    consumer: &ActorCell,
    id: &str,
    timeout: Duration,
) -> Result<KilledTask, KillTaskError> {
    let id = id.to_string();
    let asked = ractor::rpc::call(
        consumer,
        |reply| ConsumerMessage::KillTask {
            id: id.clone(),
            reply,
        },
        Some(timeout),
    )
    .await;
    match asked {
        Ok(CallResult::Success(Some(killed))) => Ok(killed),
        Ok(CallResult::Success(None)) => Err(KillTaskError::NotRunning(id)),
        Ok(CallResult::Timeout) => Err(KillTaskError::NoAnswer(timeout)),
        // The consumer stopped before answering, or the cell is another kind of actor.
        Ok(CallResult::SenderError) | Err(_) => Err(KillTaskError::NotAConsumer),
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerActor;

struct Running {
    held: Held,
    def: Arc<TaskDef>,
    slot: Slot,
    started: Instant,
    cell: ActorCell,
    /// Fires the task actor's termination (a revocation with terminate).
    revoked: CancellationToken,
}

/// An admitted delivery waiting for a free slot.
struct Waiting {
    held: Held,
    def: Arc<TaskDef>,
    slot: Slot,
}

#[derive(Debug, Default, serde::Serialize)]
struct Counters {
    started: u64,
    finished: u64,
    crashed: u64,
    deferred: u64,
    rejected: u64,
}

/// Consumer state.
pub struct ConsumerState {
    args: ConsumerArgs,
    slots: Arc<Semaphore>,
    /// Finishes this queue's deliveries (shared with its task actors).
    settler: Arc<Settler>,
    fetcher: Option<JoinHandle<()>>,
    /// Forwards the broker's revocations to the actor.
    revocations: Option<JoinHandle<()>>,
    /// Tells the fetcher to stop after its current reserve (a drain).
    stop_fetching: CancellationToken,
    running: HashMap<ActorId, Running>,
    /// Task actors whose attempt ended, recording its outcome.
    recording: HashMap<ActorId, Running>,
    /// Handed to each task actor: tells this consumer its attempt ended (`Ran`).
    ended: AttemptEnded,
    waiting: VecDeque<Waiting>,
    draining: bool,
    counters: Counters,
    gauges: Option<ConsumerSeries>,
}

impl std::fmt::Debug for ConsumerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerState")
            .field("queue", &self.args.queue)
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl Drop for ConsumerState {
    fn drop(&mut self) {
        if let Some(fetcher) = self.fetcher.take() {
            fetcher.abort();
        }
        if let Some(revocations) = self.revocations.take() {
            revocations.abort();
        }
    }
}

impl Actor for ConsumerActor {
    type Msg = ConsumerMessage;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConsumerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let slots = Arc::new(Semaphore::new(
            args.settings.concurrency.get() + args.settings.prefetch,
        ));
        let gauges = args.work.metrics.consumer(&args.queue);
        if let Some(gauges) = &gauges {
            gauges.concurrency(args.settings.concurrency.get());
            gauges.in_flight(0);
        }
        let settler = Arc::new(Settler {
            work: Arc::clone(&args.work),
            outcomes: Arc::clone(&args.outcomes),
        });
        let mut state = ConsumerState {
            gauges,
            slots,
            settler,
            fetcher: None,
            revocations: None,
            stop_fetching: CancellationToken::new(),
            running: HashMap::new(),
            recording: HashMap::new(),
            ended: {
                let consumer = myself.clone();
                // The cast fails only once the consumer has stopped (its task actors with it).
                AttemptEnded(Arc::new(move |id| {
                    let _ = consumer.cast(ConsumerMessage::Ran(id));
                }))
            },
            waiting: VecDeque::new(),
            draining: false,
            counters: Counters::default(),
            args,
        };
        // Deliveries a previous incarnation held: their task actors died with it.
        let orphans = state
            .args
            .work
            .leases
            .take(&state.args.queue, &state.args.work.consumer);
        if !orphans.is_empty() {
            info!(queue = %state.args.queue, count = orphans.len(), "adopting the deliveries of the previous incarnation");
        }
        for delivery in orphans {
            let slot = state.slots.clone().try_acquire_owned().ok();
            if slot.is_none() {
                warn!(queue = %state.args.queue, "more orphans than slots; running them anyway");
            }
            state.admit(delivery, slot).await;
        }
        state.fill(&myself).await;
        state.revocations = Some(tokio::spawn(forward_revocations(
            myself.clone(),
            state.args.work.broker.revocations(),
        )));
        state.fetcher = Some(tokio::spawn(fetch(
            myself.clone(),
            state.args.clone(),
            Arc::clone(&state.slots),
            state.stop_fetching.clone(),
        )));
        myself.send_after(SNAPSHOT_EVERY, || ConsumerMessage::Snapshot);
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConsumerMessage::Fetched(deliveries) => {
                for (delivery, slot) in deliveries {
                    state.admit(Arc::new(delivery), Some(slot)).await;
                }
                state.fill(&myself).await;
                if state.draining {
                    // Fetched just before the fetcher was stopped.
                    state.hand_back().await;
                }
            }
            ConsumerMessage::Drain => {
                state.draining = true;
                // Let a reserve in progress finish (at most `poll`), so that whatever it took
                // reaches this mailbox and is handed back too: an aborted read could leave
                // entries reserved by nobody until their lease expires.
                state.stop_fetching.cancel();
                if let Some(mut fetcher) = state.fetcher.take()
                    && tokio::time::timeout(
                        state.args.settings.poll + FETCH_STOP_MARGIN,
                        &mut fetcher,
                    )
                    .await
                    .is_err()
                {
                    fetcher.abort();
                }
                info!(queue = %state.args.queue, running = state.running.len(), waiting = state.waiting.len(), "draining: no more fetching");
                state.hand_back().await;
                state.publish();
            }
            ConsumerMessage::Ran(id) => {
                if let Some(running) = state.running.remove(&id) {
                    state.recording.insert(id, running);
                    if let Some(gauges) = &state.gauges {
                        gauges.in_flight(state.running.len());
                    }
                    state.fill(&myself).await;
                }
            }
            ConsumerMessage::Snapshot => {
                state.publish();
                myself.send_after(SNAPSHOT_EVERY, || ConsumerMessage::Snapshot);
            }
            ConsumerMessage::Revoke(revocation) => {
                state.revoke(&revocation).await;
                state.fill(&myself).await;
            }
            ConsumerMessage::KillTask { id, reply } => {
                let killed = state.kill_task(&id);
                // The asker may have given up (timeout): nothing to do about it.
                let _ = reply.send(killed);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, crash) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason)
                if reason.as_deref() == Some(DONE) =>
            {
                (cell, None)
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, Some(reason.unwrap_or_else(|| "stopped".into())))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(format!("panicked: {err}"))),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some(running) = state
            .running
            .remove(&id)
            .or_else(|| state.recording.remove(&id))
        else {
            return Ok(());
        };
        state.counters.finished += 1;
        if let Some(gauges) = &state.gauges {
            gauges.in_flight(state.running.len());
        }
        if let Some(why) = crash {
            state.counters.crashed += 1;
            let work = &state.args.work;
            let delivery = &running.held.delivery;
            // Settled already if its lease is gone (it was killed after settling).
            if work
                .leases
                .release(&delivery.queue, &work.consumer, &delivery.entry)
            {
                let span = task_span(&delivery.envelope);
                span.in_scope(|| warn!(%why, "task actor crashed; recording a retry"));
                work.leases.hold(&work.consumer, delivery);
                let ran = Some(running.started.elapsed());
                let settler = Arc::clone(&state.settler);
                // Its slot stays taken until the retry is recorded.
                let Running {
                    held, def, slot, ..
                } = running;
                tokio::spawn(
                    async move {
                        let error =
                            TaskError::retry_as(ErrorClass::Crashed, format!("task actor {why}"));
                        let end = End::Attempt {
                            def,
                            outcome: Err(error),
                            ran,
                        };
                        settler.settle(&held, end).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
        state.fill(&myself).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(fetcher) = state.fetcher.take() {
            fetcher.abort();
        }
        // Stopped before a `Drain` was handled (a stop overtakes queued messages): hand back
        // what waits here now, or it would sit reserved until its lease expires.
        if !state.draining {
            state.draining = true;
            state.hand_back().await;
        }
        let deadline = Instant::now() + state.args.drain;
        for running in state.running.values().chain(state.recording.values()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if running.cell.wait(Some(left)).await.is_err() {
                task_span(&running.held.delivery.envelope).in_scope(|| {
                    warn!("still running at the drain deadline; killed (its entry comes back through lease recovery)");
                });
                running.cell.kill();
            }
        }
        Ok(())
    }
}

impl ConsumerState {
    /// Kills the task actor running task `id`, if one runs here. Its supervision event
    /// (`"killed"`) then comes back through `handle_supervisor_evt`, which records the retry.
    fn kill_task(&self, id: &str) -> Option<KilledTask> {
        let running = self
            .running
            .values()
            .find(|r| r.held.delivery.envelope.id == id)?;
        let envelope = &running.held.delivery.envelope;
        task_span(envelope).in_scope(|| warn!("killing the task actor on request"));
        running.cell.kill();
        Some(KilledTask {
            id: envelope.id.clone(),
            task: envelope.task.clone(),
            queue: running.held.delivery.queue.clone(),
            attempt: envelope.attempt,
        })
    }

    /// Checks a delivery and queues it to run with its `slot`, or settles it at once (the
    /// slot is then freed).
    async fn admit(&mut self, delivery: Arc<Delivery>, slot: Slot) {
        let work = Arc::clone(&self.args.work);
        // An entry over the size cap (another producer wrote it; `enqueue` refuses them) is
        // not run, nor decoded further.
        if let Some(reason) = work.broker.settings().too_large(delivery.size) {
            let series = work.metrics.task(&delivery.envelope.task, &delivery.queue);
            self.end(&Held { delivery, series }, End::Rejected(reason))
                .await;
            return;
        }
        // An entry its origin wrote in its own format is decoded first; its times are then
        // checked like any entry's.
        let decoded = match work.origin_of(&delivery.envelope) {
            Some(origin) => origin.decode(&delivery.envelope),
            None => Ok(None),
        };
        let delivery = match decoded {
            Ok(None) => delivery,
            Ok(Some(envelope)) => Arc::new(Delivery {
                envelope,
                ..(*delivery).clone()
            }),
            Err(reason) => {
                let series = work.metrics.task(&delivery.envelope.task, &delivery.queue);
                self.end(&Held { delivery, series }, End::Rejected(reason))
                    .await;
                return;
            }
        };
        let envelope = &delivery.envelope;
        let series = work.metrics.task(&envelope.task, &delivery.queue);
        let Some(def) = work.tasks.get(&envelope.task).cloned() else {
            let reason = format!("no such task `{}`", envelope.task);
            self.end(&Held { delivery, series }, End::Rejected(reason))
                .await;
            return;
        };
        // Revoked (before or since it was enqueued): dead-lettered as `revoked`, unrun.
        if work.broker.is_revoked(&envelope.id) {
            self.unrun(Held { delivery, series }, def, TaskError::Revoked)
                .await;
            return;
        }
        // Its times and limits are checked before anything else happens to it: one out of
        // range is dead-lettered naming the field (`time_limit_ms: must be longer than zero`).
        let now = SystemTime::now();
        let checked = envelope.expiry().and_then(|expires| {
            envelope.limits(def.time_limit, def.soft_time_limit)?;
            Ok((expires, envelope.due(now)?))
        });
        let (expires, due) = match checked {
            Ok(checked) => checked,
            Err(err) => {
                self.end(&Held { delivery, series }, End::Rejected(err.to_string()))
                    .await;
                return;
            }
        };
        if expires.is_some_and(|at| at <= now) {
            let expires = envelope.expires.as_deref().unwrap_or_default();
            let reason = format!("expired at {expires} before it ran");
            self.end(&Held { delivery, series }, End::Rejected(reason))
                .await;
            return;
        }
        // An entry written to the stream (a bridged message, another producer) before its eta:
        // deferred to it, not run.
        if let Some(at) = due.filter(|at| *at > now) {
            let end = End::Deferred {
                at,
                cause: Deferral::Eta,
            };
            self.end(&Held { delivery, series }, end).await;
            return;
        }
        let refused = match self.args.gate.admit(&def.uses) {
            Admission::Open => None,
            Admission::ClosedUntil { resource, until } => {
                let end = End::Deferred {
                    at: until,
                    cause: Deferral::Closed(resource),
                };
                self.end(&Held { delivery, series }, end).await;
                return;
            }
            Admission::Misconfigured { resource, reason } => {
                Some(format!("resource {resource} misconfigured: {reason}"))
            }
            Admission::Unusable { resource, reason } => {
                Some(format!("resource {resource} unusable: {reason}"))
            }
        };
        if let Some(reason) = refused {
            self.unrun(Held { delivery, series }, def, TaskError::Permanent(reason))
                .await;
            return;
        }
        work.leases.hold(&work.consumer, &delivery);
        self.waiting.push_back(Waiting {
            held: Held { delivery, series },
            def,
            slot,
        });
    }

    /// Settles a delivery that does not start here (rejected, deferred, or ended unrun), in
    /// its task's span.
    async fn end(&mut self, held: &Held, end: End) {
        match end {
            End::Deferred { .. } => self.counters.deferred += 1,
            End::Rejected(_) | End::Attempt { .. } => self.counters.rejected += 1,
        }
        let span = task_span(&held.delivery.envelope);
        self.settler.settle(held, end).instrument(span).await;
    }

    /// Ends a delivery that will not run with `error` (permanent, revoked) as an attempt that
    /// never started — dead letter, record, `link_error` callbacks.
    async fn unrun(&mut self, held: Held, def: Arc<TaskDef>, error: TaskError) {
        let work = &self.args.work;
        work.leases.hold(&work.consumer, &held.delivery);
        let end = End::Attempt {
            def,
            outcome: Err(error),
            ran: None,
        };
        self.end(&held, end).await;
    }

    /// Acts on a revocation: a task waiting here is dead-lettered as revoked; a running one is
    /// terminated when asked (its task actor records it), else left to finish.
    async fn revoke(&mut self, revocation: &Revocation) {
        if let Some(at) = self
            .waiting
            .iter()
            .position(|w| w.held.delivery.envelope.id == revocation.id)
            && let Some(waiting) = self.waiting.remove(at)
        {
            task_span(&waiting.held.delivery.envelope)
                .in_scope(|| info!("revoked while waiting to start: dead-lettered"));
            // Its slot is freed when `waiting` drops, once it is settled.
            self.unrun(waiting.held, waiting.def, TaskError::Revoked)
                .await;
            return;
        }
        let Some(running) = self
            .running
            .values()
            .find(|r| r.held.delivery.envelope.id == revocation.id)
        else {
            return;
        };
        task_span(&running.held.delivery.envelope).in_scope(|| {
            if revocation.terminate {
                running.revoked.cancel();
            } else {
                info!("revoked while running: the attempt finishes (revoke with terminate to stop it); it is not retried");
            }
        });
    }

    /// Gives the broker back what waits here without having started (a node leaving
    /// cleanly), so other nodes take it at once instead of after its lease. If the broker
    /// cannot be reached, the entries stay and run here before the node stops.
    async fn hand_back(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let work = Arc::clone(&self.args.work);
        // By the stream each came from (a partitioned queue's entries are in several): each
        // stream's are handed back in one step, and dropped here once they are.
        let mut streams: Vec<String> = Vec::new();
        for w in &self.waiting {
            if !streams.contains(&w.held.delivery.queue) {
                streams.push(w.held.delivery.queue.clone());
            }
        }
        let mut handed = 0;
        for stream in streams {
            let entries: Vec<String> = (self.waiting.iter())
                .filter(|w| w.held.delivery.queue == stream)
                .map(|w| w.held.delivery.entry.clone())
                .collect();
            match work
                .broker
                .hand_back(&stream, &work.consumer, &entries)
                .await
            {
                Ok(moved) => {
                    handed += moved;
                    // Their slots are freed as they drop.
                    self.waiting.retain(|w| {
                        let delivery = &w.held.delivery;
                        if delivery.queue != stream {
                            return true;
                        }
                        work.leases
                            .release(&delivery.queue, &work.consumer, &delivery.entry);
                        false
                    });
                }
                Err(err) => {
                    warn!(queue = %self.args.queue, error = %err, waiting = self.waiting.len(),
                        "cannot hand back the waiting entries; they run here before the node stops");
                    return;
                }
            }
        }
        info!(queue = %self.args.queue, handed_back = handed, "handed back the entries reserved here but not started");
    }

    /// Starts waiting tasks while there is room.
    async fn fill(&mut self, myself: &ActorRef<ConsumerMessage>) {
        let before = self.running.len();
        while self.running.len() < self.args.settings.concurrency.get() {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            let revoked = CancellationToken::new();
            let args = TaskArgs {
                held: next.held.clone(),
                def: Arc::clone(&next.def),
                settler: Arc::clone(&self.settler),
                revoked: revoked.clone(),
                ended: self.ended.clone(),
            };
            match TaskActor::spawn_linked(None, TaskActor, args, myself.get_cell()).await {
                Ok((actor, _)) => {
                    self.counters.started += 1;
                    if let Some(series) = self.args.work.metrics.of(next.held.series) {
                        series.started();
                    }
                    let cell = actor.get_cell();
                    self.running.insert(
                        cell.get_id(),
                        Running {
                            held: next.held,
                            def: next.def,
                            slot: next.slot,
                            started: Instant::now(),
                            cell,
                            revoked,
                        },
                    );
                }
                Err(err) => {
                    // pre_start cannot fail today; keep the entry rather than lose it.
                    task_span(&next.held.delivery.envelope).in_scope(|| {
                        warn!(error = %err, "cannot start a task actor; retrying later");
                    });
                    self.waiting.push_front(next);
                    break;
                }
            }
        }
        if let Some(gauges) = &self.gauges
            && self.running.len() != before
        {
            gauges.in_flight(self.running.len());
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let running: Vec<_> = self
            .running
            .values()
            .map(|r| {
                let envelope = &r.held.delivery.envelope;
                let (hard, _) = limits(envelope, &r.def);
                json!({
                    "id": envelope.id,
                    "task": r.def.name,
                    "attempt": envelope.attempt,
                    "elapsed_ms": now.duration_since(r.started).as_millis() as u64,
                    "deadline_in_ms": (r.started + hard).saturating_duration_since(now).as_millis() as u64,
                })
            })
            .collect();
        self.args.node.publish(json!({
            "queue": self.args.queue,
            "concurrency": self.args.settings.concurrency,
            "prefetch": self.args.settings.prefetch,
            "draining": self.draining,
            "running": running,
            "recording": self.recording.len(),
            "waiting": self.waiting.len(),
            "counters": self.counters,
            "outcomes": self.args.outcomes.snapshot(),
        }));
    }
}

/// Forwards the broker's revocations to the consumer, until aborted (or the consumer is gone).
/// A consumer that lagged behind misses some: their tasks are still refused at admission.
async fn forward_revocations(
    consumer: ActorRef<ConsumerMessage>,
    mut revocations: tokio::sync::broadcast::Receiver<Revocation>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match revocations.recv().await {
            Ok(revocation) => {
                if consumer.cast(ConsumerMessage::Revoke(revocation)).is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "revocations missed by a busy consumer (their tasks are still refused when admitted)"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Reserves entries into free slots and hands them to the consumer, each with its slot,
/// until aborted.
async fn fetch(
    consumer: ActorRef<ConsumerMessage>,
    args: ConsumerArgs,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            first = Arc::clone(&slots).acquire_owned() => first,
        };
        let Ok(first) = first else {
            return;
        };
        if stop.is_cancelled() {
            return;
        }
        // Every free slot, in one permit: split per delivery below, the rest freed at once.
        let mut free = first;
        let more = u32::try_from(slots.available_permits()).unwrap_or(u32::MAX);
        if more > 0
            && let Ok(more) = Arc::clone(&slots).try_acquire_many_owned(more)
        {
            free.merge(more);
        }
        let got = args
            .work
            .broker
            .reserve(
                &args.queue,
                &args.work.consumer,
                free.num_permits(),
                args.settings.poll,
            )
            .await;
        match got {
            Ok(deliveries) => {
                if failing {
                    info!(queue = %args.queue, "reserving works again");
                    failing = false;
                    args.node.set_degraded(None);
                }
                // The slots left unfilled are freed as `free` drops.
                let fetched: Vec<_> = deliveries
                    .into_iter()
                    .map_while(|delivery| Some((delivery, free.split(1)?)))
                    .collect();
                if !fetched.is_empty() && consumer.cast(ConsumerMessage::Fetched(fetched)).is_err()
                {
                    return;
                }
            }
            Err(err) => {
                drop(free);
                if !failing {
                    warn!(queue = %args.queue, error = %err, "reserve failed; retrying");
                    failing = true;
                    args.node
                        .set_degraded(Some(format!("cannot reserve: {err}")));
                }
                tokio::time::sleep(FETCH_RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
