//! The one place a delivery is finished: `Settler::settle`. Every way a delivery ends on
//! this node goes through it — an attempt that ran (or crashed, or was never started:
//! revoked, a resource unusable), an entry that cannot run (too large, unknown task, bad
//! times, expired, undecodable), a deferral (its `eta`, a closed resource) — so ack, retry,
//! dead letter, callbacks (`link`, `link_error`), the [`Origin`] hook, lease release,
//! metrics and the queue's outcome counters are written once, here.
//!
//! The concurrency slot is not handled here: the consumer keeps it beside the delivery
//! (an owned semaphore permit) and it is freed when that entry is dropped, after settling.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::broker::{AnyBroker, BrokerError, Callback, Delivery, Envelope, Leases, TaskQueue};
use crate::caps;
use crate::handler::{TaskDef, TaskDefs, TaskError};
use crate::history::{Timings, Totals};
use crate::metrics::{DeadReason, Metrics, SeriesId};

/// How often recording an outcome is tried before it is left to lease recovery.
const RECORD_TRIES: u32 = 5;

/// A boxed future, as [`Origin`]'s methods return them (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A foreign producer whose entries carry their own format and want their own bookkeeping
/// (a bridge from another task system: raw messages to decode, its own result keys to
/// write, its own callbacks to send). The consumer and the settler call it only for envelopes it
/// [`owns`](Origin::owns); everything else is the core's.
pub trait Origin: Send + Sync + fmt::Debug {
    /// Whether `envelope` came through this origin. Asked for every delivery at admission,
    /// start and settlement: keep it to a field lookup.
    fn owns(&self, envelope: &Envelope) -> bool;

    /// Turns an entry written in the origin's own format into a runtime envelope, before
    /// admission checks its task, times and limits. `Ok(None)`: nothing to decode;
    /// `Err(reason)`: it cannot run and is dead-lettered with `reason`.
    fn decode(&self, envelope: &Envelope) -> Result<Option<Envelope>, String>;

    /// Work to do while the attempt runs (a bridge's `STARTED` state); awaited before the outcome is
    /// recorded, so it is written first.
    fn started(&self, envelope: &Envelope) -> Option<BoxFuture<'static, ()>>;

    /// Called before the runtime records how the delivery ended (a crash in between re-runs
    /// the task, and this is called again). An error fails that recording, which is retried
    /// — except for [`Settled::Rejected`], where it is only logged.
    fn settled<'a>(
        &'a self,
        broker: &'a AnyBroker,
        envelope: &'a Envelope,
        settled: Settled<'a>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
}

