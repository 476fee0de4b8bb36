//! What each outcome of a delivery writes, decided once for both backends: the entry's next
//! place, the change of the task's record, and the event. `memory://` applies a [`Writes`] to
//! its maps under one lock; Redis turns it into the commands of one `commit.lua` call. Either
//! way the entry is released (acked and deleted) with it.
//!
//! | outcome | next place | record | event |
//! |---|---|---|---|
//! | ack | gone | `succeeded`, result, attempts = attempt + 1, kept `result_ttl` | `succeeded` `{attempt, error: null}` |
//! | retry | delayed at `at`, attempt + 1 | `retrying`, error, attempts = attempt + 1, due | `retried` `{attempt, error}` |
//! | defer | delayed at `at`, attempt unchanged | `scheduled`, due, attempt lost | `deferred` `{reason, until}` |
//! | dead letter | dead letters (attempts = attempt + 1) | `dead`, error, kept `result_ttl` | `dead` `{attempt, error}` |

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Value, json};

use super::{Envelope, Event, EventKind, StoredRecord, TaskState, Timestamp, due_ms, rfc3339};

/// How a delivery ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outcome<'a> {
    /// The handler succeeded with this result.
    Succeeded(&'a Value),
    /// The attempt failed; the next one runs at `at`.
    Retried { at: SystemTime, error: &'a str },
    /// The task did not run (a resource it needs is closed); it is due again at `at`.
    Deferred { at: SystemTime, reason: &'a str },
    /// Failed for good, with this reason.
    Dead(&'a str),
}

/// Where the entry goes once released.
#[derive(Debug)]
pub(crate) enum Next {
    /// Nowhere: the task is done.
    Gone,
    /// To the delayed set, due at `due_ms` (the score), as the envelope JSON `json`.
    Delayed { due_ms: u64, json: String },
    /// To the dead letters, with its reason and the attempts made.
    Dead { reason: String, attempts: u32 },
}

/// The change an outcome makes to the task's record.
#[derive(Debug)]
pub(crate) struct RecordChange<'a> {
    pub(crate) state: TaskState,
    /// The attempt's verdict, result and error (each clears the other); `None` (a deferral)
    /// leaves both as they were.
    pub(crate) verdict: Option<(Option<&'a Value>, Option<&'a str>)>,
    /// Attempts that ran to an outcome of their own: set by an ack and a retry; a dead letter
    /// leaves it (the entry may never have run: its start marker counts it).
    pub(crate) attempts: Option<u32>,
    /// Due time of a retry or a deferral (cleared otherwise).
    pub(crate) due_ms: Option<u64>,
    /// The running attempt is over without an outcome (a deferral).
    pub(crate) lost: bool,
}

impl RecordChange<'_> {
    /// Whether the task ended: its record then lives `result_ttl`, else while its entry does.
    pub(crate) fn ends(&self) -> bool {
        self.state.is_final()
    }

    /// Applies the change to a record (`memory://`; Redis writes the same fields).
    pub(crate) fn apply(&self, record: &mut StoredRecord, at: &str) {
        record.state = Some(self.state);
        if let Some((result, error)) = self.verdict {
            record.result = result.cloned();
            record.error = error.map(str::to_string);
        }
        if let Some(attempts) = self.attempts {
            record.attempts = attempts;
        }
        record.due_ms = self.due_ms;
        if self.lost {
            record.lost = true;
        }
        at.clone_into(&mut record.updated_at);
    }
}

/// Everything an outcome writes besides releasing its entry.
#[derive(Debug)]
pub(crate) struct Writes<'a> {
    pub(crate) next: Next,
    pub(crate) record: RecordChange<'a>,
    pub(crate) event: Event,
}

