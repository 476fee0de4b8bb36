//! `TaskActor`: one running task — a temporary child of its queue's consumer.
//!
//! It runs one attempt of the handler under the task's limits, records the outcome with the
//! broker itself (ack + `link` callbacks, a delayed retry, or a dead letter + `link_error`
//! callbacks), releases its lease and stops with the reason `"done"`. Any other exit (a panic
//! in a native handler, a kill) leaves the outcome to the consumer, which records a retry.
//!
//! Limits: the soft limit fires the attempt's cancellation token (`exec` turns it into SIGTERM
//! to the process group, `http` sent the deadline in a header); at the hard limit the attempt
//! is dropped — the HTTP request aborted, the process group SIGKILLed and reaped — and counts
//! as a retryable failure.
//!
//! Revoked with terminate ([`TaskArgs::revoked`] fires, the consumer's doing): the same two
//! steps — the soft signal at once, the hard stop `terminate_grace` later (or at the hard
//! limit, if sooner) unless the handler returned first — and the attempt is recorded as
//! revoked ([`TaskError::Revoked`]: dead-lettered with the reason `revoked`, `link_error`
//! run, never retried) whatever the handler returned.
//!
//! Logs: the attempt and its recording run inside the [`task_span`] (`task_id`, `task`,
//! `queue`, `attempt`, `trace_id`), so every line logged on their behalf — by the handler, a
//! native function, the drained output of an `exec` command — carries those fields.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::broker::{Callback, Delivery, Envelope, TaskQueue};
use crate::caps;
use crate::celery::{ORIGIN_FIELD, Settled};
use crate::consumer::{Outcomes, Work};
use crate::handler::{TaskContext, TaskDef, TaskError};
use crate::metrics::{DeadReason, SeriesId};

/// The exit reason of a task actor that recorded its outcome.
pub const DONE: &str = "done";

/// How often recording an outcome is tried before it is left to lease recovery.
const RECORD_TRIES: u32 = 5;

/// Spawn arguments.
#[derive(Debug)]
pub struct TaskArgs {
    /// The entry being run.
    pub delivery: Arc<Delivery>,
    /// Its definition.
    pub def: Arc<TaskDef>,
    /// What the consumer shares with its tasks.
    pub work: Arc<Work>,
    /// Where the recorded outcome is counted (the queue's counters on this node).
    pub outcomes: Arc<Outcomes>,
    /// Its metrics series (`None` when metrics are off).
    pub series: Option<SeriesId>,
    /// Fired by the consumer when the task is revoked with terminate.
    pub revoked: CancellationToken,
}

/// The span every log line about one attempt of a task runs in: `task_id`, `task`, `queue`,
/// `attempt` and `trace_id` (the envelope's, else its `root_id`, else its id — stable across
/// retries and shared with its callbacks).
pub fn task_span(envelope: &Envelope) -> Span {
    info_span!(
        "task",
        task_id = %envelope.id,
        task = %envelope.task,
        queue = %envelope.queue,
        attempt = envelope.attempt,
        trace_id = %envelope.trace(),
    )
}

/// The task actor (it has no messages: it runs once and stops).
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskActor;

impl Actor for TaskActor {
    type Msg = ();
    type State = TaskArgs;
    type Arguments = TaskArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        args: TaskArgs,
    ) -> Result<TaskArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<()>,
        args: &mut TaskArgs,
    ) -> Result<(), ActorProcessingErr> {
        // The `started` event costs no round trip of its own: it travels with the outcome
        // (written ahead of it, so the stream keeps the order), or is flushed within
        // EVENT_FLUSH while the task still runs.
        let envelope = &args.delivery.envelope;
        args.work.broker.started(envelope, &args.work.consumer);
        let span = task_span(envelope);
        // Celery's STARTED state is written while the handler already runs, and before the
        // outcome's result.
        let published = args
            .work
            .celery
            .clone()
            .filter(|_| envelope.extra.contains_key(ORIGIN_FIELD))
            .map(|celery| {
                let envelope = envelope.clone();
                tokio::spawn(
                    async move {
                        if let Err(err) = celery.started(&envelope).await {
                            debug!(error = %err, "celery STARTED state not written");
                        }
                    }
                    .instrument(span.clone()),
                )
            });
        if let Some(wait) = envelope.first_wait(SystemTime::now()) {
            args.outcomes.waited(wait);
            if let Some(series) = args.work.metrics.of(args.series) {
                series.waited(wait);
            }
        }
        async {
            let began = Instant::now();
            let outcome = attempt(args).await;
            let took = began.elapsed();
            if let Some(published) = published {
                let _ = published.await;
            }
            record(args, outcome, Some(took)).await;
        }
        .instrument(span)
        .await;
        myself.stop(Some(DONE.to_string()));
        Ok(())
    }
}

