//! The events stream (`p:events`): the one `XADD` that writes it, the writes of an attempt's
//! start (merged into its outcome or written on their own by the outcome writer), and the
//! events of a recovery sweep.

use std::time::SystemTime;

use redis::Pipeline;
use redis::Value;

use super::RedisBroker;
use super::codec::{int, text};
use crate::broker::outcome::recovery_event;
use crate::broker::{BrokerError, Envelope, Event, rfc3339};

/// An attempt's start, handed to [`TaskQueue::started`](crate::broker::TaskQueue::started): its
/// record's start marker and its `started` event ([`start_write`]), written by the outcome
/// writer with the attempt's outcome or on their own.
#[derive(Debug)]
pub(super) struct Start {
    /// `p:result:<id>`.
    pub(super) record: String,
    /// The events stream it goes to (its stream's on a cluster).
    pub(super) events: std::sync::Arc<str>,
    /// The `started` event (its `at` is the marker's time).
    pub(super) event: Event,
    pub(super) attempt: u32,
    pub(super) consumer: String,
}

impl Start {
    /// The task's id (its event's `task_id`).
    pub(super) fn id(&self) -> &str {
        self.event.task_id.as_deref().unwrap_or_default()
    }
}

impl RedisBroker {
    /// Whether events are written (`[events] enabled`).
    pub(super) fn events_on(&self) -> bool {
        self.settings.events_maxlen > 0
    }

    /// Appends `event`'s `XADD` ([`xadd_whole`]) to `pipe`, unless events are off: to the
    /// events stream of `stream`'s tasks ([`Keys::events_of`](super::keys::Keys::events_of)),
    /// or of no task's for `None`.
    pub(super) fn add_whole_event(&self, pipe: &mut Pipeline, stream: Option<&str>, event: &Event) {
        if self.events_on() {
            let key = match stream {
                Some(stream) => self.keys.events_of(stream),
                None => self.keys.events(),
            };
            xadd_whole(pipe, &key, self.settings.events_maxlen, event);
        }
    }
}

/// [`xadd_event`] for a whole [`Event`].
pub(super) fn xadd_whole(pipe: &mut Pipeline, key: &str, maxlen: usize, event: &Event) {
    xadd_event(
        pipe,
        key,
        maxlen,
        event.kind.as_str(),
        &event.at,
        [
            ("task_id", event.task_id.as_deref()),
            ("task", event.task.as_deref()),
            ("queue", event.queue.as_deref()),
        ],
        &event.detail.to_string(),
    );
}

/// The writes of an attempt's start, as one outcome: its record's start marker (`HSET` of
/// `id`, `task`, `queue`, `started` = the attempt, `started_at`, `node`, `lost` = 0,
/// `updated_at`: a record this makes — an entry another producer wrote — has no state, read as
/// `running`) and its `started` event (unless events are off: `maxlen` 0). `with_outcome`: the
/// marker goes into the `HSET` of the attempt's outcome, which writes `id`, `task`, `queue` and
/// `updated_at` itself, so only the start's own fields are given.
pub(super) fn start_write(start: &Start, maxlen: usize, with_outcome: bool) -> Pipeline {
    let event = &start.event;
    let mut pipe = redis::pipe();
    let hset = pipe.cmd("HSET").arg(&start.record);
    if !with_outcome {
        hset.arg("id")
            .arg(start.id())
            .arg("task")
            .arg(event.task.as_deref().unwrap_or_default())
            .arg("queue")
            .arg(event.queue.as_deref().unwrap_or_default())
            .arg("updated_at")
            .arg(&event.at);
    }
    hset.arg("started")
        .arg(start.attempt)
        .arg("started_at")
        .arg(&event.at)
        .arg("node")
        .arg(&start.consumer)
        .arg("lost")
        .arg("0")
        .ignore();
    if maxlen > 0 {
        xadd_whole(&mut pipe, &start.events, maxlen, event);
    }
    pipe
}

/// The one place that writes the events stream: `XADD p:events MAXLEN ~ n * kind … at …
/// [task_id …] [task …] [queue …] detail …` (reply ignored).
pub(super) fn xadd_event(
    pipe: &mut Pipeline,
    key: &str,
    maxlen: usize,
    kind: &str,
    at: &str,
    optional: [(&str, Option<&str>); 3],
    detail: &str,
) {
    // Sized once: no buffer grows per argument on the hot path.
    let mut xadd = redis::Cmd::with_capacity(18, 256 + detail.len());
    let cmd = xadd
        .arg("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg("kind")
        .arg(kind)
        .arg("at")
        .arg(at);
    for (name, value) in optional {
        if let Some(value) = value {
            cmd.arg(name).arg(value);
        }
    }
    cmd.arg("detail").arg(detail);
    pipe.add_command(xadd).ignore();
}

impl RedisBroker {
    /// Events for what `recover.lua` did (`kind, e, deliveries, consumer` per entry).
    pub(super) async fn recovery_events(
        &self,
        queue: &str,
        moved: &[Value],
    ) -> Result<(), BrokerError> {
        if moved.is_empty() || !self.events_on() {
            return Ok(());
        }
        let at = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        for entry in moved.chunks(4) {
            let [kind, e, deliveries, consumer] = entry else {
                continue;
            };
            let envelope = Envelope::from_json(&text(e)).ok();
            let event = recovery_event(
                text(kind) == "dead",
                envelope.as_ref(),
                queue,
                u64::try_from(int(deliveries)).unwrap_or(0),
                &text(consumer),
                &at,
            );
            self.add_whole_event(&mut pipe, Some(queue), &event);
        }
        self.query_pipe::<()>(&pipe).await
    }
}