impl<'a> Outcome<'a> {
    /// What this outcome of `envelope`'s attempt writes, at `at` (RFC 3339).
    pub(crate) fn writes(self, envelope: &Envelope, at: &str) -> Writes<'a> {
        let attempt = envelope.attempt;
        let ran = Some(attempt.saturating_add(1));
        let (next, record, kind, detail) = match self {
            Outcome::Succeeded(result) => (
                Next::Gone,
                RecordChange {
                    state: TaskState::Succeeded,
                    verdict: Some((Some(result), None)),
                    attempts: ran,
                    due_ms: None,
                    lost: false,
                },
                EventKind::Succeeded,
                json!({ "attempt": attempt, "error": null }),
            ),
            Outcome::Retried { at: when, error } => {
                let mut next = envelope.clone();
                next.attempt = attempt.saturating_add(1);
                let due = due_ms(when);
                (
                    Next::Delayed {
                        due_ms: due,
                        json: next.to_json(),
                    },
                    RecordChange {
                        state: TaskState::Retrying,
                        verdict: Some((None, Some(error))),
                        attempts: ran,
                        due_ms: Some(due),
                        lost: false,
                    },
                    EventKind::Retried,
                    json!({ "attempt": attempt, "error": error }),
                )
            }
            Outcome::Deferred { at: when, reason } => {
                let due = due_ms(when);
                (
                    Next::Delayed {
                        due_ms: due,
                        json: envelope.to_json(),
                    },
                    RecordChange {
                        state: TaskState::Scheduled,
                        verdict: None,
                        attempts: None,
                        due_ms: Some(due),
                        lost: true,
                    },
                    EventKind::Deferred,
                    json!({ "reason": reason, "until": rfc3339(when) }),
                )
            }
            Outcome::Dead(reason) => (
                Next::Dead {
                    reason: reason.to_string(),
                    attempts: attempt.saturating_add(1),
                },
                RecordChange {
                    state: TaskState::Dead,
                    verdict: Some((None, Some(reason))),
                    attempts: None,
                    due_ms: None,
                    lost: false,
                },
                EventKind::Dead,
                json!({ "attempt": attempt, "error": reason }),
            ),
        };
        let mut event = Event::about(kind, envelope, detail);
        at.clone_into(&mut event.at);
        Writes {
            next,
            record,
            event,
        }
    }
}

/// The `detail` of a `sent` event, written by both backends: the eta, and the trace the task
/// belongs to (`trace_id`, and `parent_id` for a callback or a sub-task) — what lets the live
/// page list the tasks of one trace from the events stream (`GET /tasks?trace=`).
#[derive(Debug, Serialize)]
struct SentDetail<'a> {
    eta: &'a Option<Timestamp>,
    trace_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: &'a Option<String>,
}

impl<'a> SentDetail<'a> {
    fn of(envelope: &'a Envelope) -> Self {
        Self {
            eta: &envelope.eta,
            trace_id: &envelope.trace_id,
            parent_id: &envelope.parent_id,
        }
    }
}

/// The `detail` of `envelope`'s `sent` event ([`SentDetail`]): the one encoding both backends
/// write (`memory://` in [`sent_event`], Redis in its enqueue pipeline and as `enqueue.lua`'s
/// argument).
pub(crate) fn sent_detail(envelope: &Envelope) -> Value {
    serde_json::to_value(SentDetail::of(envelope)).unwrap_or(Value::Null)
}

/// The `sent` event of an enqueued `envelope`, at `at` (RFC 3339). Its record is
/// [`StoredRecord::enqueued`].
pub(crate) fn sent_event(envelope: &Envelope, at: &str) -> Event {
    Event {
        id: String::new(),
        kind: EventKind::Sent,
        at: at.to_string(),
        task_id: Some(envelope.id.clone()),
        task: Some(envelope.task.clone()),
        queue: Some(envelope.queue.clone()),
        detail: sent_detail(envelope),
    }
}

/// The `started` event of an attempt of `envelope` on `consumer` (it travels with the record's
/// start marker: [`TaskQueue::started`](super::TaskQueue::started)).
pub(crate) fn started_event(envelope: &Envelope, consumer: &str) -> Event {
    let detail = json!({ "attempt": envelope.attempt, "consumer": consumer });
    Event::about(EventKind::Started, envelope, detail)
}

/// The event of an entry a recovery sweep moved, at `at`: `recovered` (ready again) or, when
/// `poisoned` (`max_deliveries` reached), `dead`; about its envelope, or only its queue when the
/// entry is not a valid envelope.
pub(crate) fn recovery_event(
    poisoned: bool,
    envelope: Option<&Envelope>,
    queue: &str,
    deliveries: u64,
    consumer: &str,
    at: &str,
) -> Event {
    let kind = if poisoned {
        EventKind::Dead
    } else {
        EventKind::Recovered
    };
    let detail = json!({ "deliveries": deliveries, "consumer": consumer });
    let mut event = match envelope {
        Some(envelope) => Event::about(kind, envelope, detail),
        None => {
            let mut event = Event::new(kind, detail);
            event.queue = Some(queue.to_string());
            event
        }
    };
    at.clone_into(&mut event.at);
    event
}

/// The `dead` event of a malformed entry met by `reserve`, at `at`: about its queue (it names
/// no task), with the reason and the entry id.
pub(crate) fn malformed_event(queue: &str, entry: &str, reason: &str, at: &str) -> Event {
    let mut event = Event::new(EventKind::Dead, json!({ "reason": reason, "entry": entry }));
    event.queue = Some(queue.to_string());
    at.clone_into(&mut event.at);
    event
}