/// How a delivery ended, as an [`Origin`] is told.
#[derive(Debug)]
pub enum Settled<'a> {
    /// Succeeded with this value.
    Succeeded(&'a Value),
    /// Failed; another attempt is scheduled.
    Retrying(&'a TaskError),
    /// Failed for good (`error` is the handler's error, or why it never started).
    Failed {
        error: Option<&'a TaskError>,
        /// Why it is dead.
        reason: &'a str,
    },
    /// It could not run at all (undecodable, too large, unknown task, expired): dead-lettered
    /// with this reason.
    Rejected(&'a str),
}

/// What a consumer shares with its task actors.
#[derive(Debug)]
pub struct Work {
    pub broker: Arc<AnyBroker>,
    /// This node's leases.
    pub leases: Arc<Leases>,
    /// Every task definition (callbacks route by them).
    pub tasks: Arc<TaskDefs>,
    /// This node's consumer name.
    pub consumer: String,
    /// The hook of a foreign producer (a bridge), if any.
    pub origin: Option<Arc<dyn Origin>>,
    /// The node's metrics (task lifecycle, in-flight gauges).
    pub metrics: Arc<Metrics>,
    /// How long a task revoked with terminate has, after its soft signal, before its attempt
    /// is stopped (`runtime.terminate_grace`).
    pub terminate_grace: Duration,
}

impl Work {
    /// The origin owning `envelope`, if any.
    pub(crate) fn origin_of(&self, envelope: &Envelope) -> Option<&dyn Origin> {
        self.origin
            .as_deref()
            .filter(|origin| origin.owns(envelope))
    }
}

/// Outcomes recorded for one queue on this node since it started: made by the node, shared by
/// every incarnation of the queue's consumer and its task actors. Beside the counts, the wait
/// of first attempts and the run time of attempts ([`Timings`]), which the node's
/// [`History`](crate::history::History) samples.
#[derive(Debug, Default)]
pub struct Outcomes {
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    waits: Timings,
    runs: Timings,
}

impl Outcomes {
    fn count(&self, recorded: Recorded) {
        let counter = match recorded {
            Recorded::Succeeded => &self.succeeded,
            Recorded::Retried => &self.retried,
            Recorded::Dead => &self.dead,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A first attempt started after waiting `wait`.
    pub(crate) fn waited(&self, wait: Duration) {
        self.waits.observe(wait);
    }

    /// The running totals, for the node's history.
    pub fn totals(&self) -> Totals {
        Totals {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            waits: self.waits.totals(),
            runs: self.runs.totals(),
        }
    }

    /// `{"succeeded", "retried", "dead"}`: attempts that succeeded, attempts that failed and
    /// were retried, tasks dead-lettered (after running, or unrunnable: unknown, expired).
    pub fn snapshot(&self) -> serde_json::Value {
        json!({
            "succeeded": self.succeeded.load(Ordering::Relaxed),
            "retried": self.retried.load(Ordering::Relaxed),
            "dead": self.dead.load(Ordering::Relaxed),
        })
    }
}

/// What a recorded outcome was, for the queue's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recorded {
    Succeeded,
    Retried,
    Dead,
}

/// A delivery this node took, as settling it needs it.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub delivery: Arc<Delivery>,
    /// Its metrics series (`None` when metrics are off).
    pub series: Option<SeriesId>,
}

/// How a delivery ends.
#[derive(Debug)]
pub(crate) enum End {
    /// Through the task's retry policy: ack + `link`, a delayed retry, or a dead letter +
    /// `link_error`. `ran` is how long the attempt ran (`None`: it never started — revoked
    /// before its start, a resource it uses unusable). The lease must be held.
    Attempt {
        def: Arc<TaskDef>,
        outcome: Result<Value, TaskError>,
        ran: Option<Duration>,
    },
    /// It cannot run: dead-lettered with this reason, no callbacks.
    Rejected(String),
    /// Put back until `at` without spending an attempt.
    Deferred { at: SystemTime, cause: Deferral },
}

/// Why a delivery is deferred.
#[derive(Debug)]
pub(crate) enum Deferral {
    /// An entry written to the stream directly before its `eta`.
    Eta,
    /// A resource it uses is closed (counted in `rt_tasks_deferred_total`).
    Closed(String),
}

/// Finishes deliveries for one queue on this node (shared by its consumer and task actors).
#[derive(Debug)]
pub struct Settler {
    /// The node's shared parts.
    pub work: Arc<Work>,
    /// The queue's outcome counters.
    pub outcomes: Arc<Outcomes>,
}

impl Settler {
    /// Finishes `held` as `end` says. Call it inside the task's
    /// [`task_span`](crate::task::task_span).
    pub(crate) async fn settle(&self, held: &Held, end: End) {
        match end {
            End::Attempt { def, outcome, ran } => self.record(held, &def, outcome, ran).await,
            End::Rejected(reason) => self.reject(held, &reason).await,
            End::Deferred { at, cause } => self.defer(held, at, cause).await,
        }
    }

    /// Records an attempt's outcome with the broker (retrying a few times if the broker
    /// fails), counts it and releases the lease.
    async fn record(
        &self,
        held: &Held,
        def: &TaskDef,
        outcome: Result<Value, TaskError>,
        ran: Option<Duration>,
    ) {
        let work = &self.work;
        let delivery = &held.delivery;
        let series = work.metrics.of(held.series);
        if let Some(took) = ran {
            self.outcomes.runs.observe(took);
            if let Some(series) = series {
                series.ran(took, outcome.is_err());
            }
        }
        for n in 1..=RECORD_TRIES {
            match record_once(work, delivery, def, &outcome).await {
                Ok(recorded) => {
                    self.outcomes.count(recorded);
                    if let Some(series) = series {
                        match recorded {
                            Recorded::Succeeded => series.succeeded(),
                            Recorded::Retried => {
                                if let Err(err) = &outcome {
                                    series.retried(err.class());
                                }
                            }
                            Recorded::Dead if ran.is_some() => {
                                series.dead_lettered(DeadReason::Failed)
                            }
                            Recorded::Dead => series.dead_lettered(DeadReason::Rejected),
                        }
                    }
                    break;
                }
                Err(err) if n < RECORD_TRIES => {
                    warn!(error = %err, "recording the outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(n))).await;
                }
                Err(err) => {
                    warn!(error = %err,
                        "recording the outcome failed; the entry comes back through lease recovery");
                }
            }
        }
        work.leases
            .release(&delivery.queue, &work.consumer, &delivery.entry);
    }

    /// Dead-letters a delivery that cannot run (its origin, if any, is told first).
    async fn reject(&self, held: &Held, reason: &str) {
        let work = &self.work;
        let delivery = &held.delivery;
        if let Some(origin) = work.origin_of(&delivery.envelope)
            && let Err(err) = origin
                .settled(&work.broker, &delivery.envelope, Settled::Rejected(reason))
                .await
        {
            warn!(error = %err, "the origin's result for the rejected task not written");
        }
        warn!(%reason, "dead-lettered without running");
        match work.broker.dead_letter(delivery, reason).await {
            Ok(()) => {
                self.outcomes.count(Recorded::Dead);
                if let Some(series) = work.metrics.of(held.series) {
                    series.dead_lettered(DeadReason::Rejected);
                }
            }
            Err(err) => {
                warn!(error = %err, "dead-lettering failed; the entry comes back through lease recovery");
            }
        }
    }

    /// Puts a delivery back until `at` (no attempt spent).
    async fn defer(&self, held: &Held, at: SystemTime, cause: Deferral) {
        let work = &self.work;
        let reason = match &cause {
            Deferral::Eta => "eta".to_string(),
            Deferral::Closed(resource) => format!("resource {resource} closed"),
        };
        match work.broker.defer(&held.delivery, at, &reason).await {
            Ok(()) => {
                if let (Deferral::Closed(_), Some(series)) = (&cause, work.metrics.of(held.series))
                {
                    series.deferred();
                }
            }
            Err(err) => match cause {
                Deferral::Eta => warn!(error = %err,
                    "deferral to the eta failed; the entry comes back through lease recovery"),
                Deferral::Closed(_) => warn!(error = %err,
                    "deferral failed; the entry comes back through lease recovery"),
            },
        }
    }
}

async fn record_once(
    work: &Work,
    delivery: &Delivery,
    def: &TaskDef,
    outcome: &Result<Value, TaskError>,
) -> Result<Recorded, BrokerError> {
    let envelope = &delivery.envelope;
    // An origin's own result is written before the runtime records the outcome (a crash in
    // between re-runs the task and writes it again, never loses it).
    let origin = work.origin_of(envelope);
    let recorded = match outcome {
        Ok(value) => {
            if let Some(origin) = origin {
                origin
                    .settled(&work.broker, envelope, Settled::Succeeded(value))
                    .await?;
            }
            if def.store_result {
                work.broker.ack(delivery, value.clone()).await?;
            } else {
                work.broker.ack_unrecorded(delivery).await?;
            }
            let callbacks = callbacks(work, envelope, &def.link, &envelope.link, value.clone());
            enqueue_callbacks(work, callbacks).await?;
            Recorded::Succeeded
        }
        Err(err) => match def.retry.next_delay(envelope.attempt, err) {
            Some(delay) => {
                // At the default level: a retry is the first sign of a failing dependency.
                // The span names the task, its id and the attempt that failed.
                let shown = Duration::from_millis(delay.as_millis().try_into().unwrap_or(u64::MAX));
                info!(
                    delay = %humantime::format_duration(shown),
                    reason = %err,
                    "retry scheduled"
                );
                if let Some(origin) = origin {
                    origin
                        .settled(&work.broker, envelope, Settled::Retrying(err))
                        .await?;
                }
                let at = caps::due_after(SystemTime::now(), delay);
                work.broker.retry(delivery, at, &err.to_string()).await?;
                Recorded::Retried
            }
            None => {
                let reason = if matches!(err, TaskError::Revoked) {
                    crate::broker::REVOKED.to_string()
                } else if def.retry.retries(err) {
                    format!(
                        "retries exhausted after {} attempts: {err}",
                        envelope.attempt.saturating_add(1)
                    )
                } else if matches!(err, TaskError::Timeout(_)) {
                    format!("not retried (retry_on_timeout = false): {err}")
                } else {
                    format!("permanent: {err}")
                };
                warn!(%reason, "dead-lettered");
                if let Some(origin) = origin {
                    let settled = Settled::Failed {
                        error: Some(err),
                        reason: &reason,
                    };
                    origin.settled(&work.broker, envelope, settled).await?;
                }
                work.broker.dead_letter(delivery, &reason).await?;
                let failure = json!({
                    "id": envelope.id, "task": envelope.task,
                    "error": reason, "attempts": envelope.attempt.saturating_add(1),
                });
                let callbacks = callbacks(
                    work,
                    envelope,
                    &def.link_error,
                    &envelope.link_error,
                    failure,
                );
                enqueue_callbacks(work, callbacks).await?;
                Recorded::Dead
            }
        },
    };
    Ok(recorded)
}

/// Enqueues callbacks (each counted once: a repeated recording finds their idempotency keys
/// taken). A callback over the broker's `max_entry_bytes` (a large result as its first
/// argument) can never be enqueued: it is left out with a warning naming its size and the
/// limit, and the others go in — retrying the recording, or re-running the task through lease
/// recovery, would only fail the same way.
async fn enqueue_callbacks(work: &Work, mut callbacks: Vec<Envelope>) -> Result<(), BrokerError> {
    while !callbacks.is_empty() {
        let counting = work.metrics.enqueuing(&callbacks);
        match work.broker.enqueue(callbacks.clone()).await {
            Ok(answers) => {
                counting.done(&answers);
                return Ok(());
            }
            Err(err @ BrokerError::TooLarge { index, .. }) => {
                let callback = callbacks.remove(index);
                warn!(error = %err, callback = %callback.task, "callback not enqueued");
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The envelopes of a task's callbacks (configured names, then the envelope's own), each
/// with `value` (the result, or the failure) as its first argument.
fn callbacks(
    work: &Work,
    parent: &Envelope,
    configured: &[String],
    own: &[Callback],
    value: Value,
) -> Vec<Envelope> {
    let configured = configured.iter().map(|task| Callback {
        task: task.clone(),
        queue: None,
        args: Vec::new(),
        kwargs: Default::default(),
    });
    configured
        .chain(own.iter().cloned())
        .filter_map(|callback| {
            let queue = callback
                .queue
                .clone()
                .or_else(|| work.tasks.queue_of(&callback.task).map(str::to_string))?;
            let mut envelope = Envelope::new(callback.task, queue);
            envelope.args = std::iter::once(value.clone())
                .chain(callback.args)
                .collect();
            envelope.kwargs = callback.kwargs;
            envelope.parent_id = Some(parent.id.clone());
            envelope.root_id = Some(parent.root_id.clone().unwrap_or_else(|| parent.id.clone()));
            envelope.trace_id = Some(parent.trace().to_string());
            // One callback per parent outcome, even if recording is retried.
            envelope.idempotency_key = Some(format!(
                "cb:{}:{}:{}",
                parent.id, parent.attempt, envelope.task
            ));
            Some(envelope)
        })
        .collect()
}
