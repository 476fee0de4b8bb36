//! `TaskActor`: one running task — a temporary child of its queue's consumer.
//!
//! It runs one attempt of the handler under the task's limits, has it settled
//! ([`settle`]: ack + `link` callbacks, a delayed retry, or a dead letter + `link_error`
//! callbacks; the lease released) and stops with the reason `"done"`. Any other exit (a panic
//! in a native handler, a kill) leaves the outcome to the consumer, which settles a retry.
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

pub mod settle;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::broker::{Envelope, TaskQueue};
use crate::handler::{TaskContext, TaskDef, TaskError};
pub(crate) use settle::{Deferral, End, Held};
pub use settle::{Origin, Outcomes, Settled, Settler, Work};

/// The exit reason of a task actor that settled its delivery.
pub const DONE: &str = "done";

/// Spawn arguments.
#[derive(Debug)]
pub struct TaskArgs {
    /// The entry being run and its metrics series.
    pub(crate) held: Held,
    /// Its definition.
    pub def: Arc<TaskDef>,
    /// Settles it (the queue's settler).
    pub settler: Arc<Settler>,
    /// Fired by the consumer when the task is revoked with terminate.
    pub revoked: CancellationToken,
    /// Called with the task actor's id when the attempt has ended, before its outcome is
    /// recorded (the consumer then starts the next waiting task meanwhile).
    pub ended: AttemptEnded,
}

/// What a task actor calls when its attempt has ended, before its outcome is recorded.
#[derive(Clone)]
pub struct AttemptEnded(pub Arc<dyn Fn(ActorId) + Send + Sync>);

impl std::fmt::Debug for AttemptEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttemptEnded")
    }
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
        let work = &args.settler.work;
        let envelope = &args.held.delivery.envelope;
        work.broker.started(&args.held.delivery, &work.consumer);
        let span = task_span(envelope);
        // The origin's start (a bridge's STARTED state) is written while the handler already runs,
        // and before the outcome.
        let published = work
            .origin_of(envelope)
            .and_then(|origin| origin.started(envelope))
            .map(|started| tokio::spawn(started.instrument(span.clone())));
        if let Some(wait) = envelope.first_wait(SystemTime::now()) {
            args.settler.outcomes.waited(wait);
            if let Some(series) = work.metrics.of(args.held.series) {
                series.waited(wait);
            }
        }
        async {
            let began = Instant::now();
            let outcome = attempt(args).await;
            let ran = Some(began.elapsed());
            (args.ended.0)(myself.get_id());
            if let Some(published) = published {
                let _ = published.await;
            }
            let def = Arc::clone(&args.def);
            (args.settler)
                .settle(&args.held, End::Attempt { def, outcome, ran })
                .await;
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
    let envelope = &args.held.delivery.envelope;
    let terminate_grace = args.settler.work.terminate_grace;
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
                let stop = (Instant::now() + terminate_grace).min(deadline);
                info!(grace = ?terminate_grace, "revoked: terminating (soft signal now, hard stop after the grace)");
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