/// The limits of one attempt: the envelope's overrides, else the definition's
/// ([`Envelope::limits`]). The consumer dead-letters an entry whose overrides are out of range
/// before it gets here, so the definition's limits stand in only for such an entry met
/// outside a consumer.
pub fn limits(envelope: &Envelope, def: &TaskDef) -> (Duration, Option<Duration>) {
    envelope
        .limits(def.time_limit, def.soft_time_limit)
        .unwrap_or((def.time_limit, def.soft_time_limit))
}

async fn attempt(args: &TaskArgs) -> Result<Value, TaskError> {
    let envelope = &args.delivery.envelope;
    let (hard, soft) = limits(envelope, &args.def);
    let started = Instant::now();
    let deadline = started + hard;
    let soft_deadline = soft.map(|soft| started + soft);
    let token = CancellationToken::new();
    let ctx = TaskContext {
        envelope: Arc::new(envelope.clone()),
        soft: token.clone(),
        soft_deadline,
        deadline,
    };
    let run = args.def.handler.call(ctx);
    tokio::pin!(run);
    let soft_timer = tokio::time::sleep_until(soft_deadline.unwrap_or(deadline));
    tokio::pin!(soft_timer);
    let mut softened = soft_deadline.is_none();
    // Set once revoked with terminate: the hard stop comes `terminate_grace` later (`grace`).
    let mut terminating = false;
    let grace = tokio::time::sleep_until(deadline);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            result = &mut run => {
                return if terminating { Err(TaskError::Revoked) } else { result };
            }
            () = args.revoked.cancelled(), if !terminating => {
                let stop = (Instant::now() + args.work.terminate_grace).min(deadline);
                info!(grace = ?args.work.terminate_grace, "revoked: terminating (soft signal now, hard stop after the grace)");
                terminating = true;
                grace.as_mut().reset(stop);
                token.cancel();
            }
            () = &mut soft_timer, if !softened => {
                softened = true;
                debug!(?soft, "soft time limit");
                token.cancel();
            }
            () = &mut grace, if terminating => {
                warn!("revoked: still running after the grace; attempt stopped");
                return Err(TaskError::Revoked);
            }
            () = tokio::time::sleep_until(deadline), if !terminating => {
                warn!(?hard, "hard time limit: attempt stopped");
                return Err(TaskError::Timeout(hard));
            }
        }
    }
}

/// Records `outcome` with the broker (retrying a few times if the broker fails), counts it
/// and releases the lease. `ran` is how long the attempt ran (`None`: it never started, e.g. a
/// resource it uses is unusable). Call it inside the task's [`task_span`].
pub(crate) async fn record(
    args: &TaskArgs,
    outcome: Result<Value, TaskError>,
    ran: Option<Duration>,
) {
    let work = &args.work;
    let delivery = &args.delivery;
    let series = work.metrics.of(args.series);
    if let Some(took) = ran {
        args.outcomes.ran(took);
        if let Some(series) = series {
            series.ran(took, outcome.is_err());
        }
    }
    for n in 1..=RECORD_TRIES {
        match record_once(work, delivery, &args.def, &outcome).await {
            Ok(recorded) => {
                args.outcomes.count(recorded);
                if let Some(series) = series {
                    match recorded {
                        Recorded::Succeeded => series.succeeded(),
                        Recorded::Retried => {
                            if let Err(err) = &outcome {
                                series.retried(err.class());
                            }
                        }
                        Recorded::Dead if ran.is_some() => series.dead_lettered(DeadReason::Failed),
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

/// What a recorded outcome was, for the queue's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Acked with its result.
    Succeeded,
    /// Failed; the next attempt is scheduled.
    Retried,
    /// Failed for good; dead-lettered.
    Dead,
}

async fn record_once(
    work: &Work,
    delivery: &Delivery,
    def: &TaskDef,
    outcome: &Result<Value, TaskError>,
) -> Result<Recorded, crate::broker::BrokerError> {
    let envelope = &delivery.envelope;
    // A Celery-origin task's result is written in Celery's format before the runtime records
    // it (a crash in between re-runs the task and writes it again, never loses it).
    let celery = work
        .celery
        .as_ref()
        .filter(|_| envelope.extra.contains_key(ORIGIN_FIELD));
    let recorded = match outcome {
        Ok(value) => {
            if let Some(celery) = celery {
                celery
                    .settled(work, envelope, Settled::Succeeded(value))
                    .await?;
            }
            work.broker.ack(delivery, value.clone()).await?;
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
                if let Some(celery) = celery {
                    celery
                        .settled(work, envelope, Settled::Retrying(err))
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
                if let Some(celery) = celery {
                    let settled = Settled::Failed {
                        error: Some(err),
                        reason: &reason,
                    };
                    celery.settled(work, envelope, settled).await?;
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
async fn enqueue_callbacks(
    work: &Work,
    mut callbacks: Vec<Envelope>,
) -> Result<(), crate::broker::BrokerError> {
    while !callbacks.is_empty() {
        let counting = work.metrics.enqueuing(&callbacks);
        match work.broker.enqueue(callbacks.clone()).await {
            Ok(answers) => {
                counting.done(&answers);
                return Ok(());
            }
            Err(err @ crate::broker::BrokerError::TooLarge { index, .. }) => {
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
